"""A real Slurm for the tests (tests/test_slurm.py, tests/test_slurm_nodes.py), and job helpers.

The cluster comes from slurm/local_cluster.sh: two nodes (n1, n2), each a slurmd in its own
network namespace, or, where namespaces cannot be made, one node on the host. It is started once
per test session, as root (the script installs Debian's slurm-wlm with apt-get when missing),
and stopped at the end by the fixture that started it; a cluster already running is used as it is.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CLUSTER_SCRIPT = REPO / "slurm" / "local_cluster.sh"
NO_NAMESPACES_EXIT = 3  # slurm/local_cluster.sh: network namespaces cannot be made here
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "PREEMPTED"}
JOB_TIMEOUT_S = 240.0


def _cluster(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(CLUSTER_SCRIPT), *args], capture_output=True, text=True, timeout=600)


def node_names() -> list[str]:
    done = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], capture_output=True, text=True, timeout=10)
    return sorted({line.split()[0] for line in done.stdout.splitlines() if re.search(r" (idle|mix|alloc)", line)})


@pytest.fixture(scope="session")
def slurm_cluster() -> list[str]:
    """A running Slurm; its usable node names. Two namespaced nodes where possible, else one."""
    if os.geteuid() != 0:
        if shutil.which("sinfo") and node_names():
            yield node_names()  # someone else's cluster, already up
            return
        pytest.skip("no Slurm answers and starting one needs root (slurm/local_cluster.sh installs slurm-wlm, starts daemons)")
    if shutil.which("slurmctld") is None and shutil.which("apt-get") is None:
        pytest.skip("no Slurm installed and no apt-get to install slurm-wlm")
    done = _cluster("start")
    if done.returncode == NO_NAMESPACES_EXIT:
        done = _cluster("start", "--single-node")
    if done.returncode != 0:
        pytest.skip(f"slurm/local_cluster.sh could not start Slurm (exit {done.returncode}): {done.stderr.strip()[-800:]}")
    started = "already running" not in done.stderr
    yield node_names()
    if started:
        _cluster("stop")


@pytest.fixture(scope="session")
def two_nodes(slurm_cluster) -> list[str]:
    """The two namespaced nodes of slurm/local_cluster.sh (skips where only one could be made)."""
    if os.geteuid() != 0:
        pytest.skip("the two-node tests need root: they look into the nodes' network namespaces and kill a node's processes")
    if len(slurm_cluster) < 2:
        pytest.skip(f"two Slurm nodes need network namespaces (ip netns add, unshare --uts), which this machine refused; "
                    f"the cluster has {slurm_cluster}")
    return slurm_cluster


def job_fields(job_id: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True, check=True).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def wait_for_job(job_id: str, log: Path, *, timeout: float = JOB_TIMEOUT_S) -> dict[str, str]:
    """Poll until the job ends; return its scontrol fields.

    A requeued job waits cred_expire + 1 s before it may start again (Reason=BeginTime);
    slurm/local_cluster.sh sets cred_expire=10 (Slurm's default is 120). Starting it earlier by
    hand (scontrol update starttime=now) races the revocation of its old credential: Slurm then
    kills it ("Job credential revoked"), so the tests do not.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        fields = job_fields(job_id)
        if fields["JobState"] in FINAL_STATES:
            return fields
        time.sleep(0.5)
    subprocess.run(["scancel", job_id])
    pytest.fail(f"job {job_id} did not end in {timeout:.0f} s; log {log}:\n{tail(log)}")


def wait_for_file(path: Path, *, job_id: str, log: Path, timeout: float = JOB_TIMEOUT_S) -> None:
    """Until ``path`` exists (a checkpoint's marker appears at once; the job's progress output
    reaches the log only when its buffer flushes); fails if the job ends first."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared:\n{tail(log)}"
        assert job_fields(job_id)["JobState"] not in FINAL_STATES, f"job {job_id} ended before {path} appeared:\n{tail(log)}"
        time.sleep(0.2)


def tail(log: Path, lines: int = 40) -> str:
    text = log.read_text(errors="replace") if log.exists() else "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def slurm_config(tmp_path: Path, recipe: str, *overrides: str):
    from alignment.run import compose_config
    from conftest import TINY

    argv = [f"+recipe={recipe}", f"output_dir={tmp_path / 'out'}", *TINY, "launcher=slurm", *overrides]
    return compose_config(argv), argv


def submit_tiny(tmp_path: Path, recipe: str, *overrides: str) -> tuple[str, Path, Path]:
    """Submit ``recipe`` with the tiny overrides through alignment's own sbatch path; the job id,
    the run directory and the job's log."""
    from alignment.scale import slurm

    cfg, argv = slurm_config(tmp_path, recipe, *overrides)
    job_id = slurm.submit(cfg, argv=argv)
    run_dir = slurm.run_dir_of(cfg)
    return job_id, run_dir, run_dir / "slurm" / f"{job_id}.out"


def read_result(stage_dir: Path) -> dict:
    return json.loads((stage_dir / "result.json").read_text())
