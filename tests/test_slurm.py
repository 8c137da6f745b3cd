"""launcher=slurm: the rendered job script, and one-node jobs on a real Slurm.

The cluster tests start Slurm through slurm/local_cluster.sh (tests/slurm_cluster.py; apt-get
install slurm-wlm munge when missing; needs root) and are skipped, with the reason, where that is
impossible. Slurm is never faked: a test that passes here ran sbatch, srun, a USR1 and a requeue
for real. Two-node runs, preemption and a failed node: tests/test_slurm_nodes.py.

    python -m pytest tests/test_slurm.py -q            # unit tests and, as root, the cluster tests
    python -m pytest -m slurm                          # only these
"""

from __future__ import annotations

import re
import shlex
import subprocess

import pytest

from conftest import TINY
from slurm_cluster import read_result, slurm_cluster, slurm_config, submit_tiny, tail, wait_for_file, wait_for_job  # noqa: F401 (a fixture)

pytestmark = pytest.mark.slurm  # run apart from the xdist workers (README's test command): one cluster, one test at a time


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


@pytest.mark.integration
def test_submitted_recipe_runs_every_stage(slurm_cluster, tmp_path):
    job_id, run_dir, log = submit_tiny(tmp_path, "sft_then_dpo")
    fields = wait_for_job(job_id, log)
    assert fields["JobState"] == "COMPLETED", tail(log)
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
    # Training has reached step 10 once its first checkpoint is marked complete.
    wait_for_file(run_dir / "sft" / "trainer" / "checkpoint-10" / "alignment_complete.json", job_id=job_id, log=log)
    # What Slurm does signal_seconds before the time limit (--signal=B:USR1@N): USR1 to the batch shell.
    subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], check=True)
    fields = wait_for_job(job_id, log)
    text = log.read_text(errors="replace")
    assert fields["JobState"] == "COMPLETED", tail(log)
    assert int(fields["Restarts"]) == 1
    stopped = re.search(r"sft: stopped at step (\d+) on SIGUSR1", text)
    assert stopped and 0 < int(stopped.group(1)) < PREEMPT_STEPS, tail(log)
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
