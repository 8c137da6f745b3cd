"""The W&B tracker: one run per stage, online when a key and the host are there, else offline.

The mode is decided once (:func:`wandb_mode`), before any ``wandb.init``, without prompting;
see alignment/tracking/__init__.py for the run layout and lineage.
"""

from __future__ import annotations

import dataclasses
import logging
import netrc
import os
import re
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Optional
from urllib.parse import urlparse

from alignment.config import AlignmentConfig, WandbConfig
from alignment.tracking.metric_names import STEP
from alignment.tracking.redaction import redact, redact_text, secret_values
from alignment.tracking.base import never_raises, run_id, stage_tags

if TYPE_CHECKING:
    from alignment.records import StageResult

log = logging.getLogger(__name__)
DEFAULT_BASE_URL = "https://api.wandb.ai"


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

    @never_raises
    def start_stage(self, *, stage: str, inputs_key: str, started_from: Optional[str]) -> None:
        import wandb

        w, cfg = self.cfg.logger.wandb, self.cfg
        directory = Path(w.dir).expanduser().resolve() if w.dir else self.run_dir
        directory.mkdir(parents=True, exist_ok=True)
        config = redact({**dataclasses.asdict(cfg), "stage": stage, "inputs_hash": inputs_key}, values=self.secrets)
        kwargs = dict(project=w.project, entity=w.entity, group=cfg.run_name, job_type=stage, name=f"{cfg.run_name}/{stage}",
                      id=run_id(self.run_dir, stage, inputs_key), resume="allow", dir=str(directory),
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
        if started_from:
            self._use(Path(started_from))

    @never_raises
    def log(self, metrics: Mapping[str, float]) -> None:
        if self.run is not None:
            self.run.log(dict(metrics))

    @never_raises
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
