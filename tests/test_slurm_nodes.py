"""launcher=slurm across two Slurm nodes, and the three ways such a run is interrupted.

The nodes are those of slurm/local_cluster.sh: two slurmd daemons on this machine, each in its
own network namespace with its own hostname (n1, n2) and address (10.213.0.11, .12), sharing the
filesystem. Every job goes through alignment's own sbatch path (alignment/scale/slurm.py renders
slurm/job.sbatch and runs sbatch); inside it srun starts one launcher per node, each launcher one
rank, and the two ranks train SFT under ZeRO-3 with gloo, meeting at n1's address.

Each interruption must end with the weights of the uninterrupted two-node run, bit for bit
(CPU, fp32, one thread per rank; compared with torch.equal):

- USR1, as Slurm sends it before the time limit: the ranks checkpoint, the script requeues;
- preemption by a job of the higher-priority partition: Slurm sends TERM, the ranks checkpoint
  within KillWait, Slurm requeues the job;
- kill -9 of every process of the job on n2: the job fails within seconds naming n2 and its
  rank; resubmitting the script resumes from the newest complete checkpoint.

Needs root (the cluster fixture starts Slurm and makes the namespaces); skipped with the reason
otherwise, or where network namespaces cannot be made.

    python -m pytest tests/test_slurm_nodes.py -q -s     # -s shows the measured times
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from slurm_cluster import job_fields, slurm_cluster, submit_tiny, tail, two_nodes, wait_for_file, wait_for_job  # noqa: F401 (fixtures)

pytestmark = [pytest.mark.slurm, pytest.mark.integration]

STEPS = 200  # ~20-40 s of training on two ranks: room to interrupt it after the first checkpoint
TWO_NODES = ["launcher.nodes=2", "deepspeed=zero3", f"sft.max_steps={STEPS}", "sft.save_every_n_steps=10",
             "eval.enabled=false"]  # TINY's global batch of 16: 8 per node


def submit(tmp_path: Path, port: int) -> tuple[str, Path, Path]:
    return submit_tiny(tmp_path, "sft", *TWO_NODES, f"launcher.master_port={port}")


def first_checkpoint(run_dir: Path) -> Path:
    return run_dir / "sft" / "trainer" / "checkpoint-10" / "alignment_complete.json"


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "sft" / "checkpoint" / "model.safetensors"))


def assert_same_weights(run_dir: Path, reference: dict[str, torch.Tensor]) -> None:
    resumed = weights(run_dir)
    assert resumed.keys() == reference.keys()
    for name, tensor in reference.items():
        assert torch.equal(tensor, resumed[name]), f"{name} differs from the uninterrupted run"


def report(what: str, seconds: float) -> None:
    print(f"\n[two nodes] {what}: {seconds:.1f} s", flush=True)


@pytest.fixture(scope="module")
def reference(two_nodes, tmp_path_factory) -> dict[str, torch.Tensor]:
    """The uninterrupted two-node run's final weights."""
    started = time.monotonic()
    job_id, run_dir, log = submit(tmp_path_factory.mktemp("reference"), 29510)
    fields = wait_for_job(job_id, log)
    assert fields["JobState"] == "COMPLETED", tail(log)
    report("uninterrupted run (submit to COMPLETED)", time.monotonic() - started)
    text = log.read_text(errors="replace")
    assert "launched ranks 0-0 of 2 (node 0 of 2, rendezvous n1:29510)" in text
    assert "launched ranks 1-1 of 2 (node 1 of 2, rendezvous n1:29510)" in text
    assert "n1: node 0, ranks 0-0; n2: node 1, ranks 1-1;" in text
    return weights(run_dir)


def test_each_node_has_its_own_hostname_and_address(two_nodes):
    done = subprocess.run(["srun", "-N2", "--ntasks-per-node=1", "bash", "-c",
                           'echo "$SLURM_NODEID $(hostname) $(getent hosts $(hostname) | cut -d" " -f1)"'],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert sorted(done.stdout.split("\n")[:2]) == ["0 n1 10.213.0.11", "1 n2 10.213.0.12"]


def test_usr1_before_the_time_limit_checkpoints_requeues_and_resumes(reference, tmp_path):
    started = time.monotonic()
    job_id, run_dir, log = submit(tmp_path, 29511)
    wait_for_file(first_checkpoint(run_dir), job_id=job_id, log=log)
    # What Slurm does signal_seconds before the time limit (--signal=B:USR1@N): USR1 to the batch
    # shell only (the same job_signal call in slurmctld); the script passes it on through srun.
    subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], check=True)
    fields = wait_for_job(job_id, log)
    report("USR1, requeue, resume (submit to COMPLETED)", time.monotonic() - started)
    text = log.read_text(errors="replace")
    assert fields["JobState"] == "COMPLETED" and int(fields["Restarts"]) == 1, tail(log)
    stopped = re.search(r"sft: stopped at step (\d+) on SIGUSR1", text)
    assert stopped and 0 < int(stopped.group(1)) < STEPS, tail(log)
    # Both nodes' ranks stopped after the checkpoint (exit 75), none was killed on the way out.
    assert f"stopped after a checkpoint (exit 75): requeueing job {job_id}" in text, tail(log)
    assert f"resuming from {run_dir / 'sft' / 'trainer' / ('checkpoint-' + stopped.group(1))}" in text
    assert_same_weights(run_dir, reference)


def test_preemption_by_a_higher_priority_job_requeues_and_resumes(reference, tmp_path):
    started = time.monotonic()
    job_id, run_dir, log = submit(tmp_path, 29512)
    wait_for_file(first_checkpoint(run_dir), job_id=job_id, log=log)
    # Partition `high` (PriorityTier=2) over the same nodes; both whole nodes: Slurm preempts the
    # job of partition `local` (PreemptMode=REQUEUE): TERM to its processes, KILL after KillWait.
    high_log = tmp_path / "high-%j.out"
    high = subprocess.run(["sbatch", "--parsable", "--partition=high", "--nodes=2", "--exclusive", f"--output={high_log}",
                           "--wrap", "srun hostname"], capture_output=True, text=True, check=True).stdout.strip()
    fields = wait_for_job(job_id, log)
    report("preempted, requeued by Slurm, resumed (submit to COMPLETED)", time.monotonic() - started)
    text = log.read_text(errors="replace")
    assert fields["JobState"] == "COMPLETED" and int(fields["Restarts"]) == 1, tail(log)
    assert job_fields(high)["JobState"] == "COMPLETED"
    assert f"JOB {job_id} ON n1 CANCELLED AT" in text and "DUE TO PREEMPTION" in text
    assert "srun: error: n1: task 0: Exited with exit code 75" in text and "srun: error: n2: task 1: Exited with exit code 75" in text
    stopped = re.search(r"sft: stopped at step (\d+) on SIGTERM", text)
    assert stopped and 0 < int(stopped.group(1)) < STEPS, tail(log)
    assert f"resuming from {run_dir / 'sft' / 'trainer' / ('checkpoint-' + stopped.group(1))}" in text
    assert_same_weights(run_dir, reference)


def processes_of_job_on(node: str, job_id: str) -> list[int]:
    """The job's launcher and ranks on ``node``: the alignment processes in its network namespace."""
    pids = subprocess.run(["ip", "netns", "pids", f"slurm-{node}"], capture_output=True, text=True, check=True).stdout.split()
    found = []
    for pid in pids:
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            command = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:  # ended meanwhile
            continue
        if f"SLURM_JOB_ID={job_id}".encode() in environ and b"alignment.run" in command:
            found.append(int(pid))
    return found


def test_a_killed_node_fails_the_job_naming_it_and_a_resubmission_resumes(reference, tmp_path):
    started = time.monotonic()
    job_id, run_dir, log = submit(tmp_path, 29513)
    wait_for_file(first_checkpoint(run_dir), job_id=job_id, log=log)
    victims = processes_of_job_on("n2", job_id)
    assert len(victims) == 2, f"expected n2's launcher and rank, found {victims}"  # one rank per node
    killed_at = time.monotonic()
    for pid in victims:
        os.kill(pid, 9)
    fields = wait_for_job(job_id, log, timeout=120)
    to_failure = time.monotonic() - killed_at
    report("kill -9 of n2's processes to the job's end (FAILED)", to_failure)
    text = log.read_text(errors="replace")
    assert fields["JobState"] == "FAILED", tail(log)
    assert "srun: error: n2: task 1: Killed" in text, tail(log)
    assert f"job {job_id} failed" in text and "node n2 (node rank 1, ranks 1-1) ended first: Killed" in text, tail(log)
    assert to_failure < 60, f"the job took {to_failure:.0f} s to fail"

    script = run_dir / "slurm" / "job.sbatch"
    assert f"resubmit to resume from the newest complete checkpoint: sbatch {script}" in text
    again = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True, check=True).stdout.strip()
    again_log = run_dir / "slurm" / f"{again}.out"
    fields = wait_for_job(again, again_log)
    report("kill, failure, resubmission, resume (first submit to COMPLETED)", time.monotonic() - started)
    assert fields["JobState"] == "COMPLETED", tail(again_log)
    assert re.search(rf"resuming from {re.escape(str(run_dir / 'sft' / 'trainer'))}/checkpoint-\d+ ", again_log.read_text()), tail(again_log)
    assert_same_weights(run_dir, reference)
