"""GRPO and RLOO stages: they train the policy on TRL's trainers, the reward pre-flight stops a
reward that cannot teach before the first update, config mistakes stop before anything loads,
and a GRPO stage killed with SIGKILL resumes to bit-equal weights.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from alignment.errors import StageError
from alignment.records import read_result
from alignment.rewards.preflight import PreflightFailed
from alignment.run import compose_config
from alignment.scale.checkpoints import MARKER
from conftest import TINY

pytestmark = pytest.mark.integration

ONLINE = ["grpo.max_steps=3", "grpo.global_batch_size=8", "grpo.num_generations=4", "grpo.max_new_tokens=8", "grpo.n_prompts=64",
          "grpo.preflight_prompts=4", "grpo.logging_every_n_steps=1", "rloo.logging_every_n_steps=1", "rloo.max_steps=3", "rloo.global_batch_size=8", "rloo.num_generations=4",
          "rloo.max_new_tokens=8", "rloo.n_prompts=64", "rloo.preflight_prompts=4"]


def _weights(stage_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(stage_dir / "checkpoint" / "model.safetensors"))


@pytest.mark.parametrize("stage", ["grpo", "rloo"])
def test_online_stage_trains_the_policy_and_records_rewards(run_recipe, tmp_path, stage):
    _, results = run_recipe(f"sft_then_{stage}", *ONLINE, f"{stage}.rewards=[{{name: reward_fns:brevity}}]")
    sft, online = results
    assert [r.status for r in results] == ["complete", "complete"] and online.parent_stage == "sft"
    before, after = _weights(tmp_path / "out" / f"sft_then_{stage}" / "sft"), _weights(tmp_path / "out" / f"sft_then_{stage}" / stage)
    assert any(not torch.equal(before[k], after[k]) for k in before), "the policy's weights changed"
    assert [step for step, _ in online.metrics["train_reward_history"]] == [1, 2, 3]  # TRL's mean reward, logged every step
    assert online.metrics["train_reward_final"] == online.metrics["train_reward_history"][-1][1] < 0  # -length
    preflight = online.data["preflight"]["brevity"]
    assert preflight["groups"] == 4 and preflight["samples_nan"] == 0 and preflight["groups_with_spread"] >= 1
    assert preflight["references_mean"] > preflight["samples_mean"], "the suite's short answers beat long samples"
    kl = online.metrics["kl_to_parent"]
    assert kl == kl  # not NaN: the parent was loaded as the reference
    # The run's report places the stage on the frontier: its parent at KL 0, the stage at its KL.
    report = (tmp_path / "out" / f"sft_then_{stage}" / "report" / "report.md").read_text()
    assert (tmp_path / "out" / f"sft_then_{stage}" / "report" / "frontier.png").is_file()
    assert f"| sft_then_{stage} | sft |  | 0.000 | {sft.metrics['gold_accuracy_sampled']:.3f} |" in report
    assert f"| sft_then_{stage} | {stage} | beta=0 | {kl:.3f} | {online.metrics['gold_accuracy_sampled']:.3f} |" in report


@pytest.mark.parametrize("name, message", [
    ("reward_fns:constant", r"constant is constant within every one of 4 groups \(samples mean 1, std 0\)"),
    ("reward_fns:sometimes_nan", r"sometimes_nan is NaN \(or inf\) on \d+ of 16 samples"),
    ("reward_fns:wrong_is_better", r"wrong_is_better scores the reference answers lower than the policy's own samples on average \(0 against 1\.\d+\)"),
])
def test_preflight_stops_a_reward_that_cannot_teach_before_the_first_update(run_recipe, tmp_path, name, message):
    with pytest.raises(PreflightFailed, match=message):
        run_recipe("sft_then_grpo", *ONLINE, f"grpo.rewards=[{{name: {name}}}]")
    stage_dir = tmp_path / "out" / "sft_then_grpo" / "grpo"
    assert read_result(stage_dir).status == "failed" and not (stage_dir / "trainer").exists(), "no update was made"


def test_grpo_with_lora_trains_the_adapter_and_measures_kl_against_the_base(run_recipe):
    """LoRA: the stage trains an adapter, the boundary is a merged checkpoint, and the KL is taken
    against the adapter-disabled network (no second model)."""
    _, results = run_recipe("sft_then_grpo", *ONLINE, "model.peft=lora", "grpo.rewards=[{name: reward_fns:brevity}]")
    grpo = results[1]
    assert grpo.status == "complete" and grpo.inputs["peft"]["adapter"].endswith("adapter")
    assert grpo.metrics["kl_to_parent"] == grpo.metrics["kl_to_parent"]


def test_preflight_can_be_switched_off(run_recipe):
    _, results = run_recipe("sft_then_grpo", *ONLINE, "grpo.rewards=[{name: reward_fns:constant}]", "grpo.preflight=false")
    assert results[1].status == "complete" and "preflight" not in results[1].data


def test_grpo_against_the_chains_reward_model_with_weights(run_recipe):
    """sft_rm_grpo: the reward stage's model scores the sampled ids; a user function joins it with a weight."""
    _, results = run_recipe("sft_rm_grpo", *ONLINE, "reward.max_steps=2", "reward.global_batch_size=8",
                            "reward.pairs.n_prompts=16", "grpo.preflight=false",
                            "grpo.rewards=[{name: reward_model}, {name: reward_fns:brevity, weight: 0.01}]")
    grpo = results[2]
    assert grpo.status == "complete" and grpo.inputs["reward_model"]["stage"] == "reward"
    assert "reward_model_score" in grpo.metrics


@pytest.mark.parametrize("overrides, message", [
    (["grpo.rewards=[{name: no_such_module:f}]"], r"grpo\.rewards\[0\]: cannot import 'no_such_module'"),
    (["grpo.rewards=[{name: reward_fns:not_a_function}]"], r"grpo\.rewards\[0\]: reward_fns has no function 'not_a_function'"),
    (["grpo.rewards=[{name: verifier_typo}]"], r"grpo\.rewards\[0\]: 'verifier_typo' is not a reward"),
    (["grpo.rewards=[{name: reward_model}]"], r"reward_model needs a reward model: put a reward stage before grpo"),
    (["grpo.rewards=[]"], r"grpo\.rewards is empty"),
    (["grpo.num_generations=3"], r"64 replies per step over 1 processes is not a multiple of grpo\.num_generations=3 .*"
                                 r"e\.g\. grpo\.global_batch_size=63"),
    (["grpo.num_generations=3", "launcher.nproc_per_node=2"], r"e\.g\. grpo\.global_batch_size=66"),
    (["grpo.num_generations=1"], r"grpo\.num_generations=1 must be >= 2"),
    (["grpo.temperature=0"], r"grpo\.temperature=0\.0 must be > 0"),
    (["grpo.beta=-0.1"], r"grpo: beta must be >= 0"),
    (["grpo.max_seq_tokens=20"], r"grpo: max_seq_tokens=20 must leave at least 8 prompt tokens after max_new_tokens=16"),
    (["grpo.use_vllm=true"], r"grpo\.use_vllm=true needs a CUDA GPU"),
])
def test_online_rl_config_mistakes_stop_before_anything_loads(overrides, message):
    if "use_vllm" in overrides[0] and torch.cuda.is_available():
        pytest.skip("the message without a GPU; on a GPU machine vLLM's absence is reported instead")
    with pytest.raises(StageError, match=message):
        compose_config(["+recipe=sft_then_grpo", *overrides])


def test_the_verifier_needs_the_task_suite(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "say hi"}\n')
    with pytest.raises(StageError, match=r"grpo\.rewards\[0\]: the verifier checks the built-in task suite's answers only"):
        compose_config(["+recipe=sft_then_grpo", f"grpo.data_path={prompts}"])


RESUMABLE = [*TINY, *ONLINE, "grpo.max_steps=12", "grpo.save_every_n_steps=4", "grpo.rewards=[{name: reward_fns:brevity}]",
             "eval.enabled=false"]


def _command(out: Path) -> list[str]:
    return [sys.executable, "-m", "alignment.run", "+recipe=sft_then_grpo", f"output_dir={out}", *RESUMABLE]


def _env() -> dict[str, str]:
    import os

    return {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "PYTHONPATH": str(Path(__file__).parent)}


def test_kill_9_mid_grpo_resumes_to_bit_equal_weights(tmp_path):
    reference = subprocess.run(_command(tmp_path / "plain"), env=_env(), capture_output=True, text=True)
    assert reference.returncode == 0, reference.stderr[-3000:]
    out = tmp_path / "killed"
    proc = subprocess.Popen(_command(out), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = out / "sft_then_grpo" / "grpo" / "trainer" / "checkpoint-4" / MARKER
    import time

    deadline = time.monotonic() + 300
    while not marker.exists():
        assert proc.poll() is None, "the run ended before its first GRPO checkpoint"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    assert read_result(out / "sft_then_grpo" / "grpo") is None
    resumed = subprocess.run(_command(out), env=_env(), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout + resumed.stderr
    a, b = _weights(out / "sft_then_grpo" / "grpo"), _weights(tmp_path / "plain" / "sft_then_grpo" / "grpo")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    history = read_result(out / "sft_then_grpo" / "grpo").metrics["train_reward_history"]
    assert history == read_result(tmp_path / "plain" / "sft_then_grpo" / "grpo").metrics["train_reward_history"]


def test_validate_runs_the_preflight_without_training(run_recipe, tmp_path):
    """``alignment.validate --preflight``: the same check, on a named policy, and nothing trained."""
    _, results = run_recipe("sft", "sft.max_steps=2")
    sft_dir = tmp_path / "out" / "sft" / "sft"
    base = [sys.executable, "-m", "alignment.validate", "--preflight", "+recipe=grpo", f"grpo.init_from={sft_dir}", *TINY, *ONLINE,
            f"output_dir={tmp_path / 'validate'}"]
    ok = subprocess.run([*base, "grpo.rewards=[{name: reward_fns:brevity}]"], env=_env(), capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stdout[-2000:] + ok.stderr[-2000:]
    assert "[grpo] reward pre-flight on" in ok.stdout and "brevity: samples mean -" in ok.stdout and "data and rewards ok" in ok.stdout
    bad = subprocess.run([*base, "grpo.rewards=[{name: reward_fns:constant}]"], env=_env(), capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1 and "constant is constant within every one of 4 groups" in bad.stdout
    assert not (tmp_path / "validate").exists() or not list((tmp_path / "validate").rglob("checkpoint")), "nothing was trained"
