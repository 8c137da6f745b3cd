"""launcher=slurm: the rendered job script, and jobs on a real single-node Slurm.

The cluster tests start Slurm through slurm/local_cluster.sh (apt-get install slurm-wlm munge
when missing; needs root) and are skipped, with the reason, where that is impossible. Slurm is
never faked: a test that passes here ran sbatch, srun, a USR1 and a requeue for real.

    python -m pytest tests/test_slurm.py -q            # unit tests and, as root, the cluster tests
    python -m pytest -m slurm                          # only these
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from conftest import TINY

REPO = Path(__file__).resolve().parents[1]
CLUSTER_SCRIPT = REPO / "slurm" / "local_cluster.sh"
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "PREEMPTED"}
JOB_TIMEOUT_S = 240.0

pytestmark = pytest.mark.slurm


def slurm_config(tmp_path: Path, recipe: str, *overrides: str):
    from alignment.run import compose_config

    argv = [f"+recipe={recipe}", f"output_dir={tmp_path / 'out'}", *TINY, "launcher=slurm", *overrides]
    return compose_config(argv), argv


def command_words(script: str) -> list[str]:
    """The words of the job's inner command (the line continuations joined), as bash splits them."""
    start = script.index("\nsrun ") + 1
    command = script[start : script.index(" &\n", start)].replace("\\\n", " ")
    return shlex.split(command)


# --- the script, without a cluster ---------------------------------------------------------------


def test_dry_run_writes_the_script_without_submitting(tmp_path, monkeypatch, capsys):
    from alignment.scale import slurm

    monkeypatch.setattr(slurm.subprocess, "run", lambda *a, **k: pytest.fail("dry run called a command"))
    cfg, argv = slurm_config(tmp_path, "sft", "launcher.dry_run=true", "launcher.partition=debug", "launcher.time=00:30:00",
                             'launcher.extra_sbatch=["--qos=high","#SBATCH --exclusive"]', "launcher.signal_seconds=120",
                             "launcher.nodes=2", "launcher.gpus_per_node=4")
    assert slurm.submit(cfg, argv=argv) is None
    path = tmp_path / "out" / "sft" / "slurm" / "job.sbatch"
    script = path.read_text()
    assert script in capsys.readouterr().out
    header = [line for line in script.splitlines() if line.startswith("#SBATCH")]
    for line in ("--job-name=sft", "--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=4", "--signal=B:USR1@120", "--requeue",
                 "--partition=debug", "--time=00:30:00", "--qos=high", "--exclusive", "--open-mode=append",
                 f"--output={path.parent}/%j.out"):
        assert f"#SBATCH {line}" in header
    assert not any("--account" in line or "--mem" in line or "--constraint" in line for line in header)  # unset: left out
    assert 'scontrol requeue "$SLURM_JOB_ID"' in script and "if [[ true == true ]]" in script
    words = command_words(script)
    assert "launcher.nnodes=2" in words and "launcher.nproc_per_node=4" in words
    monkeypatch.undo()
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0  # the rendered script parses


def test_inner_command_reruns_the_overrides_on_the_local_launcher(tmp_path):
    from alignment.scale import slurm

    odd = "model.chat_template='{{ a }} $HOME; `x`'"  # spaces, quotes and shell syntax survive quoting
    cfg, argv = slurm_config(tmp_path, "sft_then_dpo", "dpo.beta=0.2", odd, "launcher.requeue=false", "launcher.cpu_procs_per_node=2",
                             "launcher.master_port=29611")
    script = slurm.render(cfg, argv=argv)
    words = command_words(script)
    assert words[words.index("-m") + 1] == "alignment.run"
    for override in ["+recipe=sft_then_dpo", "dpo.beta=0.2", odd, *TINY]:
        assert override in words
    assert "launcher=local" in words and "launcher=slurm" not in words
    assert not any(w.startswith(("launcher.requeue", "launcher.cpu_procs_per_node")) for w in words)
    for fixed in ("launcher.nnodes=1", "launcher.nproc_per_node=2", "launcher.master_port=29611", f"output_dir={tmp_path / 'out'}",
                  "run_name=sft_then_dpo"):
        assert fixed in words
    assert "launcher.master_addr=$MASTER_ADDR" in words  # expanded by the job, not here
    assert "--requeue" not in script and "if [[ false == true ]]" in script


def test_missing_sbatch_and_bad_templates_are_config_errors(tmp_path, monkeypatch):
    from alignment.scale import slurm
    from alignment.errors import ConfigError

    cfg, argv = slurm_config(tmp_path, "sft")
    monkeypatch.setattr(slurm.shutil, "which", lambda name: None)
    with pytest.raises(ConfigError, match=r"sbatch.*not on PATH.*launcher.dry_run=true"):
        slurm.submit(cfg, argv=argv)
    own = tmp_path / "own.sbatch"
    own.write_text("#!/bin/bash\n#SBATCH --nodes=$nodes\necho $SLURM_JOB_ID $jobname\n")
    cfg, argv = slurm_config(tmp_path, "sft", f"launcher.template={own}")
    with pytest.raises(ConfigError, match=r"launcher.template=.*\$jobname"):
        slurm.render(cfg, argv=argv)
    cfg, argv = slurm_config(tmp_path, "sft", f"launcher.template={tmp_path / 'nope.sbatch'}")
    with pytest.raises(ConfigError, match="launcher.template=.*no such file"):
        slurm.render(cfg, argv=argv)


# --- a real Slurm --------------------------------------------------------------------------------


def _sinfo_answers() -> bool:
    if shutil.which("sinfo") is None:
        return False
    done = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True, timeout=10)
    return done.returncode == 0 and re.match(r"(idle|mix|alloc)", done.stdout.strip()) is not None


@pytest.fixture(scope="session")
def slurm_cluster():
    """A running single-node Slurm: the one already up, or one slurm/local_cluster.sh starts."""
    started = False
    if not _sinfo_answers():
        if os.geteuid() != 0:
            pytest.skip("no Slurm answers and starting one needs root (slurm/local_cluster.sh installs slurm-wlm, starts daemons)")
        if shutil.which("slurmctld") is None and shutil.which("apt-get") is None:
            pytest.skip("no Slurm installed and no apt-get to install slurm-wlm")
        done = subprocess.run(["bash", str(CLUSTER_SCRIPT)], capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            pytest.skip(f"slurm/local_cluster.sh could not start Slurm (exit {done.returncode}): {done.stderr.strip()[-800:]}")
        started = True
    yield
    if started:
        subprocess.run(["bash", str(CLUSTER_SCRIPT), "stop"], capture_output=True, timeout=60)


def job_fields(job_id: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True, check=True).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def wait_for_job(job_id: str, log: Path) -> dict[str, str]:
    """Poll until the job ends; return its scontrol fields.

    A requeued job waits cred_expire + 1 s before it may start again (Reason=BeginTime);
    slurm/local_cluster.sh sets cred_expire=10 (Slurm's default is 120). Starting it earlier by
    hand (scontrol update starttime=now) races the revocation of its old credential: Slurm then
    kills it ("Job credential revoked"), so the test does not.
    """
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while time.monotonic() < deadline:
        fields = job_fields(job_id)
        if fields["JobState"] in FINAL_STATES:
            return fields
        time.sleep(0.5)
    subprocess.run(["scancel", job_id])
    pytest.fail(f"job {job_id} did not end in {JOB_TIMEOUT_S:.0f} s; log {log}:\n{_tail(log)}")


def _tail(log: Path, lines: int = 40) -> str:
    text = log.read_text(errors="replace") if log.exists() else "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def submit_tiny(tmp_path: Path, recipe: str, *overrides: str) -> tuple[str, Path, Path]:
    """Submit ``recipe`` with the tiny overrides; the job id, the run directory and the job's log."""
    from alignment.scale import slurm

    cfg, argv = slurm_config(tmp_path, recipe, *overrides)
    job_id = slurm.submit(cfg, argv=argv)
    run_dir = slurm.run_dir_of(cfg)
    return job_id, run_dir, run_dir / "slurm" / f"{job_id}.out"


def read_result(stage_dir: Path) -> dict:
    import json

    return json.loads((stage_dir / "result.json").read_text())


@pytest.mark.integration
def test_submitted_recipe_runs_every_stage(slurm_cluster, tmp_path):
    job_id, run_dir, log = submit_tiny(tmp_path, "sft_then_dpo")
    fields = wait_for_job(job_id, log)
    assert fields["JobState"] == "COMPLETED", _tail(log)
    for stage in ("sft", "dpo"):
        result = read_result(run_dir / stage)
        assert result["status"] == "complete"
        assert result["launch"]["slurm"]["job_id"] == job_id
        assert result["launch"]["slurm"]["restart_count"] == 0
        assert (run_dir / stage / "checkpoint" / "model.safetensors").is_file()
    assert (run_dir / "slurm" / "job.sbatch").is_file()


PREEMPT_STEPS = 300  # ~5 s of training at num_threads=1: room to signal it mid-stage
PREEMPT = [f"sft.max_steps={PREEMPT_STEPS}", "sft.save_every_n_steps=10", "eval.enabled=false"]


@pytest.mark.integration
def test_usr1_checkpoints_requeues_and_resumes_to_the_same_weights(slurm_cluster, tmp_path, run_recipe):
    import torch
    from safetensors.torch import load_file

    job_id, run_dir, log = submit_tiny(tmp_path, "sft", *PREEMPT)
    # Training has reached step 10 once its first checkpoint is marked complete (a file appears at
    # once; the job's progress output reaches the log only when its buffer flushes).
    first_checkpoint = run_dir / "sft" / "trainer" / "checkpoint-10" / "alignment_complete.json"
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not first_checkpoint.exists():
        assert time.monotonic() < deadline, f"training never started:\n{_tail(log)}"
        assert job_fields(job_id)["JobState"] not in FINAL_STATES, f"job ended before the signal:\n{_tail(log)}"
        time.sleep(0.2)
    # What Slurm does signal_seconds before the time limit (--signal=B:USR1@N): USR1 to the batch shell.
    subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], check=True)
    fields = wait_for_job(job_id, log)
    text = log.read_text(errors="replace")
    assert fields["JobState"] == "COMPLETED", _tail(log)
    assert int(fields["Restarts"]) == 1
    stopped = re.search(r"sft: stopped at step (\d+) on SIGUSR1", text)
    assert stopped and 0 < int(stopped.group(1)) < PREEMPT_STEPS, _tail(log)
    assert f"requeueing job {job_id}" in text
    assert f"resuming from {run_dir / 'sft' / 'trainer' / ('checkpoint-' + stopped.group(1))}" in text
    result = read_result(run_dir / "sft")
    assert result["status"] == "complete" and result["launch"]["slurm"]["job_id"] == job_id
    assert result["launch"]["slurm"]["restart_count"] >= 1

    # The same recipe uninterrupted, in this process with the job's thread count: same weights.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg, _ = run_recipe("sft", *PREEMPT, output_dir=tmp_path / "reference")
    finally:
        torch.set_num_threads(threads)
    from alignment.scale.slurm import run_dir_of

    reference = load_file(run_dir_of(cfg) / "sft" / "checkpoint" / "model.safetensors")
    resumed = load_file(run_dir / "sft" / "checkpoint" / "model.safetensors")
    assert reference.keys() == resumed.keys()
    for name, tensor in reference.items():
        assert torch.equal(tensor.float(), resumed[name].float()), name
