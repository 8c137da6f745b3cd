"""Generation and response log-probabilities agree with a direct forward pass."""

from __future__ import annotations

import torch

from alignment.config import ModelConfig
from alignment.modeling.embedded import build_model, build_tokenizer
from alignment.modeling.generation import generate
from alignment.modeling.scoring import render_replies, response_logps


def _tiny():
    tok = build_tokenizer()
    return build_model(ModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64), tok), tok


PROMPTS = [[{"role": "user", "content": "What is 2 + 3?"}], [{"role": "user", "content": "Reverse abc, please now."}]]


def test_generate_shapes_and_determinism():
    model, tok = _tiny()
    a = generate(model, tok, PROMPTS, num_samples=3, temperature=1.0, max_new_tokens=5, batch_size=4, seed=7)
    b = generate(model, tok, PROMPTS, num_samples=3, temperature=1.0, max_new_tokens=5, batch_size=4, seed=7)
    assert [len(g) for g in a] == [3, 3]
    assert all(g.num_tokens <= 5 for group in a for g in group)
    assert [[g.text for g in group] for group in a] == [[g.text for g in group] for group in b], "same seed, same samples"
    greedy1 = generate(model, tok, PROMPTS, num_samples=1, temperature=0.0, max_new_tokens=5, batch_size=1, seed=0)
    greedy2 = generate(model, tok, PROMPTS, num_samples=1, temperature=0.0, max_new_tokens=5, batch_size=8, seed=1)
    assert [g[0].text for g in greedy1] == [g[0].text for g in greedy2], "greedy must not depend on batching or seed"


def test_response_logps_match_manual_sum():
    model, tok = _tiny()
    responses = ["5", "cba"]
    prompt_ids, reply_ids = render_replies(tok, PROMPTS, responses)
    got = response_logps(model, prompt_ids, reply_ids, pad_token_id=tok.pad_token_id, batch_size=2)
    for i, (prompt, response) in enumerate(zip(PROMPTS, responses)):
        p = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
        r = tok(response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert (prompt_ids[i], reply_ids[i]) == (p, r), "the toy's template: reply tokens then <|end|>, nothing after"
        ids = torch.tensor([p + r])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1], -1)
        manual = sum(logp[len(p) - 1 + j, t] for j, t in enumerate(r))
        assert torch.isclose(got[i], manual, atol=1e-4)
