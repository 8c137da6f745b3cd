"""Mid-stage checkpoints: written every ``save_every_n_steps``, resumed after any interruption.

TRL stages train through ``alignment.stages.common.train`` (which adds :class:`StageGuard` and
:func:`guard_finite_loss` to the trainer), PPO through its own loop with the same marker rules. Checkpoints live in ``<stage>/trainer/checkpoint-<step>/`` and hold everything an exact
resume needs: weights, optimizer, scheduler, every rank's RNG state and the step (hence the
data position). A checkpoint counts only once :data:`MARKER` is in it, written last, after every
rank has finished writing; it records the stage's inputs hash, so a checkpoint from other
inputs (another config, another parent) is never resumed.

On start, a stage resumes from the newest complete checkpoint with its inputs hash; partial
ones (a kill during the save, a full disk) and ones from other inputs are removed, with a log
line. ``<stage>.resume_from=<dir>`` asks for one checkpoint explicitly: a bad one is then an
error, not skipped.

Two guards run every step: a loss that is NaN or infinite stops the stage at that step (the
last good checkpoint stays), and a stop request (alignment/scale/preemption.py) ends training at a step
every rank agrees on, after a checkpoint.
"""

from __future__ import annotations

import errno
import json
import logging
import re
import shutil
import time
from pathlib import Path
from typing import Any, Optional

import torch
from transformers import TrainerCallback

from alignment.errors import CheckpointError, NonFiniteLoss
from alignment.records import atomic_write_json
from alignment.scale import distributed, preemption

log = logging.getLogger(__name__)
MARKER = "alignment_complete.json"
SAMPLING_DIR = "sampling"
TRAINER_DIR = "trainer"
_STEP = re.compile(r"^checkpoint-(\d+)$")


DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def is_disk_full(err: BaseException) -> bool:
    """An OSError for a full disk or quota, or safetensors' own error for one (SafetensorError
    is not an OSError; it carries the OS error in its message)."""
    if isinstance(err, OSError):
        return err.errno in DISK_FULL
    text = str(err)
    return type(err).__name__ == "SafetensorError" and any(f"os error {code}" in text for code in DISK_FULL)


def disk_full_message(stage: str, where: Path, err: BaseException) -> str:
    reason = err.strerror if isinstance(err, OSError) else str(err)
    return (f"{stage}: the disk filled up while writing a checkpoint in {where} ({reason}). The checkpoint being "
            f"written has no completion marker and will be ignored; the previous complete one is intact and a rerun "
            f"resumes from it. Free space (or set output_dir elsewhere) and rerun the same command")


def trainer_dir(stage_dir: Path) -> Path:
    return stage_dir / TRAINER_DIR


def sampling_dir(stage_dir: Path, inputs_hash: str) -> Path:
    """Where a stage's pair sampling journals its finished batches (alignment/modeling/generation.py),
    per inputs hash, so a preempted stage reuses them and a changed one never does."""
    return stage_dir / SAMPLING_DIR / inputs_hash[:16]


def layout(zero_stage: int) -> dict[str, int]:
    """What a sharded checkpoint depends on: ZeRO shards resume only on as many processes."""
    return {"world_size": distributed.world_size(), "zero_stage": zero_stage}


def mark_complete(checkpoint: Path, *, inputs_hash: str, step: int, zero_stage: int = 0, loss_sum: Optional[float] = None) -> None:
    """The completion marker; ``loss_sum`` (the training loss summed over steps 1..step) lets a
    resumed stage report the mean loss over all its steps, not only those after the resume."""
    atomic_write_json(checkpoint / MARKER, {"step": step, "inputs_hash": inputs_hash, "layout": layout(zero_stage),
                                            "written_at": time.time(), "loss_sum": loss_sum})


def resumed_loss_sum(checkpoint: Optional[Path]) -> float:
    """The loss summed over the steps before ``checkpoint`` (0 when starting fresh)."""
    record = marker(checkpoint) if checkpoint is not None else None
    return float((record or {}).get("loss_sum") or 0.0)


def _check_layout(path: Path, record: dict[str, Any], zero_stage: int) -> None:
    written, now = record.get("layout") or {}, layout(zero_stage)
    if (written.get("zero_stage") or zero_stage) and written and written != now:
        raise CheckpointError(
            f"{path} was written by {written.get('world_size')} process(es) under ZeRO stage {written.get('zero_stage')}, this "
            f"run has {now['world_size']} under stage {now['zero_stage']}: sharded optimizer states resume only on the same "
            f"layout. Relaunch with that layout to resume, or remove {path.parent} to restart the stage"
        )


def marker(checkpoint: Path) -> Optional[dict[str, Any]]:
    try:
        return json.loads((checkpoint / MARKER).read_text())
    except (OSError, ValueError):
        return None


def step_of(checkpoint: Path) -> int:
    match = _STEP.match(checkpoint.name)
    return int(match.group(1)) if match else -1


def find_resume(stage_dir: Path, *, inputs_hash: str, requested: Optional[str], key: str, zero_stage: int = 0) -> Optional[Path]:
    """The checkpoint to resume from (None: start fresh); on rank 0 also clears unusable ones.

    Every rank gets rank 0's answer, so all resume from the same step.
    """
    answer: Optional[str] = None
    error: Optional[str] = None
    if distributed.is_main():
        try:
            found = _choose(stage_dir, inputs_hash=inputs_hash, requested=requested, key=key)
            if found is not None:
                _check_layout(found, marker(found) or {}, zero_stage)
            answer = str(found) if found else None
        except CheckpointError as err:
            error = str(err)
    answer, error = distributed.broadcast((answer, error))
    if error:
        raise CheckpointError(error)
    return Path(answer) if answer else None


def _choose(stage_dir: Path, *, inputs_hash: str, requested: Optional[str], key: str) -> Optional[Path]:
    if requested:
        path = Path(requested).expanduser()
        record = marker(path)
        if not path.is_dir():
            raise CheckpointError(f"{key}={requested}: no such checkpoint directory")
        if record is None:
            raise CheckpointError(f"{key}={requested}: the checkpoint is incomplete (no {MARKER}; the save was interrupted); "
                                  f"pick another from {path.parent} or unset {key} to take the newest complete one")
        if record.get("inputs_hash") != inputs_hash:
            raise CheckpointError(f"{key}={requested}: the checkpoint was written with other inputs (config, parent or data); "
                                  f"resuming it would mix two runs. Unset {key} to start this stage afresh")
        return path
    root = trainer_dir(stage_dir)
    candidates = sorted((p for p in root.glob("checkpoint-*") if p.is_dir() and step_of(p) >= 0), key=step_of)
    chosen = None
    for path in reversed(candidates):
        record = marker(path)
        if record is not None and record.get("inputs_hash") == inputs_hash:
            chosen = path
            break
    for path in candidates:
        if path == chosen:
            continue
        record = marker(path)
        if record is None or record.get("inputs_hash") != inputs_hash:
            why = "partial (no completion marker)" if record is None else "from other inputs"
            log.warning("removing checkpoint %s: %s", path, why)
            shutil.rmtree(path, ignore_errors=True)
    if chosen is not None:
        log.info("resuming from %s (step %d)", chosen, step_of(chosen))
    return chosen


class StageGuard(TrainerCallback):
    """Marks complete checkpoints, and stops on a stop request at a step all ranks agree on."""

    def __init__(self, *, inputs_hash: str, stage: str, zero_stage: int, loss_sum: Callable[[], Optional[float]] = lambda: None):
        self.inputs_hash, self.stage, self.zero_stage = inputs_hash, stage, zero_stage
        self.loss_sum = loss_sum  # the loss summed over every step so far, carried in each checkpoint's marker
        self.preempted_at: Optional[int] = None

    def on_step_end(self, args, state, control, **kwargs):
        if preemption.stop_requested():
            self.preempted_at = state.global_step
            control.should_save = True
            control.should_training_stop = True
        return control

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        # A finite loss can still give inf/NaN gradients (an overflow inside); stop before they
        # reach the weights. Under DeepSpeed the gradients live in the engine: there only the loss is checked.
        grads = [p.grad for p in model.parameters() if p.grad is not None] if model is not None else []
        if grads and not torch.isfinite(torch.nn.utils.get_total_norm(grads)):  # one fused pass, as clipping does
            raise NonFiniteLoss(f"{self.stage}: the gradient became NaN or infinite at step {state.global_step + 1}; stopped "
                                f"before the optimizer step. The last complete checkpoint in {args.output_dir} is intact. "
                                f"Lower {self.stage}.learning_rate or check the data")
        return control

    def on_save(self, args, state, control, **kwargs):
        distributed.barrier()  # every rank has written its part (ZeRO shards, RNG state)
        if distributed.is_main():
            mark_complete(Path(args.output_dir) / f"checkpoint-{state.global_step}", inputs_hash=self.inputs_hash,
                          step=state.global_step, zero_stage=self.zero_stage, loss_sum=self.loss_sum())
        distributed.barrier()
        return control


def guard_finite_loss(trainer, *, stage: str) -> None:
    """Make ``trainer`` raise NonFiniteLoss on the step whose loss is NaN or infinite."""
    original = trainer.training_step

    def training_step(model, inputs, num_items_in_batch=None):
        loss = original(model, inputs, num_items_in_batch)
        if not torch.isfinite(loss.detach()).all():
            step = trainer.state.global_step + 1
            raise NonFiniteLoss(
                f"{stage}: the loss became {loss.detach().float().mean().item()} at step {step}; stopped before the "
                f"optimizer step. The last complete checkpoint in {trainer.args.output_dir} is intact. Lower "
                f"{stage}.learning_rate or {stage}.max_grad_norm, or check the data"
            )
        return loss

    trainer.training_step = training_step


def trainer_save_kwargs(stage_cfg) -> dict[str, Any]:
    """TrainingArguments for mid-stage checkpoints."""
    every = stage_cfg.save_every_n_steps
    return {
        "save_strategy": "steps" if every > 0 else "no",
        "save_steps": every if every > 0 else 500,
        "save_total_limit": max(2, stage_cfg.keep_checkpoints),  # >= 2: a partial newest never leaves none
        "save_only_model": False,
        "ignore_data_skip": False,
    }
