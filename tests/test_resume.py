"""Faults: a killed stage resumes exactly, partial checkpoints are skipped, a bad requested one is
an error, NaN stops within a step, a full disk leaves the previous checkpoint intact, and a stop
signal checkpoints at a step every rank agrees on.

"Exactly" means bit for bit: on CPU in fp32 with one torch thread, the final weights of an
interrupted-and-resumed stage equal those of an uninterrupted one (torch.equal).
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from alignment.scale import checkpoints, preemption as preempt
from alignment.errors import CheckpointError, NonFiniteLoss
from alignment.scale.checkpoints import MARKER
from alignment.records import read_result
from conftest import TINY, free_port

pytestmark = pytest.mark.integration

# The embedded default model for 60 steps (about 3.5 s of training on one core): long enough to
# interrupt from outside, short enough to stay quick.
LONG_SFT = ["data.suite.n_train=512", "data.suite.n_eval=14", "sft.max_steps=60", "sft.save_every_n_steps=10",
            "sft.global_batch_size=16", "eval.enabled=false", "num_threads=1", "logger=none"]


def _command(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "alignment.run", "+recipe=sft", f"output_dir={out}", *LONG_SFT, *extra]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}


def _weights(run_dir: Path, stage: str = "sft") -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / stage / "checkpoint" / "model.safetensors"))


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"the run ended before {path} appeared"
        assert time.monotonic() < deadline, f"{path} did not appear in {timeout} s"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference")
    subprocess.run(_command(out), check=True, env=_env(), capture_output=True)
    return out


@pytest.fixture(scope="module")
def uninterrupted(reference_run) -> dict[str, torch.Tensor]:
    return _weights(reference_run / "sft")


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_kill_9_mid_stage_resumes_to_the_same_weights(tmp_path, uninterrupted, reference_run):
    out = tmp_path / "out"
    proc = subprocess.Popen(_command(out), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for(out / "sft" / "sft" / "trainer" / "checkpoint-20" / MARKER, proc)
    proc.kill()  # SIGKILL: no handler runs, no checkpoint is written on the way out
    proc.wait()
    assert read_result(out / "sft" / "sft") is None  # no record claims the stage finished
    resumed = subprocess.run(_command(out), env=_env(), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from" in resumed.stdout + resumed.stderr
    assert _same(_weights(out / "sft"), uninterrupted)
    assert not (out / "sft" / "sft" / "trainer").exists()  # committed: its mid-stage checkpoints are removed
    # The mean loss covers all 60 steps, not only the 40 after the resume (the marker carries the sum).
    reference, after = read_result(reference_run / "sft" / "sft").metrics, read_result(out / "sft" / "sft").metrics
    assert after["train_steps"] == 60 and after["train_loss_mean"] == pytest.approx(reference["train_loss_mean"], rel=1e-6)
    assert after["train_loss_history"] == reference["train_loss_history"]


def test_partial_checkpoint_is_skipped_for_the_previous_complete_one(tmp_path, uninterrupted, caplog):
    out = tmp_path / "out"
    proc = subprocess.Popen(_command(out), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    trainer = out / "sft" / "sft" / "trainer"
    _wait_for(trainer / "checkpoint-20" / MARKER, proc)
    proc.kill()
    proc.wait()
    newest = max(trainer.glob("checkpoint-*"), key=checkpoints.step_of)
    (newest / MARKER).unlink()  # as if the kill had come during its save
    (newest / "model.safetensors").write_bytes(b"truncated")
    resumed = subprocess.run(_command(out), env=_env(), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    log = resumed.stdout + resumed.stderr
    assert f"removing checkpoint {newest}: partial" in log
    assert "resuming from" in log and newest.name not in log.split("resuming from", 1)[1].splitlines()[0]
    assert _same(_weights(out / "sft"), uninterrupted)


def test_requested_bad_checkpoint_fails_clearly(tmp_path):
    stage_dir = tmp_path / "sft"
    partial = stage_dir / "trainer" / "checkpoint-5"
    partial.mkdir(parents=True)
    with pytest.raises(CheckpointError, match="incomplete .*no alignment_complete.json"):
        checkpoints.find_resume(stage_dir, inputs_hash="abc", requested=str(partial), key="sft.resume_from")
    checkpoints.mark_complete(partial, inputs_hash="other", step=5)
    with pytest.raises(CheckpointError, match="other inputs"):
        checkpoints.find_resume(stage_dir, inputs_hash="abc", requested=str(partial), key="sft.resume_from")
    checkpoints.mark_complete(partial, inputs_hash="abc", step=5, zero_stage=2)  # then claim it came from 4 ranks
    marker = json.loads((partial / MARKER).read_text())
    (partial / MARKER).write_text(json.dumps({**marker, "layout": {"world_size": 4, "zero_stage": 2}}))
    with pytest.raises(CheckpointError, match="written by 4 process.*under ZeRO stage 2, this run has 1 under stage 2"):
        checkpoints.find_resume(stage_dir, inputs_hash="abc", requested=None, key="sft.resume_from", zero_stage=2)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        checkpoints.find_resume(stage_dir, inputs_hash="abc", requested=str(tmp_path / "nope"), key="sft.resume_from")
    # From the command line: one line naming the key, no traceback.
    result = subprocess.run([sys.executable, "-m", "alignment.run", "+recipe=sft", f"output_dir={tmp_path / 'o'}", *TINY,
                             f"sft.resume_from={partial}"], env=_env(), capture_output=True, text=True)
    assert result.returncode == 1 and "alignment: error: sft.resume_from=" in result.stderr and "Traceback" not in result.stderr


def test_checkpoint_from_other_inputs_is_not_resumed(tmp_path):
    trainer = tmp_path / "sft" / "trainer"
    for step, inputs in ((2, "this-config"), (4, "a-different-config")):
        (trainer / f"checkpoint-{step}").mkdir(parents=True)
        checkpoints.mark_complete(trainer / f"checkpoint-{step}", inputs_hash=inputs, step=step)
    (trainer / "checkpoint-6").mkdir()  # partial: no marker
    found = checkpoints.find_resume(tmp_path / "sft", inputs_hash="this-config", requested=None, key="sft.resume_from")
    assert found == trainer / "checkpoint-2"
    assert sorted(p.name for p in trainer.iterdir()) == ["checkpoint-2"]  # the foreign and the partial one removed


def test_nan_loss_stops_within_one_step_and_keeps_the_last_good_checkpoint(tmp_path, run_recipe):
    with pytest.raises(NonFiniteLoss, match=r"sft: the (loss|gradient) became .* at step \d+") as caught:
        run_recipe("sft", "sft.learning_rate=1e30", "sft.max_steps=8", "sft.save_every_n_steps=1", "sft.warmup_ratio=0",
                   "sft.max_grad_norm=1e30", output_dir=tmp_path)
    step = int(str(caught.value).split("at step ")[1].split(";")[0])
    trainer = tmp_path / "sft" / "sft" / "trainer"
    complete = sorted(checkpoints.step_of(p) for p in trainer.glob("checkpoint-*") if (p / MARKER).is_file())
    assert complete and complete[-1] == step - 1  # the step before the bad one, saved and marked
    assert all(torch.isfinite(t).all() for t in load_file(str(trainer / f"checkpoint-{step - 1}" / "model.safetensors")).values())
    assert read_result(tmp_path / "sft" / "sft").status == "failed"


def test_disk_full_while_saving_keeps_the_previous_checkpoint(tmp_path, run_recipe, monkeypatch):
    """The write fails as a full disk fails (OSError ENOSPC from the file write) at the third save."""
    import transformers.modeling_utils as modeling  # save_pretrained writes through this name

    real_save, calls = modeling.safe_save_file, {"n": 0}

    def filling_disk(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(*args, **kwargs)

    monkeypatch.setattr(modeling, "safe_save_file", filling_disk)
    with pytest.raises(CheckpointError, match="disk filled up .*previous complete one is intact"):
        run_recipe("sft", "sft.save_every_n_steps=1", "sft.max_steps=4", output_dir=tmp_path)
    trainer = tmp_path / "sft" / "sft" / "trainer"
    complete = [p.name for p in trainer.glob("checkpoint-*") if (p / MARKER).is_file()]
    assert complete == ["checkpoint-2"] or sorted(complete) == ["checkpoint-1", "checkpoint-2"]
    assert load_file(str(trainer / "checkpoint-2" / "model.safetensors"))  # still reads back
    monkeypatch.setattr(modeling, "safe_save_file", real_save)
    _, results = run_recipe("sft", "sft.save_every_n_steps=1", "sft.max_steps=4", output_dir=tmp_path)
    assert results[0].status == "complete"


def test_disk_full_at_the_stage_boundary_leaves_the_old_checkpoint(tmp_path, run_recipe, monkeypatch):
    _, first = run_recipe("sft", output_dir=tmp_path)
    before = _weights(tmp_path / "sft")
    import transformers.modeling_utils as modeling

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(modeling, "safe_save_file", full)
    from alignment.errors import StageError

    with pytest.raises(StageError, match="could not write the checkpoint .*No space left.*previous checkpoint, if any, is unchanged"):
        run_recipe("sft", "sft.learning_rate=2e-3", "sft.save_every_n_steps=0", output_dir=tmp_path)
    assert _same(_weights(tmp_path / "sft"), before)
    assert not list((tmp_path / "sft" / "sft").glob(".checkpoint.tmp-*"))


def test_stop_request_checkpoints_and_resume_is_exact_for_ppo(tmp_path, run_recipe, monkeypatch):
    """PPO's own loop: a stop after rollout 2 writes checkpoint-2; the rerun resumes there and
    ends with the same policy as an uninterrupted run."""
    ppo = ["ppo.num_rollouts=4", "ppo.rollout_batch_size=16", "ppo.mini_batch_size=8", "ppo.n_prompts=64",
           "reward.max_steps=2", "reward.pairs.n_prompts=32", "reward.global_batch_size=8", "eval.enabled=false"]
    run_recipe("sft_rm_ppo", *ppo, output_dir=tmp_path / "plain")
    from alignment.stages.ppo import health

    real_observe, seen = health.HealthCheck.observe, {"n": 0}

    def observe_then_stop(self, stats):
        seen["n"] += 1
        if seen["n"] == 2:
            preempt.request("test")
        return real_observe(self, stats)

    monkeypatch.setattr(health.HealthCheck, "observe", observe_then_stop)
    try:
        with pytest.raises(preempt.Preempted, match="stopped after rollout 2"):
            run_recipe("sft_rm_ppo", *ppo, output_dir=tmp_path / "stopped")
    finally:
        preempt.reset()
    run_dir = tmp_path / "stopped" / "sft_rm_ppo"
    assert read_result(run_dir / "ppo").status == "preempted"
    assert (run_dir / "ppo" / "trainer" / "checkpoint-2" / MARKER).is_file()
    monkeypatch.setattr(health.HealthCheck, "observe", real_observe)
    _, results = run_recipe("sft_rm_ppo", *ppo, output_dir=tmp_path / "stopped")
    assert [r.status for r in results] == ["complete"] * 3
    assert len(results[2].metrics["history"]) == 4
    assert _same(_weights(run_dir, "ppo"), _weights(tmp_path / "plain" / "sft_rm_ppo", "ppo"))


def test_sigusr1_on_two_ranks_stops_both_at_one_step_then_resumes_exactly(tmp_path, uninterrupted):
    """Slurm's warning signal, sent to the launcher: it forwards it, both ranks stop after the same
    step and checkpoint, the command exits 75 (requeue me), and a rerun finishes like an
    uninterrupted one-process run with the same global batch."""
    out = tmp_path / "out"
    command = _command(out, "launcher.nproc_per_node=2", f"launcher.master_port={free_port()}")
    proc = subprocess.Popen(command, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _wait_for(out / "sft" / "sft" / "trainer" / "checkpoint-10" / MARKER, proc)
    proc.send_signal(signal.SIGUSR1)
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == preempt.PREEMPTED_EXIT, log[-3000:]
    record = read_result(out / "sft" / "sft")
    assert record.status == "preempted" and "stopped at step" in record.error
    stopped = int(record.error.split("stopped at step ")[1].split()[0])
    assert 10 <= stopped < 60
    marker = json.loads((out / "sft" / "sft" / "trainer" / f"checkpoint-{stopped}" / MARKER).read_text())
    assert marker["step"] == stopped  # both ranks' shards and RNG states written, then marked
    assert sorted(p.name for p in (out / "sft" / "sft" / "trainer" / f"checkpoint-{stopped}").glob("rng_state_*.pth")) == \
        ["rng_state_0.pth", "rng_state_1.pth"]
    resumed = subprocess.run(command, env=_env(), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert read_result(out / "sft" / "sft").status == "complete"
    final = _weights(out / "sft")  # two ranks sum gradients in another order than one: not bit-equal
    assert all(torch.allclose(final[k], uninterrupted[k], atol=1e-5, rtol=0) for k in final)


# DPO on an SFT checkpoint with 64 pair-sampling batches (of 16 replies): long enough to stop
# from outside while it samples.
SAMPLED_DPO = ["+recipe=dpo", "data.suite.n_train=512", "data.suite.n_eval=14", "dpo.pairs.n_prompts=256", "dpo.pairs.batch_size=16",
               "dpo.max_steps=3", "dpo.global_batch_size=8", "eval.enabled=false", "num_threads=1", "logger=none"]


def test_sigterm_while_sampling_pairs_stops_in_seconds_and_the_rerun_reuses_the_pairs(tmp_path, reference_run):
    sft = reference_run / "sft" / "sft"
    command = [sys.executable, "-m", "alignment.run", *SAMPLED_DPO, f"dpo.init_from={sft}"]
    subprocess.run([*command, f"output_dir={tmp_path / 'whole'}"], check=True, env=_env(), capture_output=True)
    out = tmp_path / "stopped"
    proc = subprocess.Popen([*command, f"output_dir={out}"], env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    journal = out / "dpo" / "dpo" / checkpoints.SAMPLING_DIR
    deadline = time.monotonic() + 120
    while len(list(journal.glob("*/train/batch-*.pt"))) < 3:
        assert proc.poll() is None and time.monotonic() < deadline, "sampling did not start"
        time.sleep(0.05)
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    log, _ = proc.communicate(timeout=60)
    took = time.monotonic() - sent
    assert proc.returncode == preempt.PREEMPTED_EXIT and took < 30, (proc.returncode, took, log[-2000:])
    assert "stopped while sampling on SIGTERM" in log and read_result(out / "dpo" / "dpo").status == "preempted"
    kept = len(list(journal.glob("*/train/batch-*.pt")))
    assert 3 <= kept < 64
    resumed = subprocess.run([*command, f"output_dir={out}"], env=_env(), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming sampling: {kept} of 64 batches" in resumed.stdout + resumed.stderr
    assert _same(_weights(out / "dpo", "dpo"), _weights(tmp_path / "whole" / "dpo", "dpo"))
    assert read_result(out / "dpo" / "dpo").data == read_result(tmp_path / "whole" / "dpo" / "dpo").data
    assert not journal.exists(), "the journal goes once the stage is committed"
