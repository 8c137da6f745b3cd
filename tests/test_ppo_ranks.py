"""PPO's objective does not depend on the number of processes.

One process holding a rollout of 4 sequences and two processes (gloo, spawned here) holding 2
each must make the same update: advantages are whitened over every rank's tokens, each
micro-batch weighs its share of the whole mini-batch's tokens, and gradients are averaged in one
flattened all-reduce. The ranks hold deliberately unequal token counts (7 and 3), where a
per-rank mean would differ.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from alignment.config import AlignmentConfig, ModelConfig, PPOConfig
from alignment.modeling.embedded import build_model, build_tokenizer
from alignment.modeling.generation import render_prompts
from alignment.modeling.scoring import pack, select
from alignment.scale import distributed
from alignment.stages.ppo import maths as pm
from alignment.stages.ppo.engine import PPOEngine
from alignment.stages.ppo.loop import _optimise
from test_reward import _tiny_reward_model

PROMPTS = [[{"role": "user", "content": "Add: 2 3"}], [{"role": "user", "content": "Reverse: abcd"}]] * 2


def _setup():
    """The same engine (policy + value, fixed init) and the same rollout on every call; raw advantages."""
    torch.manual_seed(0)
    tok = build_tokenizer()
    policy = build_model(ModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64), tok)
    cfg = PPOConfig(rollout_batch_size=4, mini_batch_size=4, ppo_epochs=2, learning_rate=1e-3)
    engine = PPOEngine(cfg, SimpleNamespace(cfg=AlignmentConfig()), policy=policy, value_model=_tiny_reward_model(tok))
    responses = [[10, 11, tok.eos_token_id], [13, 14, 15, 16], [12, tok.eos_token_id], [17]]  # ranks: 3 + 4 and 2 + 1 tokens
    packed = pack(render_prompts(tok, PROMPTS), responses, pad_token_id=tok.pad_token_id)
    gen = torch.Generator().manual_seed(1)
    shape, mask = packed.mask.shape, packed.mask
    rollout = {"packed": packed, "logprobs": -torch.rand(shape, generator=gen) * mask, "values": torch.randn(shape, generator=gen) * mask,
               "advantages": (torch.randn(shape, generator=gen) * 3 + 1) * mask, "returns": torch.randn(shape, generator=gen) * mask}
    return cfg, engine, rollout


def _update(rows: list[int]) -> dict[str, torch.Tensor]:
    """Whiten (over ranks) and optimise this process's ``rows`` of the rollout; the weights after."""
    cfg, engine, rollout = _setup()
    index = torch.tensor(rows)
    mine = {k: (select(v, index) if k == "packed" else v[index]) for k, v in rollout.items()}
    mine["advantages"] = pm.masked_whiten(mine["advantages"], mine["packed"].mask, sum_over_ranks=distributed.sum_over_ranks)
    _optimise(cfg, mine, engine=engine, generator=torch.Generator().manual_seed(3), rollouts=len(rows))
    return {k: v.detach().clone() for k, v in engine.module.state_dict().items()}


def _rank(rank: int, store: str, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        weights = _update([0, 1] if rank == 0 else [2, 3])
        if rank == 0:
            torch.save(weights, out)
    finally:
        dist.destroy_process_group()


def test_one_and_two_processes_make_the_same_update(tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    one = _update([0, 1, 2, 3])
    mp.start_processes(_rank, args=(str(tmp_path / "store"), str(tmp_path / "two.pt")), nprocs=2, start_method="spawn")
    two = torch.load(tmp_path / "two.pt")
    start = _setup()[1].module.state_dict()
    assert any(not torch.equal(start[k], one[k]) for k in one), "the update changed the weights"
    for name, tensor in one.items():
        torch.testing.assert_close(two[name], tensor, atol=1e-6, rtol=1e-5, msg=name)


def test_whitening_over_ranks_is_the_whole_batchs_whitening():
    """Without a process group the sum is the identity: the same numbers as the plain mean/var."""
    values, mask = torch.tensor([[1.0, 2.0, 0.0], [4.0, 0.0, 0.0]]), torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    torch.testing.assert_close(pm.masked_whiten(values, mask, sum_over_ranks=lambda t: t), pm.masked_whiten(values, mask))
    mean, std = 7 / 3, ((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) ** 0.5 / 2 ** 0.5  # unbiased, by hand
    torch.testing.assert_close(pm.masked_whiten(values, mask)[0, 0], torch.tensor((1 - mean) / std), atol=1e-4, rtol=1e-4)


def test_linear_schedule_over_the_stages_optimiser_steps():
    """2 rollouts x 2 epochs x 1 mini-batch = 4 steps: the rate falls 1, 0.75, 0.5, 0.25 (x 1e-3),
    logged per rollout as the mean of its steps, and is 0 after the last."""
    cfg, _, rollout = _setup()
    cfg = PPOConfig(rollout_batch_size=4, mini_batch_size=4, ppo_epochs=2, learning_rate=1e-3, num_rollouts=2, lr_scheduler="linear")
    torch.manual_seed(0)
    tok = build_tokenizer()
    policy = build_model(ModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64), tok)
    engine = PPOEngine(cfg, SimpleNamespace(cfg=AlignmentConfig()), policy=policy, value_model=_tiny_reward_model(tok))
    rates = [_optimise(cfg, rollout, engine=engine, generator=torch.Generator().manual_seed(3), rollouts=4)["learning_rate"]
             for _ in range(2)]
    assert rates == pytest.approx([1e-3 * (1 + 0.75) / 2, 1e-3 * (0.5 + 0.25) / 2]) and engine.learning_rate == 0.0
