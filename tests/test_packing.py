"""Padding-free forwards (alignment/modeling/packing.py) and the compact LM head (alignment/modeling/compact_head.py):
packed batches give the padded batch's outputs and gradients, and nothing else changes."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForSequenceClassification

from alignment.modeling import embedded, compact_head as fused_head, packing
from alignment.config import ModelConfig

TINY_MODEL = ModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)


@pytest.fixture(scope="module")
def tokenizer():
    return embedded.build_tokenizer()


def _batch(tokenizer, lengths, *, width, shared=None, seed=0):
    """Right-padded random rows; ``shared[i] = n`` copies row i's first n tokens into row i + B/2."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, 90, (len(lengths), width), generator=g)
    half = len(lengths) // 2
    for i, n in (shared or {}).items():
        ids[i + half, :n] = ids[i, :n]
    mask = (torch.arange(width)[None] < torch.tensor(lengths)[:, None]).long()
    return ids.masked_fill(mask == 0, tokenizer.pad_token_id), mask


def test_plan_places_sequences_by_hand():
    # Rows of 3, 1 and 2 tokens in a [3, 3] batch: rows are 2 x 3 = 6 wide, so all three go in
    # one row, longest first: positions 0..2 of row 0, then row 2, then row 1.
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 0]])
    p = packing.plan(mask)
    assert (p.rows, p.width) == (1, 6)
    assert p.position_ids.tolist() == [[0, 1, 2, 0, 1, 0]]
    assert p.pack_src.tolist() == [0, 1, 2, 6, 7, 3]  # flat padded positions (row * 3 + t)
    assert p.pack_dst.tolist() == [0, 1, 2, 3, 4, 5]
    assert p.attend is None  # no shared prefix: position ids alone separate the sequences


def test_plan_shares_a_pair_prefix_by_hand():
    # Rows 0 and 1 form a pair (first half, second half) sharing their first 8 tokens: laid out
    # once as [8 shared | 2 of row 0 | 1 of row 1]; row 1's own token sees the prefix, not row 0's.
    ids = torch.arange(20).view(2, 10).clone()
    ids[1, :8] = ids[0, :8]
    mask = torch.tensor([[1] * 10, [1] * 9 + [0]])
    p = packing.plan(mask, ids)
    assert p.rows == 1
    assert p.position_ids[0, :11].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 8]
    attend = p.attend[0, 0]
    assert attend[10, :8].all() and not attend[10, 8:10].any() and attend[10, 10]
    assert attend[9, :10].all() and not attend[9, 10]
    # Both rows read the shared slots back: 10 + 9 real positions from 11 packed slots.
    assert len(p.unpack_dst) == 19 and len(set(p.unpack_src.tolist())) == 11


def test_long_rows_are_not_widened():
    # Past WIDE_ROWS_UP_TO tokens, dense attention over wider rows would cost more than the tail
    # it saves: rows stay as wide as the longest sequence (600), and 100 + 50 share the second.
    mask = (torch.arange(600)[None] < torch.tensor([[600], [100], [50]])).long()
    p = packing.plan(mask)
    assert (p.rows, p.width) == (2, 600)
    assert p.position_ids[1, 98:102].tolist() == [98, 99, 0, 1]


@pytest.mark.parametrize("mask", [torch.ones(2, 4, dtype=torch.long), torch.tensor([[0, 1, 1], [1, 1, 1]])],
                         ids=["no padding", "left padding"])
def test_nothing_to_pack(mask):
    assert packing.plan(mask) is None


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_logits_and_gradients_equal_padded(tokenizer, attn):
    padded = embedded.build_model(TINY_MODEL, tokenizer)
    padded.config._attn_implementation = attn
    packed = copy.deepcopy(padded)
    assert packing.enable(packed) and packing.is_enabled(packed)
    lengths = [30, 12, 20, 9, 25, 14, 20, 30]
    ids, mask = _batch(tokenizer, lengths, width=30, shared={0: 10, 1: 9, 2: 20})  # pair 2: identical rows
    assert packing.plan(mask, ids).attend is not None
    labels = ids.masked_fill(mask == 0, -100)
    out = {name: m(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False) for name, m in
           (("padded", padded), ("packed", packed))}
    real = mask.bool()
    torch.testing.assert_close(out["packed"].logits[real], out["padded"].logits[real], atol=1e-5, rtol=1e-5)
    out["padded"].loss.backward()
    out["packed"].loss.backward()
    for a, b in zip(padded.parameters(), packed.parameters()):
        torch.testing.assert_close(b.grad, a.grad, atol=1e-6, rtol=1e-4)


def test_reward_scores_equal_padded(tokenizer):
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, num_labels=1, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    padded = LlamaForSequenceClassification(config).eval()
    packed = copy.deepcopy(padded)
    assert packing.enable(packed)
    ids, mask = _batch(tokenizer, [20, 15, 11, 18], width=20, shared={0: 12, 1: 9})
    torch.testing.assert_close(packed(input_ids=ids, attention_mask=mask).logits,
                               padded(input_ids=ids, attention_mask=mask).logits, atol=1e-5, rtol=1e-5)


def test_generation_is_unchanged(tokenizer):
    plain = embedded.build_model(TINY_MODEL, tokenizer).eval()
    hooked = copy.deepcopy(plain)
    packing.enable(hooked)
    ids, mask = _batch(tokenizer, [6, 6], width=6)
    kwargs = {"max_new_tokens": 6, "do_sample": False}
    assert torch.equal(hooked.generate(ids, attention_mask=mask, **kwargs), plain.generate(ids, attention_mask=mask, **kwargs))


def test_a_model_that_mixes_packed_sequences_is_left_alone(tokenizer, monkeypatch, caplog):
    # Attention that ignores packed position ids (here: transformers' detection switched off)
    # would let sequences see each other; the self-check must catch it and leave the model be.
    monkeypatch.setattr("transformers.masking_utils.find_packed_sequence_indices", lambda position_ids: None)
    model = embedded.build_model(TINY_MODEL, tokenizer)
    assert not packing.enable(model)
    assert not packing.is_enabled(model)
    assert "padding-free forwards off" in caplog.text


def test_compact_head_scores_the_same(tokenizer, tmp_path):
    from trl import SFTConfig, SFTTrainer
    from datasets import Dataset

    model = embedded.build_model(TINY_MODEL, tokenizer)
    rows = Dataset.from_list([{"messages": [{"role": "user", "content": "ab"}, {"role": "assistant", "content": "ba"}]}] * 4)
    args = SFTConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", max_steps=1, assistant_only_loss=True)
    trainer = SFTTrainer(model=model, args=args, train_dataset=rows, processing_class=tokenizer)
    ids, mask = _batch(tokenizer, [9, 5, 7], width=9)
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :3] = -100  # a "prompt"
    before = trainer.model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
    assert fused_head.score_labelled_only(trainer) == 1
    assert fused_head.score_labelled_only(trainer) == 0  # once only
    after = trainer.model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
    for name in ("log_probs", "entropy", "is_top1"):
        torch.testing.assert_close(getattr(after, name), getattr(before, name), atol=1e-5, rtol=1e-5)
    assert (after.log_probs[labels[:, 1:] == -100] == 0).all()
