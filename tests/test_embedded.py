"""The embedded tokenizer and model: deterministic, chat template masks assistant turns only."""

from __future__ import annotations

import torch

from alignment.config import ModelConfig
from alignment.modeling.embedded import build_model, build_tokenizer


def test_tokenizer_is_deterministic_and_round_trips():
    a, b = build_tokenizer(), build_tokenizer()
    assert a.get_vocab() == b.get_vocab()
    text = "Reverse kphbq, then 12 + 7 = 19!\n"
    ids = a(text)["input_ids"]
    assert len(ids) == len(text), "one token per character"
    assert a.decode(ids) == text


def test_chat_template_masks_only_the_response():
    tok = build_tokenizer()
    messages = [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5"}]
    out = tok.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    masked = [t for t, m in zip(out["input_ids"], out["assistant_masks"]) if m]
    assert tok.decode(masked) == "5" + tok.eos_token


def test_generation_prompt_is_prefix_of_full_conversation():
    tok = build_tokenizer()
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    full = tok.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], tokenize=False)
    assert full.startswith(prompt)


def test_model_init_is_seeded_and_leaves_global_rng_alone():
    tok = build_tokenizer()
    cfg = ModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    m1, m2 = build_model(cfg, tok), build_model(cfg, tok)
    assert torch.equal(torch.random.get_rng_state(), state)
    for p1, p2 in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(p1, p2)
    assert m1.config.vocab_size == len(tok)
