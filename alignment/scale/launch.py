"""Start the ranks of one node and watch them: the local launcher.

    python -m alignment.run +recipe=sft_then_dpo launcher.nproc_per_node=2 deepspeed=zero2
    # node 0 and node 1 of a two-node run (same command on each, its own node_rank):
    python -m alignment.run +recipe=sft_then_dpo launcher.nnodes=2 launcher.node_rank=0 \\
        launcher.master_addr=10.0.0.1 launcher.master_port=29500 launcher.nproc_per_node=8

``alignment.run`` calls :func:`launch` when the run needs more than one process. It re-runs the
same command line once per local rank with RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE,
MASTER_ADDR and MASTER_PORT set (torch's env:// rendezvous), then:

- forwards SIGUSR1/SIGTERM/SIGINT to every rank (Slurm's warning signal reaches the trainers,
  which stop at the same step and checkpoint: alignment/scale/preemption.py);
- when one rank fails, stops the others (instead of leaving them blocked in a collective until
  a timeout) and exits with the failed rank's code, naming it and this node.

Under Slurm (alignment/scale/slurm.py) srun starts one launcher per node; when a node's launcher
exits non-zero, srun ends the other nodes' steps, and the job script names the node that failed.

Written here rather than using torchrun because torchrun's agent dies on SIGUSR1 instead of
passing it on, and its restarts would fight Slurm's requeue.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Optional

from alignment.config import LauncherConfig
from alignment.scale.preemption import PREEMPTED_EXIT

log = logging.getLogger(__name__)
LAUNCHED_ENV = "ALIGNMENT_LAUNCHED"  # set in each rank, so it runs the pipeline instead of launching
_FORWARDED = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)
_GRACE_SECONDS = 30.0  # after one rank fails, the others get this long to exit before SIGKILL


def node_rank(cfg: LauncherConfig) -> int:
    if cfg.node_rank is not None:
        return cfg.node_rank
    return int(os.environ.get("SLURM_NODEID", "0"))


def needs_launch(cfg: LauncherConfig) -> bool:
    return cfg.nproc_per_node * cfg.nnodes > 1 and os.environ.get(LAUNCHED_ENV) != "1"


def rank_env(cfg: LauncherConfig, *, local_rank: int, threads: int) -> dict[str, str]:
    world = cfg.nproc_per_node * cfg.nnodes
    global_rank = node_rank(cfg) * cfg.nproc_per_node + local_rank
    env = dict(os.environ)
    env.update(
        {
            LAUNCHED_ENV: "1",
            "RANK": str(global_rank),
            "LOCAL_RANK": str(local_rank),
            "WORLD_SIZE": str(world),
            "LOCAL_WORLD_SIZE": str(cfg.nproc_per_node),
            "GROUP_RANK": str(node_rank(cfg)),
            "MASTER_ADDR": cfg.master_addr,
            "MASTER_PORT": str(cfg.master_port),
            "OMP_NUM_THREADS": str(threads),
        }
    )
    return env


def launch(cfg: LauncherConfig, argv: list[str], *, threads_per_rank: int) -> int:
    """Run ``python -m alignment.run <argv>`` once per local rank; return the exit code."""
    if node_rank(cfg) >= cfg.nnodes:
        raise SystemExit(f"alignment: error: launcher.node_rank={node_rank(cfg)} must be < launcher.nnodes={cfg.nnodes}")
    command = [sys.executable, "-m", "alignment.run", *argv]
    procs: list[subprocess.Popen] = []
    for local_rank in range(cfg.nproc_per_node):
        env = rank_env(cfg, local_rank=local_rank, threads=threads_per_rank)
        procs.append(subprocess.Popen(command, env=env, start_new_session=True))
    first = node_rank(cfg) * cfg.nproc_per_node
    log.info("launched ranks %d-%d of %d (node %d of %d, rendezvous %s:%d)", first, first + cfg.nproc_per_node - 1,
             cfg.nproc_per_node * cfg.nnodes, node_rank(cfg), cfg.nnodes, cfg.master_addr, cfg.master_port)

    received: list[str] = []

    def forward(signum, _frame):
        received.append(signal.Signals(signum).name)
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signum)

    for sig in _FORWARDED:
        signal.signal(sig, forward)
    code = _wait(procs, first_rank=first, node=f"node {node_rank(cfg)}, host {socket.gethostname()}", received=received)
    # The ranks have ended. Under Slurm, srun answers the first node's exit with TERM to the other
    # nodes, which can reach this launcher while it exits (Python restores the default handlers
    # then, but leaves ignored signals ignored): that would turn its exit code into "terminated".
    for sig in _FORWARDED:
        signal.signal(sig, signal.SIG_IGN)
    return code


def _wait(procs: list[subprocess.Popen], *, first_rank: int, node: str, received: list[str]) -> int:
    failed: Optional[tuple[int, int]] = None
    while True:
        codes = [proc.poll() for proc in procs]
        if failed is None:
            bad = next(((i, c) for i, c in enumerate(codes) if c not in (None, 0)), None)
            if bad is not None:
                failed = bad
                _stop_others(procs, failed_index=bad[0])
        if all(code is not None for code in codes):
            break
        time.sleep(0.2)
    if failed is None:
        return 0
    index, code = failed
    if code == PREEMPTED_EXIT:
        print(f"alignment: the ranks stopped after a checkpoint (exit {code}); rerun the same command to resume", file=sys.stderr, flush=True)
    else:
        # After a stop signal a rank's failure is often a consequence (under Slurm: another node
        # failed and srun is ending this one), not the cause: say so.
        notes = [node]
        if code < 0:
            notes.append(_signal_name(-code))
        if received:
            notes.append(f"after this launcher received {received[0]}")
        print(f"alignment: rank {first_rank + index} exited with code {code}; stopped the other ranks ({'; '.join(notes)})",
              file=sys.stderr, flush=True)
    return code


def _signal_name(number: int) -> str:
    try:
        return f"killed by {signal.Signals(number).name}"
    except ValueError:
        return f"killed by signal {number}"


def _stop_others(procs: list[subprocess.Popen], *, failed_index: int) -> None:
    """The other ranks may be blocked in a collective waiting for the dead one: end them."""
    if procs[failed_index].returncode == PREEMPTED_EXIT:
        return  # every rank stops at the same step on preemption; let them finish their checkpoint
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    deadline = time.monotonic() + _GRACE_SECONDS
    while time.monotonic() < deadline and any(p.poll() is None for p in procs):
        time.sleep(0.2)
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
