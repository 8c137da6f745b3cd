"""Experiment tracking: every stage is one run (W&B or TensorBoard) that lines up with its siblings.

W&B layout of a pipeline run ``<run_name>`` (``logger=auto``, the default, or ``logger=wandb``):

- group ``<run_name>``, one run per stage named ``<run_name>/<stage>`` with job type ``<stage>``
  and tags ``recipe:``, ``model:``, ``data:`` (plus ``logger.tags``);
- the run id is a hash of the run directory, the stage and the stage's inputs hash, so a
  resumed or requeued stage continues its W&B run, and a stage rerun with other inputs starts
  a new one;
- the resolved config, secrets removed (alignment/secrets.py), is the run's config;
- each stage logs its checkpoint as a ``model`` artifact named ``<run_name>-<stage>`` (by
  reference: paths and checksums, no upload unless ``logger.wandb.upload_checkpoints``) and
  declares the checkpoints it started from (its parent policy, a reward model) as inputs, so
  W&B draws SFT -> reward -> PPO/DPO.

Metric names are shared where stages share the meaning, so run comparison lines them up:

- ``train/step`` is every chart's x axis: an optimiser step (TRL stages) or one
  rollout-and-update iteration (PPO);
- ``train/loss``, ``train/grad_norm``, ``train/learning_rate``, ``train/tokens``,
  ``train/tokens_per_second`` while training (TRL stages);
- after training: ``eval/gold_accuracy_greedy``, ``eval/gold_accuracy_sampled`` (and
  ``eval/seen/...``, ``eval/unseen/...``, ``eval/family/<family>/...``),
  ``eval/response_tokens_mean``, ``eval/eos_rate``, ``eval/reward_mean`` (the reward model's
  mean score of the policy's samples) and ``eval/kl_to_<parent stage>`` (``eval/kl_to_sft`` in
  the shipped recipes); the first stage also logs its starting model under ``start/eval/...``;
- everything else under the stage's name: ``reward/pairwise_accuracy``, ``dpo/reward_accuracy``,
  ``dpo/rewards/margins``, ``ppo/kl``, ``ppo/rollout/gold_accuracy``, ...

The mode is decided once, before any ``wandb.init``: ``logger.wandb.mode``, else ``WANDB_MODE``,
else online when an API key is configured (WANDB_API_KEY, ~/.netrc, ``logger.wandb.api_key``)
and the W&B host answers within ``probe_timeout_seconds``, else offline. Offline runs sit in
``<run dir>/wandb/offline-run-*``; ``wandb sync <that dir>`` uploads them later. Tracking never
stops training: a W&B error is logged and the stage goes on. Only rank 0 tracks.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.util
import logging
import netrc
import os
import re
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Optional, Protocol
from urllib.parse import urlparse

from transformers import TrainerCallback

from alignment import distributed, preempt
from alignment.config import AlignmentConfig, ConfigError, WandbConfig
from alignment.metric_names import STEP, result_metrics, train_log_metrics
from alignment.secrets import redact, redact_text, secret_values

if TYPE_CHECKING:
    from alignment.records import StageResult
    from alignment.stage import StageContext

log = logging.getLogger(__name__)
DEFAULT_BASE_URL = "https://api.wandb.ai"
LOGGERS = ("auto", "wandb", "tensorboard", "none")
WANDB_MODES = ("online", "offline", "disabled")


class Tracker(Protocol):
    """One run per stage: started, fed metrics and the checkpoint, always finished."""

    def start_stage(self, ctx: "StageContext") -> None: ...

    def log(self, metrics: Mapping[str, float]) -> None: ...

    def log_artifact(self, result: "StageResult") -> None: ...

    def finish(self, *, error: Optional[str] = None, preempted: bool = False) -> None: ...


class NullTracker:
    """logger=none, and every rank but 0."""

    def start_stage(self, ctx) -> None:
        pass

    def log(self, metrics) -> None:
        pass

    def log_artifact(self, result) -> None:
        pass

    def finish(self, *, error=None, preempted=False) -> None:
        pass


# ---------------------------------------------------------------------------------------------
# Choosing a tracker, and the stage's lifetime


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
        from alignment.tracking_tensorboard import TensorBoardTracker

        return TensorBoardTracker(cfg, run_dir)
    mode, why = wandb_mode(cfg.logger.wandb)
    asked_online = cfg.logger.name == "wandb" and cfg.logger.wandb.mode in (None, "online")
    log.log(logging.WARNING if asked_online and mode == "offline" else logging.INFO, "logger: W&B %s (%s)", mode, why)
    return NullTracker() if mode == "disabled" else WandbTracker(cfg, run_dir, mode=mode)


@contextmanager
def stage_run(ctx: "StageContext") -> Iterator[Tracker]:
    """Start the stage's run; finish it however the block ends, a failure recorded as such."""
    tracker = ctx.tracker
    tracker.start_stage(ctx)
    try:
        yield tracker
    except BaseException as err:
        tracker.finish(error=f"{type(err).__name__}: {err}", preempted=isinstance(err, preempt.Preempted))
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


def _never_raises(method):
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


# ---------------------------------------------------------------------------------------------
# W&B


def wandb_mode(cfg: WandbConfig, environ: Mapping[str, str] | None = None) -> tuple[str, str]:
    """(online | offline | disabled, why): decided without prompting, within the probe timeout."""
    environ = os.environ if environ is None else environ
    if cfg.mode in ("offline", "disabled"):
        return cfg.mode, f"logger.wandb.mode={cfg.mode}"
    env_mode = {"dryrun": "offline", "run": "online"}.get(environ.get("WANDB_MODE", ""), environ.get("WANDB_MODE", ""))
    if not cfg.mode and env_mode in ("offline", "disabled"):
        return env_mode, f"WANDB_MODE={env_mode}"
    # Online, asked for or not, needs a key (else wandb would prompt for one) and a host that answers.
    url = base_url(cfg, environ)
    if not (cfg.api_key or environ.get("WANDB_API_KEY") or _netrc_key(url, environ)):
        return "offline", "no API key: set WANDB_API_KEY or run `wandb login` to go online; `wandb sync` uploads later"
    if not reachable(url, timeout=cfg.probe_timeout_seconds):
        return "offline", f"{url} did not answer within {cfg.probe_timeout_seconds:g} s; `wandb sync` uploads the runs later"
    return "online", f"API key configured, {url} answers"


def base_url(cfg: WandbConfig, environ: Mapping[str, str] | None = None) -> str:
    environ = os.environ if environ is None else environ
    return (cfg.base_url or environ.get("WANDB_BASE_URL") or DEFAULT_BASE_URL).rstrip("/")


def _netrc_key(url: str, environ: Mapping[str, str]) -> bool:
    try:
        entry = netrc.netrc(environ.get("NETRC") or None).authenticators(urlparse(url).hostname or "")
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(entry and entry[2])


def reachable(url: str, *, timeout: float) -> bool:
    """Whether ``url`` answers with any HTTP status within ``timeout`` seconds (name lookup
    included: it runs in a thread, so a resolver that never answers cannot hold the run)."""
    answered = threading.Event()

    def probe() -> None:
        try:
            urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout).close()
            answered.set()
        except urllib.error.HTTPError:
            answered.set()  # any status is an answer
        except Exception:
            pass

    thread = threading.Thread(target=probe, daemon=True, name="wandb-probe")
    thread.start()
    thread.join(timeout)
    return answered.is_set()




def artifact_name(checkpoint: Path) -> str:
    """``<run>/<stage>/checkpoint`` -> ``<run>-<stage>``; any other model directory -> ``model-<dir>``."""
    checkpoint = Path(checkpoint)
    raw = f"{checkpoint.parent.parent.name}-{checkpoint.parent.name}" if checkpoint.name == "checkpoint" else f"model-{checkpoint.name}"
    return re.sub(r"[^A-Za-z0-9._-]+", "_", raw)[:128]


class WandbTracker:
    """One W&B run per stage (see the module docstring)."""

    def __init__(self, cfg: AlignmentConfig, run_dir: Path, *, mode: str):
        self.cfg, self.run_dir, self.mode = cfg, Path(run_dir), mode
        self.run: Any = None
        # W&B's Python logger writes to the run's debug.log; kept out of ours (and alignment.log).
        logging.getLogger("wandb").propagate = False
        # Secret values from the config (logger.wandb.api_key) join the environment's.
        self.secrets = secret_values(dataclasses.asdict(cfg))

    def _settings(self, mode: str):
        import wandb

        w = self.cfg.logger.wandb
        # W&B records the command line, environment-derived metadata, git state, code and the
        # console by default; a secret passed on the command line would reach it. All off.
        return wandb.Settings(mode=mode, api_key=w.api_key if mode == "online" else None, base_url=base_url(w),
                              x_disable_meta=True, disable_git=True, save_code=False, x_save_requirements=False,
                              console="off", disable_job_creation=True, silent=True, init_timeout=w.init_timeout_seconds)

    @_never_raises
    def start_stage(self, ctx: "StageContext") -> None:
        import wandb

        w, cfg = self.cfg.logger.wandb, self.cfg
        directory = Path(w.dir).expanduser().resolve() if w.dir else self.run_dir
        directory.mkdir(parents=True, exist_ok=True)
        config = redact({**dataclasses.asdict(cfg), "stage": ctx.stage, "inputs_hash": ctx.inputs_key}, values=self.secrets)
        kwargs = dict(project=w.project, entity=w.entity, group=cfg.run_name, job_type=ctx.stage, name=f"{cfg.run_name}/{ctx.stage}",
                      id=run_id(self.run_dir, ctx.stage, ctx.inputs_key), resume="allow", dir=str(directory),
                      tags=redact(stage_tags(cfg), values=self.secrets), config=config, reinit="finish_previous")
        try:
            self.run = wandb.init(settings=self._settings(self.mode), **kwargs)
        except Exception as err:
            if self.mode != "online":
                raise
            log.warning("W&B did not start online (%s); this and later stages record offline", redact_text(str(err), values=self.secrets))
            self.mode = "offline"
            wandb.teardown()  # the W&B service still holds the failed run's id
            self.run = wandb.init(settings=self._settings("offline"), **kwargs)
        self.run.define_metric(STEP)
        self.run.define_metric("*", step_metric=STEP)
        if ctx.start.path and not ctx.start.adapter:
            self._use(Path(ctx.start.path))

    @_never_raises
    def log(self, metrics: Mapping[str, float]) -> None:
        if self.run is not None:
            self.run.log(dict(metrics))

    @_never_raises
    def log_artifact(self, result: "StageResult") -> None:
        if self.run is None:
            return
        for record in result.inputs.values():  # a reward model beside the parent
            if isinstance(record, dict) and record.get("checkpoint"):
                self._use(Path(record["checkpoint"]))
        artifact = self._artifact(Path(result.checkpoint), upload=self.cfg.logger.wandb.upload_checkpoints,
                                  metadata={"stage": result.stage, "checkpoint_hash": result.checkpoint_hash,
                                            "parent_stage": result.parent_stage, "parent_checkpoint_hash": result.parent_checkpoint_hash,
                                            "inputs_hash": result.inputs_hash, "run_name": self.cfg.run_name})
        self.run.log_artifact(artifact, aliases=[result.stage])

    def finish(self, *, error: Optional[str] = None, preempted: bool = False) -> None:
        run, self.run = self.run, None
        if run is None:
            return
        try:
            if error:
                run.summary["error"] = redact_text(error, values=self.secrets)
                run.summary["status"] = "preempted" if preempted else "failed"
            if preempted:
                run.mark_preempting()
            sync_dir = run.settings.sync_dir
            run.finish(exit_code=1 if error else 0)
        except Exception as err:
            log.warning("W&B finish failed (%s: %s)", type(err).__name__, redact_text(str(err), values=self.secrets))
            return
        if self.mode == "offline":
            log.info("W&B run recorded offline; upload it with: wandb sync %s", sync_dir)

    def _artifact(self, checkpoint: Path, *, upload: bool, metadata: Optional[dict] = None):
        """The checkpoint as an artifact. Its digest depends on file names and contents only
        (not on upload vs reference), so a later stage that rebuilds it as an input refers to
        the very version the parent logged."""
        import wandb

        artifact = wandb.Artifact(artifact_name(checkpoint), type="model", metadata=metadata or {})
        if upload:
            artifact.add_dir(str(checkpoint))
        else:
            artifact.add_reference(checkpoint.resolve().as_uri(), checksum=True)
        return artifact

    def _use(self, checkpoint: Path) -> None:
        if not checkpoint.is_dir():
            return  # a hub id: nothing local to point at
        artifact = self._artifact(checkpoint, upload=False)
        if self.mode == "offline":
            # wandb's public use_artifact refuses offline runs; this is what it does online for
            # a new artifact: log it and mark it used, replayed by `wandb sync`.
            self.run._log_artifact(artifact, is_user_created=True, use_after_commit=True)
        else:
            self.run.use_artifact(artifact)


# ---------------------------------------------------------------------------------------------
# TensorBoard
