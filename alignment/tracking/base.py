"""What every tracker is and shares: the ``Tracker`` protocol, a stage's run lifetime, its run id
and tags, and the callback that streams a TRL trainer's logs. ``make_tracker`` (choose.py) picks
the run's tracker; wandb_run.py and tensorboard_run.py are the two real ones. See
alignment/tracking/__init__.py for the layout in W&B and metric_names.py for the names.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Mapping, Optional, Protocol

from transformers import TrainerCallback

from alignment.config import AlignmentConfig
from alignment.scale.preemption import Preempted
from alignment.tracking.metric_names import result_metrics, train_log_metrics
from alignment.tracking.redaction import redact_text

if TYPE_CHECKING:
    from alignment.records import StageResult

log = logging.getLogger(__name__)


class Tracker(Protocol):
    """One run per stage: started, fed metrics and the checkpoint, always finished."""

    def start_stage(self, *, stage: str, inputs_key: str, started_from: Optional[str]) -> None: ...

    def log(self, metrics: Mapping[str, float]) -> None: ...

    def log_artifact(self, result: "StageResult") -> None: ...

    def finish(self, *, error: Optional[str] = None, preempted: bool = False) -> None: ...


class NullTracker:
    """logger=none, and every rank but 0."""

    def start_stage(self, *, stage, inputs_key, started_from) -> None:
        pass

    def log(self, metrics) -> None:
        pass

    def log_artifact(self, result) -> None:
        pass

    def finish(self, *, error=None, preempted=False) -> None:
        pass


# ---------------------------------------------------------------------------------------------
# Choosing a tracker, and the stage's lifetime


@contextmanager
def stage_run(tracker: Tracker, *, stage: str, inputs_key: str, started_from: Optional[str]) -> Iterator[Tracker]:
    """Start the stage's run; finish it however the block ends, a failure recorded as such.
    ``started_from`` is the checkpoint directory the stage starts from (its lineage input)."""
    tracker.start_stage(stage=stage, inputs_key=inputs_key, started_from=started_from)
    try:
        yield tracker
    except BaseException as err:
        tracker.finish(error=f"{type(err).__name__}: {err}", preempted=isinstance(err, Preempted))
        raise
    tracker.finish()


def record_result(tracker: Tracker, result: "StageResult") -> None:
    """The stage's evaluation metrics and its checkpoint (with the checkpoints it used)."""
    tracker.log(result_metrics(result))
    if result.checkpoint:
        tracker.log_artifact(result)


def run_id(run_dir: Path, stage: str, inputs_key: str) -> str:
    """Stable across resumes and requeues of a stage; new when its inputs change."""
    return hashlib.sha256(f"{Path(run_dir).resolve()}|{stage}|{inputs_key}".encode()).hexdigest()[:16]


def stage_tags(cfg: AlignmentConfig) -> list[str]:
    model = Path(cfg.model.name_or_path).name if cfg.model.name_or_path else "embedded"
    data = Path(cfg.data.path).name if cfg.data.path else "mixture" if cfg.data.sources else "suite"
    tags = [f"recipe:{cfg.recipe or 'none'}", f"model:{model}", f"data:{data}", *cfg.logger.tags]
    return [t[:64] for t in tags]  # W&B's limit per tag


def never_raises(method):
    """Tracking must not stop training: a tracker's error becomes a warning."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except Exception as err:
            log.warning("%s.%s failed (%s: %s); training goes on", type(self).__name__, method.__name__, type(err).__name__,
                        redact_text(str(err)))
            return None

    return wrapper


class TrainLogCallback(TrainerCallback):
    """Sends each TRL log line to the tracker, with tokens per second since the previous one."""

    def __init__(self, tracker: Tracker, *, stage: str):
        self.tracker, self.stage = tracker, stage
        self._last: Optional[tuple[float, float]] = None  # (time, tokens) at the previous log line

    def on_train_begin(self, args, state, control, **kwargs):
        self._last = (time.monotonic(), 0.0)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs:
            return
        metrics = train_log_metrics(self.stage, logs, step=state.global_step)
        tokens, now = metrics.get("train/tokens"), time.monotonic()
        if tokens is not None and self._last is not None and tokens > self._last[1] and now > self._last[0]:
            metrics["train/tokens_per_second"] = (tokens - self._last[1]) / (now - self._last[0])
        if tokens is not None:
            self._last = (now, tokens)
        self.tracker.log(metrics)
