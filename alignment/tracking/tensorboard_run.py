"""``logger=tensorboard``: the same metric names as W&B, in TensorBoard event files.

    python -m alignment.run +recipe=sft_then_dpo logger=tensorboard   # pip install ".[tensorboard]"
    tensorboard --logdir outputs/sft_then_dpo/tensorboard
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Optional

from alignment.config import AlignmentConfig
from alignment.tracking.metric_names import STEP
from alignment.tracking.redaction import redact, redact_text, secret_values
from alignment.tracking.base import never_raises

if TYPE_CHECKING:
    from alignment.records import StageResult


class TensorBoardTracker:
    """Event files per stage in ``<run dir>/tensorboard/<stage>/``: scalars under the same names
    as W&B's, the redacted config and the checkpoint lineage as text."""

    def __init__(self, cfg: AlignmentConfig, run_dir: Path):
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.writer: Any = None
        self.step = 0
        self.secrets = secret_values(dataclasses.asdict(cfg))

    @never_raises
    def start_stage(self, *, stage: str, inputs_key: str, started_from: Optional[str]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer, self.step = SummaryWriter(log_dir=str(self.run_dir / "tensorboard" / stage)), 0
        config = redact(dataclasses.asdict(self.cfg), values=self.secrets)
        self.writer.add_text("config", "```\n" + json.dumps(config, indent=2, default=str) + "\n```")

    @never_raises
    def log(self, metrics: Mapping[str, float]) -> None:
        if self.writer is None:
            return
        self.step = int(metrics.get(STEP, self.step))
        for name, value in metrics.items():
            if name != STEP:
                self.writer.add_scalar(name, value, global_step=self.step)

    @never_raises
    def log_artifact(self, result: "StageResult") -> None:
        if self.writer is not None:
            self.writer.add_text("checkpoint", f"{result.checkpoint} (sha256 {result.checkpoint_hash}); started from "
                                               f"{result.parent_checkpoint} ({result.parent_stage or 'no stage'})")

    @never_raises
    def finish(self, *, error: Optional[str] = None, preempted: bool = False) -> None:
        if self.writer is None:
            return
        if error:
            self.writer.add_text("error", ("preempted: " if preempted else "") + redact_text(error, values=self.secrets))
        self.writer.close()
        self.writer = None
