"""Several processes on CPU (gloo), as on GPUs: ZeRO options reach the trainers from the Hydra
config, two ranks match one process with the same global batch, every stage runs sharded,
two launchers on loopback form one two-node run, and a dead rank stops the others.

Tolerance for "the same": per-step losses within 1e-5 relative and final weights within 1e-6
absolute (fp32 on CPU; two ranks sum gradients in another order than one process does).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from alignment.scale.distributed import deepspeed_config
from alignment.config_checks import batch_plan
from alignment.records import read_result
from alignment.run import compose_config
from alignment.errors import StageError
from conftest import TINY, free_port


def _env() -> dict[str, str]:  # tests/ on the path: GRPO's reward function is imported by name there
    return {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "PYTHONPATH": str(Path(__file__).parent)}


def _run(out: Path, recipe: str, *overrides: str, timeout: float = 600) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "alignment.run", f"+recipe={recipe}", f"output_dir={out}", *TINY, *overrides]
    result = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


def _losses(stage_dir: Path) -> list[float]:
    history = read_result(stage_dir).metrics["train_loss_history"]
    assert [step for step, _ in history] == list(range(1, len(history) + 1))  # logged every step
    return [loss for _, loss in history]


# --- before launch: config and batch algebra (fast) ---------------------------------------------


@pytest.mark.parametrize("option, stage, offload", [("none", 0, False), ("zero1", 1, False), ("zero2", 2, False),
                                                     ("zero3", 3, False), ("zero3_offload", 3, True)])
def test_deepspeed_options_reach_the_trainer_config(option, stage, offload):
    cfg = compose_config(["+recipe=sft", f"deepspeed={option}"])
    ds = deepspeed_config(cfg.deepspeed)
    if stage == 0:
        assert ds is None
        return
    zero = ds["zero_optimization"]
    assert zero["stage"] == stage and ("offload_optimizer" in zero) == offload and ("offload_param" in zero) == offload
    assert ds["train_micro_batch_size_per_gpu"] == "auto"  # filled by transformers from sft.* : one source of truth
    assert zero.get("stage3_gather_16bit_weights_on_model_save", stage != 3) is True


def test_a_global_batch_is_split_over_processes_and_accumulation():
    """The recipe states sequences per optimiser step; per-device forwards (at most
    per_device_batch_size, the largest that divides each process's share) and accumulation follow
    from the process count, so 1, 2 or 4 processes train on the same batch."""
    def plan(*overrides: str) -> list[str]:
        return batch_plan(compose_config(["+recipe=sft", "sft.global_batch_size=48", "sft.per_device_batch_size=16", *overrides]))

    assert plan() == ["sft: 16 per device x 3 accumulation x 1 processes = 48 sequences per step"]
    assert plan("launcher.nproc_per_node=2") == ["sft: 12 per device x 2 accumulation x 2 processes = 48 sequences per step"]
    assert plan("launcher=slurm", "launcher.nodes=2", "launcher.gpus_per_node=2") == \
        ["sft: 12 per device x 1 accumulation x 4 processes = 48 sequences per step"]
    # The presets state a global batch: the default recipe's plan on 1 and on 2 processes.
    one, two = (batch_plan(compose_config(["+recipe=sft_then_dpo", f"launcher.nproc_per_node={n}"])) for n in (1, 2))
    assert one == ["sft: 32 per device x 1 accumulation x 1 processes = 32 sequences per step",
                   "dpo: 64 per device x 1 accumulation x 1 processes = 64 sequences per step"]
    assert two == ["sft: 16 per device x 1 accumulation x 2 processes = 32 sequences per step",
                   "dpo: 32 per device x 1 accumulation x 2 processes = 64 sequences per step"]
    # global_batch_size=null: the batch counts per device, as TRL's does.
    assert plan("sft.global_batch_size=null", "sft.gradient_accumulation_steps=2", "launcher.nproc_per_node=2") == \
        ["sft: 16 per device x 2 accumulation x 2 processes = 64 sequences per step"]


def test_a_global_batch_that_cannot_be_met_exactly_is_refused():
    with pytest.raises(StageError, match=r"sft.global_batch_size=30 does not split evenly over 4 processes: set "
                                         r"sft.global_batch_size to a multiple of 4 \(28, 32\)"):
        compose_config(["+recipe=sft", "sft.global_batch_size=30", "launcher.nproc_per_node=4"])
    with pytest.raises(StageError, match=r"sft.gradient_accumulation_steps=2 and sft.global_batch_size=32 are both set"):
        compose_config(["+recipe=sft", "sft.gradient_accumulation_steps=2"])
    with pytest.raises(StageError, match=r"grpo: 36 replies per step over 2 processes is not a multiple of grpo.num_generations=8"):
        compose_config(["+recipe=grpo", "grpo.init_from=/tmp/x", "grpo.global_batch_size=36", "launcher.nproc_per_node=2"])


def test_ppo_batches_must_split_over_ranks():
    with pytest.raises(StageError, match=r"ppo: rollout_batch_size 64 and mini_batch_size 16 must both divide evenly over 3 processes"):
        compose_config(["+recipe=sft_rm_ppo", "launcher.nproc_per_node=3", "sft.global_batch_size=48", "reward.global_batch_size=48"])
    with pytest.raises(StageError, match="ppo.rollout_batch_size=60 must be a multiple of ppo.mini_batch_size=16"):
        compose_config(["+recipe=sft_rm_ppo", "ppo.rollout_batch_size=60"])


def test_offload_and_launcher_mistakes_are_refused():
    with pytest.raises(StageError, match="offload_params=true needs ZeRO stage 3"):
        compose_config(["+recipe=sft", "deepspeed=zero2", "deepspeed.offload_params=true"])
    with pytest.raises(StageError, match="launcher.nproc_per_node=0 must be >= 1"):
        compose_config(["+recipe=sft", "launcher.nproc_per_node=0"])


# --- two processes on CPU --------------------------------------------------------------------------

SFT_STEPS = ["sft.max_steps=6", "sft.logging_every_n_steps=1", "eval.enabled=false"]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one")
    _run(out, "sft", *SFT_STEPS)  # TINY: a global batch of 16
    return out / "sft" / "sft"


@pytest.mark.integration
@pytest.mark.parametrize("option", ["none", "zero2", "zero3", "zero3_offload"])
def test_two_ranks_match_one_process_with_the_same_global_batch(tmp_path, one_process, option):
    _run(tmp_path, "sft", *SFT_STEPS, "launcher.nproc_per_node=2", f"deepspeed={option}",
         f"launcher.master_port={free_port()}")
    stage_dir = tmp_path / "sft" / "sft"
    assert _losses(stage_dir) == pytest.approx(_losses(one_process), rel=1e-5)
    ours, reference = load_file(str(stage_dir / "checkpoint" / "model.safetensors")), load_file(str(one_process / "checkpoint" / "model.safetensors"))
    assert ours.keys() == reference.keys()  # a full HF model, not ZeRO shards
    assert max((ours[k] - reference[k]).abs().max().item() for k in ours) < 1e-6
    record = read_result(stage_dir)
    assert record.launch["world_size"] == 2 and record.launch["zero_stage"] == {"none": 0, "zero2": 2, "zero3": 3, "zero3_offload": 3}[option]


@pytest.mark.integration
def test_accumulated_forwards_train_like_one_batch(tmp_path):
    """The same recipe with a device that holds a quarter of the global batch: four forwards
    accumulate into each optimiser step, and SFT then DPO log the losses of the one-forward run
    and end at its weights (what a smaller GPU, or more processes, gets from a global batch).
    DPO without RPO's NLL term: TRL averages that term over the tokens of each forward, so with
    dpo.sft_loss_weight > 0 the split changes the loss slightly (0.4% on the first step here)."""
    steps = ["sft.max_steps=4", "dpo.max_steps=3", "sft.logging_every_n_steps=1", "dpo.logging_every_n_steps=1",
             "dpo.pairs.n_prompts=32", "eval.enabled=false", "dpo.sft_loss_weight=0"]
    _run(tmp_path / "whole", "sft_then_dpo", *steps)
    _run(tmp_path / "quarter", "sft_then_dpo", *steps, "sft.per_device_batch_size=4", "dpo.per_device_batch_size=2")
    for stage in ("sft", "dpo"):
        whole, quarter = (tmp_path / run / "sft_then_dpo" / stage for run in ("whole", "quarter"))
        assert read_result(quarter).launch["batch"] == {"global": {"sft": 16, "dpo": 8}[stage], "per_device": {"sft": 4, "dpo": 2}[stage],
                                                        "accumulation": 4}
        assert _losses(quarter) == pytest.approx(_losses(whole), rel=1e-5)
        ours, reference = (load_file(str(d / "checkpoint" / "model.safetensors")) for d in (quarter, whole))
        assert max((ours[k] - reference[k]).abs().max().item() for k in ours) < 1e-5


@pytest.mark.integration
@pytest.mark.parametrize("option", ["zero2", "zero3"])
def test_every_stage_runs_sharded_on_two_ranks(tmp_path, option):
    """SFT, reward and PPO (whose sampling gathers ZeRO-3 weights), then DPO and GRPO from the same SFT."""
    ppo = ["ppo.num_rollouts=2", "ppo.rollout_batch_size=16", "ppo.mini_batch_size=8", "ppo.n_prompts=64",
           "reward.max_steps=2", "reward.global_batch_size=8", "reward.pairs.n_prompts=32"]
    launch = ["launcher.nproc_per_node=2", f"deepspeed={option}"]
    _run(tmp_path, "sft_rm_ppo", *ppo, *launch, f"launcher.master_port={free_port()}")
    run_dir = tmp_path / "sft_rm_ppo"
    _run(tmp_path, "dpo", f"dpo.init_from={run_dir / 'sft'}", "dpo.global_batch_size=8", *launch,
         f"launcher.master_port={free_port()}")
    # GRPO: TRL generates through the ZeRO engine (under ZeRO-3 it gathers the weights to sample).
    _run(tmp_path, "grpo", f"grpo.init_from={run_dir / 'sft'}", "grpo.max_steps=2", "grpo.global_batch_size=8",
         "grpo.num_generations=4", "grpo.max_new_tokens=8", "grpo.n_prompts=32", "grpo.preflight_prompts=2",
         "grpo.rewards=[{name: reward_fns:brevity}]", *launch, f"launcher.master_port={free_port()}")
    for stage_dir in (run_dir / "sft", run_dir / "reward", run_dir / "ppo", tmp_path / "dpo" / "dpo", tmp_path / "grpo" / "grpo"):
        record = read_result(stage_dir)
        assert record.status == "complete" and record.launch["world_size"] == 2
        weights = load_file(str(Path(record.checkpoint) / "model.safetensors"))
        assert all(t.numel() > 0 and torch.isfinite(t).all() for t in weights.values())  # whole tensors, not empty shards
        if record.stage == "reward":  # evaluated on its held-out pairs
            assert record.metrics["eval_pairs"] > 0 and "pairwise_accuracy" in record.metrics
        else:  # a policy: evaluated on every held-out prompt of the tiny suite
            assert record.metrics["eval_prompts"] == 14 and "gold_accuracy_sampled" in record.metrics
    assert len(read_result(run_dir / "ppo").metrics["history"]) == 2


@pytest.mark.integration
def test_two_launchers_on_loopback_form_a_two_node_run(tmp_path, one_process):
    port = free_port()
    command = [sys.executable, "-m", "alignment.run", "+recipe=sft", f"output_dir={tmp_path}", *TINY, *SFT_STEPS,
               "launcher.nnodes=2", "launcher.nproc_per_node=1",
               "launcher.master_addr=127.0.0.1", f"launcher.master_port={port}"]
    nodes = [subprocess.Popen([*command, f"launcher.node_rank={rank}"], env=_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    logs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], logs[0][-2000:] + logs[1][-2000:]
    assert "launched ranks 0-0 of 2 (node 0 of 2" in logs[0] and "launched ranks 1-1 of 2 (node 1 of 2" in logs[1]
    record = read_result(tmp_path / "sft" / "sft")
    assert record.status == "complete" and record.launch["world_size"] == 2 and record.launch["nnodes"] == 2
    assert _losses(tmp_path / "sft" / "sft") == pytest.approx(_losses(one_process), rel=1e-5)


@pytest.mark.integration
def test_a_dead_rank_stops_the_others(tmp_path):
    """kill -9 of one rank (as the OOM killer would): the launcher ends the other rank instead of
    leaving it blocked in a collective, and exits non-zero naming the dead rank."""
    command = [sys.executable, "-m", "alignment.run", "+recipe=sft", f"output_dir={tmp_path}", "data.suite.n_train=512",
               "data.suite.n_eval=14", "sft.max_steps=400", "sft.save_every_n_steps=10", "sft.global_batch_size=16",
               "eval.enabled=false", "launcher.nproc_per_node=2", f"launcher.master_port={free_port()}", "logger=none"]
    launcher = subprocess.Popen(command, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    marker = tmp_path / "sft" / "sft" / "trainer" / "checkpoint-10" / "alignment_complete.json"
    deadline = time.monotonic() + 300
    while not marker.exists():
        assert launcher.poll() is None and time.monotonic() < deadline
        time.sleep(0.1)
    ranks = subprocess.run(["pgrep", "-P", str(launcher.pid)], capture_output=True, text=True).stdout.split()
    assert len(ranks) == 2
    rank_one = next(pid for pid in ranks if "RANK=1\0" in Path(f"/proc/{pid}/environ").read_text(errors="replace"))
    started = time.monotonic()
    os.kill(int(rank_one), 9)
    log, _ = launcher.communicate(timeout=120)
    assert launcher.returncode != 0 and "rank 1 exited with code -9; stopped the other ranks" in log
    assert time.monotonic() - started < 60
    assert all(not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text().lower() for pid in ranks)
    assert read_result(tmp_path / "sft" / "sft") is None or read_result(tmp_path / "sft" / "sft").status != "complete"


def test_cpu_adam_overlap_and_buckets_reach_the_deepspeed_json():
    from alignment.config import DeepSpeedConfig
    from alignment.scale.distributed import deepspeed_config

    cuda = torch.cuda.is_available()
    plain = deepspeed_config(DeepSpeedConfig(zero_stage=2, offload_optimizer=True))
    assert plain["zero_optimization"]["overlap_comm"] is cuda and "optimizer" not in plain  # overlap: by the machine; CPU Adam: asked for
    tuned = deepspeed_config(DeepSpeedConfig(zero_stage=2, offload_optimizer=True, cpu_adam=True, overlap_comm=True,
                                             reduce_bucket_size=1000, allgather_bucket_size=2000))
    assert tuned["optimizer"] == {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"}}
    zero = tuned["zero_optimization"]
    assert zero["overlap_comm"] is True and zero["reduce_bucket_size"] == 1000 and zero["allgather_bucket_size"] == 2000
    assert "optimizer" not in deepspeed_config(DeepSpeedConfig(zero_stage=2, cpu_adam=True))  # nothing offloaded: torch's AdamW
