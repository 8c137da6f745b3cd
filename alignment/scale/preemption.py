"""Stop cleanly when the cluster says so: checkpoint at a step every rank agrees on, then exit.

Slurm sends SIGUSR1 ``launcher.signal_seconds`` before the time limit (``--signal``), and SIGTERM
when it preempts a job. Either sets a flag here; the training loops ask :func:`stop_requested`
once per optimiser step, which on several ranks is a collective (any rank's flag counts), so
all ranks stop after the same step. The stage then writes a mid-stage checkpoint and raises
:class:`Preempted`; ``alignment.run`` exits with :data:`PREEMPTED_EXIT`, and the Slurm script
requeues the job on that code. The requeued run skips finished stages and resumes this one.
"""

from __future__ import annotations

import atexit
import logging
import signal

from alignment.scale import distributed

log = logging.getLogger(__name__)
PREEMPTED_EXIT = 75  # EX_TEMPFAIL: "try again later"
_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
_state = {"requested": False, "signal": None}


class Preempted(Exception):
    """The stage stopped on a signal after writing a checkpoint; rerun the command to resume."""


def install() -> None:
    """Catch the warning signals (call once, in the main thread, before training)."""
    for sig in _SIGNALS:
        signal.signal(sig, _on_signal)
    atexit.register(_ignore_while_exiting)


def _ignore_while_exiting() -> None:
    # Python restores the default handlers while it shuts down (after atexit), and a stop signal
    # arriving then would kill the process: under Slurm srun sends TERM to the other nodes as soon
    # as the first rank exits with PREEMPTED_EXIT, and the exit code must stay 75. Ignored signals
    # stay ignored.
    for sig in _SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def _on_signal(signum, _frame) -> None:
    if not _state["requested"]:
        log.warning("received %s: stopping at the next training step (after a checkpoint) or sampling batch (keeping the "
                    "finished ones)", signal.Signals(signum).name)
    _state.update(requested=True, signal=signal.Signals(signum).name)


def request(reason: str = "test") -> None:
    """Ask for a stop as a signal would (for tests and callers without signals)."""
    _state.update(requested=True, signal=reason)


def reset() -> None:
    _state.update(requested=False, signal=None)


def local_request() -> bool:
    return bool(_state["requested"])


def stop_requested() -> bool:
    """Whether any rank was asked to stop. A collective when there are several ranks: call it
    at the same point of every step on every rank."""
    return distributed.any_rank(local_request())


def signal_name() -> str:
    return str(_state["signal"] or "a stop request")
