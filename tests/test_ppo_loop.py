"""PPO plumbing: rollout tensors line up with the sequences, the value model starts from the
reward model, reward-labelled pairs prefer the higher score, the health check fires."""

from __future__ import annotations

import torch

from alignment.config import ModelConfig, PairsConfig
from alignment.embedded import build_model, build_tokenizer
from alignment.health import HealthCheck
from alignment.inference import render_prompts, response_logps
from alignment.pairs import sample_pairs
from alignment.ppo_rollout import pack, policy_forward, sequence_scores, token_values
from alignment.suite import build_suite
from test_reward import _tiny_reward_model

PROMPTS = [[{"role": "user", "content": "Add: 2 3"}], [{"role": "user", "content": "Reverse: abcd"}]]


def test_packed_logprobs_equal_response_logprobs():
    tok = build_tokenizer()
    model = build_model(ModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64), tok)
    responses = ["5", "dcba"]
    prompt_ids = render_prompts(tok, PROMPTS)
    response_ids = [tok(r, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for r in responses]
    packed = pack(prompt_ids, response_ids, pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        logprobs, logits = policy_forward(model, packed, temperature=1.0)
    assert packed.mask.tolist() == [[1.0, 1.0, 0.0, 0.0, 0.0], [1.0] * 5]
    expected = response_logps(model, tok, PROMPTS, responses, batch_size=2)
    assert torch.allclose((logprobs * packed.mask).sum(-1), expected, atol=1e-4)
    assert logits.shape[:2] == packed.mask.shape


def test_sequence_score_matches_classification_head_and_values_line_up():
    tok = build_tokenizer()
    reward_model = _tiny_reward_model(tok)
    prompt_ids = render_prompts(tok, PROMPTS)
    response_ids = [[tok.convert_tokens_to_ids("5"), tok.eos_token_id], [tok.convert_tokens_to_ids("x")] * 3 + [tok.eos_token_id]]
    packed = pack(prompt_ids, response_ids, pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        ours = sequence_scores(reward_model, packed)
        hf = reward_model(input_ids=packed.input_ids, attention_mask=packed.attention_mask).logits[:, 0]
        values = token_values(reward_model, packed)
    assert torch.allclose(ours, hf, atol=1e-5), "score at the last real token, as the HF head pools"
    assert values.shape == packed.mask.shape


def test_value_model_starts_as_the_reward_model(tmp_path):
    from types import SimpleNamespace

    from alignment.config import AlignmentConfig, PPOConfig
    from alignment.ppo import _value_model

    tok = build_tokenizer()
    reward_model = _tiny_reward_model(tok)
    reward_model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    ctx = SimpleNamespace(cfg=AlignmentConfig(), start=SimpleNamespace(path=str(tmp_path)))
    value_model = _value_model(PPOConfig(value_from="reward"), ctx, str(tmp_path))
    for (name, a), (_, b) in zip(reward_model.state_dict().items(), value_model.state_dict().items()):
        assert torch.equal(a, b), name
    value_model.score.weight.data.add_(1.0)
    assert not torch.equal(value_model.score.weight, reward_model.score.weight), "a copy, not the same tensors"


def test_reward_labelled_pairs_prefer_the_higher_score():
    tok = build_tokenizer()
    model = build_model(ModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64), tok)
    examples = build_suite(seed=0, n_train=8, n_eval=0).train

    def by_length(prompts, responses):  # a stand-in reward model: longer is better
        return [float(len(r)) for r in responses]

    rows, counts = sample_pairs(model, tok, examples, cfg=PairsConfig(samples_per_prompt=4), max_new_tokens=6, batch_size=32,
                                seed=0, scorer=by_length)
    assert rows and counts["pairs"] == len(rows)
    for row in rows:
        assert len(row["chosen"][0]["content"]) > len(row["rejected"][0]["content"])


def _step(gold, reward, entropy=1.0, kl=0.1, ratio=1.0):
    return {"rollout/gold_accuracy": gold, "reward/raw": reward, "entropy": entropy, "kl": kl, "ratio_mean": ratio}


def test_health_check_flags_reward_hacking_and_collapse():
    check = HealthCheck(kl_target=0.5)
    warnings = []
    for i in range(10):  # reward climbs while gold accuracy falls
        warnings += check.observe(_step(gold=0.8 - 0.05 * i, reward=0.1 * i))
    assert any("reward hacking" in w for w in warnings)
    assert any("KL" in w for w in check.observe(_step(0.5, 1.0, kl=2.0)))
    assert any("entropy collapsed" in w for w in check.observe(_step(0.5, 1.0, entropy=0.01)))
    assert any("ratio" in w for w in check.observe(_step(0.5, 1.0, ratio=3.0)))
    healthy = HealthCheck(kl_target=0.5)
    assert not [w for i in range(10) for w in healthy.observe(_step(gold=0.5 + 0.01 * i, reward=0.1 * i))]
