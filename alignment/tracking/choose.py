"""Choosing the run's tracker (``logger=auto|wandb|tensorboard|none``), once, before any stage.

Only rank 0 tracks; the W&B mode (online, offline, disabled) is decided here, before any
``wandb.init`` (alignment/tracking/wandb_run.py).
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

from alignment.config import AlignmentConfig
from alignment.errors import ConfigError
from alignment.scale import distributed
from alignment.tracking.base import NullTracker, Tracker

log = logging.getLogger(__name__)
LOGGERS = ("auto", "wandb", "tensorboard", "none")
WANDB_MODES = ("online", "offline", "disabled")


def check_config(cfg: AlignmentConfig) -> None:
    """Logger rules, checked with the rest of the config before anything loads."""
    logger = cfg.logger
    if logger.name not in LOGGERS:
        raise ConfigError(f"logger.name={logger.name!r}: use logger=auto, wandb, tensorboard or none")
    if logger.wandb.mode is not None and logger.wandb.mode not in WANDB_MODES:
        raise ConfigError(f"logger.wandb.mode={logger.wandb.mode!r}: use online, offline or disabled (or leave it unset)")
    if logger.wandb.probe_timeout_seconds <= 0 or logger.wandb.init_timeout_seconds <= 0:
        raise ConfigError("logger.wandb.probe_timeout_seconds and logger.wandb.init_timeout_seconds must be > 0")
    if logger.name == "tensorboard" and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError("logger=tensorboard needs the tensorboard package: pip install 'alignment[tensorboard]' "
                          "(or use logger=wandb, which records offline without an account)")
    if logger.wandb.api_key and cfg.launcher.name == "slurm":
        raise ConfigError("logger.wandb.api_key would be written into the sbatch script with the command line; "
                          "export WANDB_API_KEY in the job's environment instead")


def make_tracker(cfg: AlignmentConfig, run_dir: Path) -> Tracker:
    """The run's tracker, the W&B mode decided here, once (rank 0; other ranks get a NullTracker)."""
    if not distributed.is_main() or cfg.logger.name == "none":
        return NullTracker()
    if cfg.logger.name == "tensorboard":
        from alignment.tracking.tensorboard_run import TensorBoardTracker  # imports torch's tensorboard writer

        return TensorBoardTracker(cfg, run_dir)
    from alignment.tracking.wandb_run import WandbTracker, wandb_mode  # imports wandb only when it is used

    mode, why = wandb_mode(cfg.logger.wandb)
    asked_online = cfg.logger.name == "wandb" and cfg.logger.wandb.mode in (None, "online")
    log.log(logging.WARNING if asked_online and mode == "offline" else logging.INFO, "logger: W&B %s (%s)", mode, why)
    return NullTracker() if mode == "disabled" else WandbTracker(cfg, run_dir, mode=mode)
