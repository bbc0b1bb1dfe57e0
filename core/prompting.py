"""Prefix tuning (white-box) and prompt tuning (black-box) on a frozen base model.

PEFT owns the trainable parameters and the on-disk adapter format; *we* hand the prefix to the base model.
PEFT's own forward for prefix tuning goes through a transformers argument that was renamed in 5.24 and broke
sequence classification, so this wrapper builds the key/value cache itself from PEFT's prompt encoder with
PEFT's documented layout, and passes explicit positions and an explicit 4-D attention mask. Only the base
model's public ``past_key_values`` / ``inputs_embeds`` / ``position_ids`` arguments are relied on.

Shapes: B batch, L tokens, P virtual tokens, H key/value heads, d head dim, D hidden size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from peft import PeftModel, PrefixTuningConfig, PromptTuningConfig, TaskType, get_peft_model
from torch import nn
from transformers import DynamicCache

from core.models import BaseModel

# Public, task-neutral text that initialises the soft prompt (Li & Liang 2021: real-word initialisation beats
# random; PEFT's random N(0, 1) init swamps attention and erases the zero-shot start).
INIT_TEXT = ("Read the following text carefully and answer the question about it in a few plain words, "
             "as a helpful and accurate assistant would.")


@dataclass
class Hidden:
    """Last hidden states of the real tokens, ``states`` [B, L, D], and their padding mask [B, L].

    ``prompt`` is the per-example prompt-encoder output that produced them ([B, P, F], see
    :meth:`PromptLearner.prompt_states`), or None for the bare model: a regulariser on the prefix must be a
    function of *these* activations to be seen (and clipped) by the per-sample gradient hooks.
    """

    states: torch.Tensor
    mask: torch.Tensor
    prompt: torch.Tensor | None = None


@dataclass(frozen=True)
class Block:
    """One unit of the prefix that AWP and layer selection treat as a whole: ``param[:, cols]`` (or the whole
    tensor when ``cols`` is None). For an unprojected prefix there is one block per transformer layer."""

    param: nn.Parameter
    cols: slice | None
    layer: int | None

    def view(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor if self.cols is None else tensor[:, self.cols]


def attention_mask_4d(kv_valid: torch.Tensor, *, q_len: int, causal: bool, attn_impl: str,
                      dtype: torch.dtype) -> torch.Tensor:
    """Build a [B, 1, q_len, K] mask where the queries are the last ``q_len`` of the K keys.

    ``kv_valid`` [B, K] marks keys that may be attended (prefix slots and non-padding tokens). Returns a bool
    mask (True = attend) for SDPA-style kernels, or an additive float mask for eager attention.
    """
    b, k = kv_valid.shape
    allowed = kv_valid[:, None, None, :].expand(b, 1, q_len, k)
    if causal:
        q_pos = torch.arange(k - q_len, k, device=kv_valid.device)[:, None]
        k_pos = torch.arange(k, device=kv_valid.device)[None, :]
        allowed = allowed & (k_pos <= q_pos)[None, None]
    if attn_impl == "eager":
        zero = torch.zeros((), dtype=dtype, device=kv_valid.device)
        return torch.where(allowed, zero, torch.finfo(dtype).min)
    return allowed


class PromptLearner:
    """A frozen base model plus a trainable PEFT prefix or soft prompt.

    ``trainable_module`` holds every trainable parameter (the PEFT prompt encoder) exactly once, so it is the
    one module to wrap for per-sample gradients.
    """

    def __init__(self, base: BaseModel, peft_model: PeftModel, *, tuning: str) -> None:
        self.base = base
        self.peft_model = peft_model
        self.tuning = tuning
        # PEFT and transformers build these dynamically; Any keeps the type checker honest about that.
        self.config: Any = peft_model.peft_config["default"]
        self.prompt_encoder: Any = peft_model.prompt_encoder["default"]
        self.backbone: Any = base.model.base_model  # BertModel / LlamaModel ...
        self.causal = base.family == "decoder"
        self.kept_layers: tuple[int, ...] | None = None  # None: every layer has its prefix
        self.layer_removal = "mask"
        self._hooks: list[Any] = []

    @property
    def num_virtual_tokens(self) -> int:
        return int(self.config.num_virtual_tokens)

    @property
    def num_layers(self) -> int:
        return int(self.config.num_layers)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.prompt_encoder.parameters() if p.requires_grad]

    def blocks(self) -> list[Block]:
        """Per-layer key/value blocks of an unprojected prefix; one block per tensor otherwise."""
        params = self.trainable_parameters()
        if self.tuning != "prefix" or self.config.prefix_projection:
            return [Block(p, None, None) for p in params]
        width = 2 * int(self.config.token_dim)  # (key, value) x H x d per layer, PEFT layout
        weight = self.prompt_encoder.embedding.weight
        return [Block(weight, slice(j * width, (j + 1) * width), j) for j in range(self.num_layers)]

    def layer_columns(self) -> torch.Tensor | None:
        """[F] 1.0 for prompt-state columns of kept layers, 0.0 for removed ones (None: all kept)."""
        if self.kept_layers is None or self.tuning != "prefix":
            return None
        width = 2 * int(self.config.token_dim)
        keep = torch.zeros(self.num_layers)
        keep[list(self.kept_layers)] = 1.0
        return keep.repeat_interleave(width)

    def set_layers(self, kept: Sequence[int] | None, *, removal: str = "mask") -> None:
        """Keep only the prefix of layers ``kept`` (None: all). Cross-layer flatness (Privacy-Flat §3.2).

        ``mask`` removes a layer's prefix for real: a pre-hook on that layer's attention masks the P prefix
        keys out (the one 4-D mask the model takes is shared by all layers). ``zero`` zeroes its keys and
        values, as the paper does: a zero key still takes softmax mass exp(0).
        """
        for h in self._hooks:
            h.remove()
        self._hooks = []
        chosen = None if kept is None else tuple(sorted(int(j) for j in kept))
        self.kept_layers, self.layer_removal = chosen, removal
        if chosen is None or removal != "mask" or self.tuning != "prefix":
            return
        for j, attn in enumerate(_attention_modules(self.backbone)):
            if j not in chosen:
                self._hooks.append(attn.register_forward_pre_hook(self._mask_prefix, with_kwargs=True))

    def _mask_prefix(self, _module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        p = self.num_virtual_tokens
        mask = kwargs.get("attention_mask")
        if mask is None:  # our wrapper always passes an explicit 4-D mask; without one the key length is unknown
            raise RuntimeError("layer removal needs the explicit 4-D attention mask PromptLearner passes")
        if mask.dtype == torch.bool:
            new = mask.clone()
            new[..., :p] = False
            # A query that could see only the prefix (a left-padding slot) would get an empty softmax (NaN, which
            # poisons gradients); it keeps its old row: its output is padding and never read.
            new = torch.where(new.any(-1, keepdim=True), new, mask)
        else:
            low = torch.finfo(mask.dtype).min
            new = mask.clone()
            new[..., :p] = low
            new = torch.where((new > low / 2).any(-1, keepdim=True), new, mask)
        kwargs["attention_mask"] = new
        return args, kwargs

    def prompt_states(self, batch_size: int) -> torch.Tensor:
        """The prompt encoder's output per example: [B, P, num_layers*2*H*d] (prefix) or [B, P, D] (prompt).

        Each example gets its own lookup of the virtual-token indices, so per-sample gradient hooks on the
        encoder see one activation per example.
        """
        weight = self.prompt_encoder.embedding.weight
        tokens = torch.arange(self.num_virtual_tokens, device=weight.device).unsqueeze(0).expand(batch_size, -1)
        if getattr(self.config, "inference_mode", False) and self.tuning == "prefix":
            return weight[: self.num_virtual_tokens].unsqueeze(0).expand(batch_size, -1, -1)
        return self.prompt_encoder(tokens)

    def prefix_cache(self, states: torch.Tensor) -> DynamicCache:
        """Turn [B, P, layers*2*H*d] into a cache of per-layer (key, value) [B, H, P, d] (PEFT's layout)."""
        b = states.shape[0]
        heads = int(self.config.num_attention_heads)
        d = int(self.config.token_dim) // heads
        kv = states.view(b, self.num_virtual_tokens, self.num_layers * 2, heads, d).permute(2, 0, 3, 1, 4)
        if self.kept_layers is not None and self.layer_removal == "zero":
            keep = torch.zeros(self.num_layers * 2, device=kv.device, dtype=kv.dtype)
            for j in self.kept_layers:
                keep[2 * j: 2 * j + 2] = 1.0
            kv = kv * keep.view(-1, 1, 1, 1, 1)
        cache = DynamicCache()
        for layer in range(self.num_layers):
            cache.update(kv[2 * layer], kv[2 * layer + 1], layer)
        return cache

    def hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *,
               use_prompt: bool = True, states: torch.Tensor | None = None) -> Hidden:
        """Run the frozen backbone with the prefix / soft prompt; return the real tokens' last hidden states.

        Args:
            input_ids: [B, L] token ids, right- or left-padded.
            attention_mask: [B, L] 1 for real tokens.
            use_prompt: False runs the bare base model (zero-shot reference).
            states: prompt states to use instead of the encoder's ([B, P, F]; a teacher's, for distillation).
        """
        mask = attention_mask.bool()
        b, seq = input_ids.shape
        impl = getattr(self.base.config, "_attn_implementation", "sdpa") or "sdpa"
        dtype = next(self.backbone.parameters()).dtype
        # Positions count real tokens only (left padding gets 0s), so a prefix never shifts them: HF BERT
        # would otherwise offset positions by the cache length.
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        if not use_prompt:
            am = attention_mask_4d(mask, q_len=seq, causal=self.causal, attn_impl=impl, dtype=dtype)
            out = self.backbone(input_ids=input_ids, attention_mask=am, position_ids=positions, use_cache=False)
            return Hidden(out.last_hidden_state, mask)
        p = self.num_virtual_tokens
        if states is None:
            states = self.prompt_states(b)
        ones = torch.ones(b, p, dtype=torch.bool, device=mask.device)
        if self.tuning == "prefix":
            kv_valid = torch.cat([ones, mask], dim=1)
            am = attention_mask_4d(kv_valid, q_len=seq, causal=self.causal, attn_impl=impl, dtype=dtype)
            out = self.backbone(input_ids=input_ids, attention_mask=am, position_ids=positions,
                                past_key_values=self.prefix_cache(states.to(dtype)), use_cache=False)
            return Hidden(out.last_hidden_state, mask, states)
        # Prompt tuning: the soft prompt is real input at positions 0..P-1, the text follows it.
        embeds = self.backbone.get_input_embeddings()(input_ids)
        full = torch.cat([states.to(embeds.dtype), embeds], dim=1)
        kv_valid = torch.cat([ones, mask], dim=1)
        am = attention_mask_4d(kv_valid, q_len=p + seq, causal=self.causal, attn_impl=impl, dtype=dtype)
        pos = torch.cat([torch.arange(p, device=mask.device).expand(b, p), positions + p], dim=1)
        out = self.backbone(inputs_embeds=full, attention_mask=am, position_ids=pos, use_cache=False)
        return Hidden(out.last_hidden_state[:, p:], mask, states)

    def train(self, mode: bool = True) -> None:
        """Train mode for the trainable part only; the frozen base stays in eval (dropout off)."""
        self.prompt_encoder.train(mode)


def _attention_modules(backbone: nn.Module) -> list[nn.Module]:
    """The self-attention module of each transformer layer, in order (BERT-style and Llama-style models)."""
    layers: Any = getattr(getattr(backbone, "encoder", None), "layer", None) or getattr(backbone, "layers", None)
    if layers is None:
        raise TypeError(f"cannot find the transformer layers of {type(backbone).__name__}")
    return [layer.attention.self if hasattr(layer, "attention") else layer.self_attn for layer in layers]


def build_learner(base: BaseModel, *, tuning: str, num_virtual_tokens: int, prefix_projection: bool = False,
                  init_text: str = INIT_TEXT) -> PromptLearner:
    """Attach a fresh PEFT prefix (``tuning="prefix"``) or soft prompt (``"prompt"``) to ``base``.

    The prefix starts from copies of the base model's attention-sink key/value (and the soft prompt from
    the word embeddings of ``init_text``), so training starts near the zero-shot model, not from noise.
    """
    task_type = TaskType.CAUSAL_LM if base.family == "decoder" else TaskType.FEATURE_EXTRACTION
    cfg: PrefixTuningConfig | PromptTuningConfig
    if tuning == "prefix":
        cfg = PrefixTuningConfig(task_type=task_type, num_virtual_tokens=num_virtual_tokens,
                                 prefix_projection=prefix_projection)
    else:
        cfg = PromptTuningConfig(task_type=task_type, num_virtual_tokens=num_virtual_tokens)
    peft_model = get_peft_model(base.model, cfg)
    learner = PromptLearner(base, peft_model, tuning=tuning)
    if not prefix_projection:
        _init_from_text(learner, init_text)
    learner.prompt_encoder.requires_grad_(True)
    return learner


@torch.no_grad()
def _init_from_text(learner: PromptLearner, text: str) -> None:
    """Start near the zero-shot model.

    Prompt tuning: the word embeddings of ``text``. Prefix tuning: every virtual token copies the key/value
    of the model's *attention sink* (the final [SEP] of an encoder, the first token of a decoder), whose
    value is close to a no-op. Measured on SST-2 dev (400 rows, all-MiniLM, verbalizer head): no prefix
    74.5%, sink init 72.8%, keys/values of a real sentence 67.8%.
    """
    tok = learner.base.tokenizer
    weight = learner.prompt_encoder.embedding.weight
    p = learner.num_virtual_tokens
    if learner.tuning == "prompt":
        ids = tok(text, add_special_tokens=False)["input_ids"]
        ids = (ids * (p // max(len(ids), 1) + 1))[:p]
        weight.copy_(learner.backbone.get_input_embeddings()(torch.tensor([ids], device=weight.device))[0])
        return
    ids = tok(text)["input_ids"] if learner.causal else tok("")["input_ids"] or tok(text)["input_ids"]
    sink = 0 if learner.causal else len(ids) - 1
    cache = DynamicCache()
    learner.backbone(input_ids=torch.tensor([ids], device=weight.device),
                     position_ids=torch.arange(len(ids), device=weight.device).unsqueeze(0),
                     past_key_values=cache, use_cache=True)
    blocks = []
    for layer in range(learner.num_layers):
        layer_cache: Any = cache.layers[layer]
        k, v = layer_cache.keys[0, :, sink], layer_cache.values[0, :, sink]  # [H, d]
        blocks += [k.reshape(-1), v.reshape(-1)]
    # PEFT layout per virtual token: (layers*2, H, d) flattened.
    weight.copy_(torch.cat(blocks).expand(p, -1))


def load_learner(base: BaseModel, adapter_dir: str, *, tuning: str) -> PromptLearner:
    """Load a saved PEFT adapter onto ``base`` (what ``PeftModel.from_pretrained`` does) and wrap it."""
    peft_model = PeftModel.from_pretrained(base.model, adapter_dir)
    return PromptLearner(base, peft_model, tuning=tuning)
