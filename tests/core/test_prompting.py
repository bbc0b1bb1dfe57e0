"""The prefix wrapper: positions, masks, equivalence with PEFT's own forward, zero-shot start."""

from __future__ import annotations

import torch

from core.models import load_base_model
from core.prompting import attention_mask_4d, build_learner
from tests.core.helpers import batch_of, tiny_learner, tiny_rows


def test_prefix_does_not_shift_positions_in_bert() -> None:
    """HF BERT offsets positions by the cache length; we pass 0..L-1, so position embeddings are identical."""
    learner = tiny_learner("tiny-bert")
    _, rows = tiny_rows(learner, 3)
    seen: list[torch.Tensor] = []
    emb = learner.backbone.embeddings.position_embeddings
    handle = emb.register_forward_hook(lambda _m, inp, _o: seen.append(inp[0].clone()))
    batch = batch_of(learner, rows)
    learner.hidden(batch.input_ids, batch.attention_mask, use_prompt=False)
    learner.hidden(batch.input_ids, batch.attention_mask, use_prompt=True)
    handle.remove()
    assert torch.equal(seen[0], seen[1])
    assert seen[0][0, 0].item() == 0


def test_prefix_matches_peft_native_forward_on_causal_lm() -> None:
    """Our hand-built cache and 4-D mask give the same logits as PEFT's own prefix cache fed through HF's own
    mask handling (PEFT's forward itself drops explicit positions). If an upgrade changes the cache layout or
    semantics, this fails loudly."""
    base = load_base_model("tiny-llama", cache_dir=None, seed=3)  # type: ignore[arg-type]
    learner = build_learner(base, tuning="prefix", num_virtual_tokens=3)
    with torch.no_grad():
        learner.prompt_encoder.embedding.weight.normal_()
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    mask = torch.ones_like(ids)
    ours = base.model.get_output_embeddings()(learner.hidden(ids, mask).states)
    # PEFT's own prefix cache, HF's own 2-D mask handling, the same explicit positions.
    native = base.model(input_ids=ids, attention_mask=torch.ones(1, 3 + 5, dtype=torch.long),
                        position_ids=torch.arange(5)[None], past_key_values=learner.peft_model.get_prompt(1)).logits
    torch.testing.assert_close(ours, native, rtol=1e-4, atol=1e-5)


def test_padding_does_not_change_real_token_states() -> None:
    for name in ("tiny-bert", "tiny-llama"):
        for tuning in ("prefix", "prompt"):
            learner = tiny_learner(name, tuning=tuning)
            _, rows = tiny_rows(learner, 4)
            short = min(rows, key=len)
            alone = batch_of(learner, [short])
            padded = batch_of(learner, [short, max(rows, key=len)])
            h1 = learner.hidden(alone.input_ids, alone.attention_mask).states[0]
            h2 = learner.hidden(padded.input_ids, padded.attention_mask).states[0, : len(short)]
            torch.testing.assert_close(h1, h2, rtol=1e-4, atol=1e-5)


def test_causal_mask_shape_and_content() -> None:
    valid = torch.tensor([[True, True, True, False]])
    m = attention_mask_4d(valid, q_len=2, causal=True, attn_impl="sdpa", dtype=torch.float32)
    assert m.shape == (1, 1, 2, 4)
    assert m[0, 0].tolist() == [[True, True, True, False], [True, True, True, False]]
    m = attention_mask_4d(torch.ones(1, 4, dtype=torch.bool), q_len=2, causal=True, attn_impl="eager",
                          dtype=torch.float32)
    assert m[0, 0, 0, 3] < -1e30 and m[0, 0, 1, 3] == 0


def test_only_prompt_encoder_is_trainable() -> None:
    learner = tiny_learner("tiny-llama")
    trainable = {n for n, p in learner.peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("prompt_encoder" in n for n in trainable)
    assert not any(p.requires_grad for p in learner.base.model.parameters() if p not in
                   set(learner.prompt_encoder.parameters()))
