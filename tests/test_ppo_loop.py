"""PPO plumbing: rollout tensors line up with the sequences, the value model starts from the
reward model, reward-labelled pairs prefer the higher score, the health check fires."""

from __future__ import annotations

import torch

from alignment.config import ModelConfig, PairsConfig
from alignment.modeling.embedded import build_model, build_tokenizer
from alignment.stages.ppo.health import HealthCheck
from alignment.modeling.generation import render_prompts
from alignment.modeling.scoring import response_logps
from alignment.data.pairs import sample_pairs
from alignment.modeling.scoring import pack, policy_forward, sequence_scores, token_values
from alignment.data.suite import build_suite
from test_reward import _tiny_reward_model

PROMPTS = [[{"role": "user", "content": "Add: 2 3"}], [{"role": "user", "content": "Reverse: abcd"}]]


def test_packed_logprobs_are_each_rows_own_next_token_logprobs():
    """Each response token's log-prob in the packed, right-padded batch equals the one read off a
    forward pass of that row alone (prompt + response, no padding) at the position before it."""
    tok = build_tokenizer()
    model = build_model(ModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64), tok)
    responses = ["5", "dcba"]
    prompt_ids = render_prompts(tok, PROMPTS)
    response_ids = [tok(r, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for r in responses]
    packed = pack(prompt_ids, response_ids, pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        logprobs, logits = policy_forward(model, packed, temperature=1.0)
        assert packed.mask.tolist() == [[1.0, 1.0, 0.0, 0.0, 0.0], [1.0] * 5]
        assert logits.shape[:2] == packed.mask.shape
        for row, (prompt, response) in enumerate(zip(prompt_ids, response_ids)):
            alone = torch.log_softmax(model(input_ids=torch.tensor([prompt + response])).logits[0], dim=-1)
            by_hand = [float(alone[len(prompt) - 1 + j, token]) for j, token in enumerate(response)]
            assert torch.allclose(logprobs[row, : len(response)], torch.tensor(by_hand), atol=1e-5)
        total = response_logps(model, prompt_ids, response_ids, pad_token_id=tok.pad_token_id, batch_size=2)  # the evaluation's sum
        assert torch.allclose(total, (logprobs * packed.mask).sum(-1), atol=1e-4)


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
    from alignment.stages.ppo.stage import _value_model

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

    def by_length(prompt_ids, reply_ids):  # a stand-in reward model: more tokens is better
        return [float(len(r)) for r in reply_ids]

    rows, counts = sample_pairs(model, tok, examples, cfg=PairsConfig(samples_per_prompt=4, max_new_tokens=6, batch_size=32),
                                seed=0, scorer=by_length)
    assert rows and counts["pairs"] == len(rows)
    for row in rows:
        assert len(row["chosen_ids"]) > len(row["rejected_ids"])
        assert tok.decode(row["chosen_ids"], skip_special_tokens=True) == row["chosen"][0]["content"], "ids and text agree"


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


def _engine_and_rollout(micro_batch_size):
    """A PPO engine over a tiny policy and value model (same init every call) and one rollout
    of 4 sequences with hand-set old log-probs, values, advantages and returns."""
    from types import SimpleNamespace

    from alignment.config import AlignmentConfig, PPOConfig
    from alignment.stages.ppo.engine import PPOEngine

    tok = build_tokenizer()
    torch.manual_seed(0)
    policy = build_model(ModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64), tok)
    value_model = _tiny_reward_model(tok)
    cfg = PPOConfig(rollout_batch_size=4, mini_batch_size=4, ppo_epochs=2, micro_batch_size=micro_batch_size, learning_rate=1e-3)
    engine = PPOEngine(cfg, SimpleNamespace(cfg=AlignmentConfig()), policy=policy, value_model=value_model)
    prompts = render_prompts(tok, PROMPTS * 2)
    responses = [[10, 11, tok.eos_token_id], [12, tok.eos_token_id], [13, 14, 15, 16], [17]]
    packed = pack(prompts, responses, pad_token_id=tok.pad_token_id)
    gen = torch.Generator().manual_seed(1)
    shape = packed.mask.shape
    rollout = {"packed": packed, "logprobs": -torch.rand(shape, generator=gen) * packed.mask,
               "values": torch.randn(shape, generator=gen) * packed.mask, "advantages": torch.randn(shape, generator=gen) * packed.mask,
               "returns": torch.randn(shape, generator=gen) * packed.mask}
    return cfg, engine, rollout


def test_scoring_in_forward_batches_gives_the_same_numbers():
    """ppo.forward_batch_size bounds the rows of each scoring forward (policy, reference, value):
    log-probs, values and the token-weighted mean entropy equal those of one forward."""
    import copy

    from alignment.stages.ppo.rollout import _score

    outputs = []
    for forward in (None, 3, 1):
        cfg, engine, rollout = _engine_and_rollout(None)
        cfg.forward_batch_size = forward
        outputs.append(_score(cfg, rollout["packed"], engine=engine, reference=copy.deepcopy(engine.policy)))
    (*whole, whole_entropy), *split = outputs
    for *tensors, entropy in split:
        for ours, reference in zip(tensors, whole):
            torch.testing.assert_close(ours, reference, atol=1e-6, rtol=1e-5)
        assert abs(entropy - whole_entropy) < 1e-5
    assert whole_entropy > 0


def test_micro_batches_give_the_same_update_as_one_pass():
    """ppo.micro_batch_size splits each mini-batch and accumulates gradients, each micro-batch
    weighted by its share of the response tokens: the weights after two epochs and the logged
    losses equal those of one pass over the whole mini-batch."""
    from alignment.stages.ppo.loop import _optimise

    results = []
    for micro in (None, 2, 1):
        cfg, engine, rollout = _engine_and_rollout(micro)
        stats = _optimise(cfg, rollout, engine=engine, generator=torch.Generator().manual_seed(3), rollouts=4)
        results.append((stats, {k: v.detach().clone() for k, v in engine.module.state_dict().items()}))
    (whole_stats, whole), *split = results
    for stats, weights in split:
        for name, tensor in whole.items():
            torch.testing.assert_close(weights[name], tensor, atol=1e-6, rtol=1e-5, msg=name)
        for key in ("loss/policy", "loss/value", "grad_norm"):
            assert abs(stats[key] - whole_stats[key]) < 1e-5 * max(1.0, abs(whole_stats[key])), key
    start = _engine_and_rollout(None)[1].module.state_dict()
    assert any(not torch.equal(start[k], whole[k]) for k in whole), "the update changed the weights"
