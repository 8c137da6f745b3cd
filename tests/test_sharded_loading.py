"""Under ZeRO-3 no rank holds a whole model, and nothing computed with the models changes.

Two processes (gloo, spawned here, a 120 s collective timeout) load a tiny policy and reward
model saved to disk: the policy is created partitioned (``deepspeed.zero.Init`` through
transformers' DeepSpeed integration, each rank holding ceil(n / 2) of every parameter's n
values and an empty local tensor), PPO's reference and reward model become ZeRO-3 inference
engines, partitioned the same way. Their log-probs and scores, each rank scoring its own rows in
lockstep, equal those of the whole models; with the weights gathered rank 0 alone scores every
row (as evaluation does) without hanging, and the engines work again afterwards.

End to end, PPO on two ranks gives the same first rollout (rewards, KL 0 to a reference that is
the policy, losses) and final weights under ZeRO-3 as without DeepSpeed (the tolerance of
tests/test_scale_out.py). The LoRA merge written tensor by tensor equals peft's merge exactly.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

from alignment.config import DeepSpeedConfig, LoraConfig, ModelConfig
from alignment.modeling import lora, merge
from alignment.modeling.embedded import build_model, build_tokenizer
from alignment.modeling.loading import load_causal_lm, load_reward_model
from alignment.modeling.scoring import pack, policy_forward, select, sequence_scores
from alignment.records import read_result
from conftest import TINY, free_port
from test_reward import _tiny_reward_model

PROMPTS = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [14]]
REPLIES = [[20, 21, 22], [23], [24, 25], [26, 27, 28, 29]]
TINY_MODEL = ModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)


def _save_models(root: Path) -> tuple[Path, Path]:
    tok = build_tokenizer()
    torch.manual_seed(0)
    policy, reward = build_model(TINY_MODEL, tok), _tiny_reward_model(tok)
    for model, name in ((policy, "policy"), (reward, "reward")):
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    return root / "policy", root / "reward"


def _packed():
    return pack(PROMPTS, REPLIES, pad_token_id=build_tokenizer().pad_token_id)


def _shares(model) -> list[list[int]]:
    """Per parameter: (local numel, whole numel, this rank's partition numel)."""
    return [[p.numel(), p.ds_numel, p.ds_tensor.numel()] for p in model.parameters()]


def _rank(rank: int, store: str, root: str, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(29000 + os.getppid() % 1000))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2, timeout=timedelta(seconds=120))
    try:
        from alignment.scale.distributed import frozen_engine, gathered, on_rank_zero, zero3_init_config

        zero3 = zero3_init_config(DeepSpeedConfig(zero_stage=3), dtype="float32")
        tok = build_tokenizer()
        policy = load_causal_lm(f"{root}/policy", ModelConfig(), tok, key="test", zero3=zero3)
        reference = frozen_engine(load_causal_lm(f"{root}/policy", ModelConfig(), tok, key="test", zero3=zero3), zero3)
        reward = frozen_engine(load_reward_model(f"{root}/reward", ModelConfig(), zero3=zero3)[0], zero3)
        packed, mine = _packed(), torch.tensor([0, 1] if rank == 0 else [2, 3])
        with torch.no_grad():
            ref_logprobs = policy_forward(reference, select(packed, mine), temperature=1.0)[0]
            scores = sequence_scores(reward, select(packed, mine))
            with gathered(policy, reference, reward):  # rank 0 alone, as evaluation runs
                alone = on_rank_zero(lambda: [policy_forward(policy, packed, temperature=1.0)[0].tolist(),
                                              policy_forward(reference, packed, temperature=1.0)[0].tolist(),
                                              sequence_scores(reward, packed).tolist()])
            again = sequence_scores(reward, select(packed, mine))  # the engine fetches layers again
        result = {"policy": _shares(policy), "reference": _shares(reference), "reward": _shares(reward),
                  "ref_logprobs": ref_logprobs.tolist(), "scores": scores.tolist(), "alone": alone, "again": again.tolist()}
        Path(f"{out}.{rank}").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


@pytest.mark.integration
def test_models_are_partitioned_at_load_and_compute_as_whole_ones(tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    policy_dir, reward_dir = _save_models(tmp_path)
    tok = build_tokenizer()
    whole_policy = load_causal_lm(str(policy_dir), ModelConfig(), tok, key="test")
    whole_reward = load_reward_model(str(reward_dir), ModelConfig())[0]
    packed = _packed()
    with torch.no_grad():
        logprobs, scores = policy_forward(whole_policy, packed, temperature=1.0)[0], sequence_scores(whole_reward, packed)
    out = str(tmp_path / "rank")
    mp.start_processes(_rank, args=(str(tmp_path / "store"), str(tmp_path), out), nprocs=2, start_method="spawn")
    ranks = [json.loads(Path(f"{out}.{r}").read_text()) for r in (0, 1)]
    for name, model in (("policy", whole_policy), ("reference", whole_policy), ("reward", whole_reward)):
        whole = sum(p.numel() for p in model.parameters())
        for result in ranks:
            shares = result[name]
            assert sum(n for _, n, _ in shares) == whole
            assert all(local == 0 for local, _, _ in shares), f"{name}: a rank holds a whole parameter"
            assert all(part == math.ceil(n / 2) for _, n, part in shares), name
            assert sum(part for _, _, part in shares) <= whole / 2 + len(shares)  # half the bytes, up to rounding
    close = dict(atol=1e-6, rtol=1e-5)
    for rank, rows in ((0, [0, 1]), (1, [2, 3])):
        torch.testing.assert_close(torch.tensor(ranks[rank]["ref_logprobs"]), logprobs[rows], **close)
        torch.testing.assert_close(torch.tensor(ranks[rank]["scores"]), scores[rows], **close)
        torch.testing.assert_close(torch.tensor(ranks[rank]["again"]), scores[rows], **close)
    alone_policy, alone_reference, alone_scores = (torch.tensor(t) for t in ranks[1]["alone"])  # rank 0's, broadcast
    for got in (alone_policy, alone_reference):
        torch.testing.assert_close(got, logprobs, **close)
    torch.testing.assert_close(alone_scores, scores, **close)


def _run_ppo(out: Path, policy_dir: Path, reward_dir: Path, option: str) -> Path:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "PYTHONPATH": str(Path(__file__).parent)}
    command = [sys.executable, "-m", "alignment.run", "+recipe=ppo", f"output_dir={out}", *TINY, f"ppo.init_from={policy_dir}",
               f"ppo.reward_from={reward_dir}", "ppo.num_rollouts=1", "ppo.rollout_batch_size=8", "ppo.mini_batch_size=4",
               "ppo.n_prompts=32", "ppo.max_new_tokens=6", "eval.enabled=false", "launcher.nproc_per_node=2",
               f"deepspeed={option}", f"launcher.master_port={free_port()}"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return out / "ppo" / "ppo"


@pytest.mark.integration
def test_ppo_under_zero3_trains_as_without_deepspeed(tmp_path):
    """Sharded policy, value, reference and reward: the same rollout and update as whole models."""
    policy_dir, reward_dir = _save_models(tmp_path)
    runs = {option: _run_ppo(tmp_path / option, policy_dir, reward_dir, option) for option in ("none", "zero3")}
    first = {option: read_result(stage).metrics["history"][0] for option, stage in runs.items()}
    for key in ("reward/raw", "entropy", "response_tokens", "loss/policy", "loss/value"):
        assert first["zero3"][key] == pytest.approx(first["none"][key], rel=1e-5, abs=1e-7), key
    assert abs(first["zero3"]["kl"]) < 1e-6  # the sharded reference is the policy it started from
    ours, reference = (load_file(str(stage / "checkpoint" / "model.safetensors")) for stage in (runs["zero3"], runs["none"]))
    assert ours.keys() == reference.keys()
    assert max((ours[k] - reference[k]).abs().max().item() for k in ours) < 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_streamed_lora_merge_equals_peft_merge(tmp_path, dtype):
    tok = build_tokenizer()
    torch.manual_seed(0)
    build_model(TINY_MODEL, tok).save_pretrained(tmp_path / "base")
    config = lora.peft_config(LoraConfig(r=4, alpha=8, dropout=0.0), task=lora.CAUSAL_LM)
    adapted = get_peft_model(build_model(TINY_MODEL, tok), config)
    for name, param in adapted.named_parameters():
        if "lora_B" in name:  # B starts at zero: give the merge something to add
            torch.nn.init.normal_(param, std=0.5)
    adapted.save_pretrained(tmp_path / "adapter", save_embedding_layers=False)
    assert merge.can_stream(str(tmp_path / "base"), config, gguf_file=None)
    merge.merge_streaming(str(tmp_path / "base"), tmp_path / "adapter", config, out_dir=tmp_path / "streamed", dtype=dtype, pad_token_id=0)
    base = type(adapted.get_base_model()).from_pretrained(tmp_path / "base", dtype=dtype)
    expected = PeftModel.from_pretrained(base, tmp_path / "adapter").merge_and_unload().state_dict()
    streamed = load_file(str(tmp_path / "streamed" / "model.safetensors"))
    assert set(streamed) <= set(expected) and any("q_proj" in k for k in streamed)
    for key, tensor in streamed.items():
        assert tensor.dtype == dtype and torch.equal(tensor, expected[key]), key
    original = load_file(str(tmp_path / "base" / "model.safetensors"))
    assert not torch.equal(streamed["model.layers.0.self_attn.q_proj.weight"], original["model.layers.0.self_attn.q_proj.weight"].to(dtype))
