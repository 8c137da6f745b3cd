"""Runs a recipe's stages in order, handing each one its parent's checkpoint.

For every stage the pipeline decides first whether it must run at all: a stage whose
``result.json`` is complete, whose checkpoint files still have the sizes and sha256 digests
recorded when it was committed, and whose inputs hash (its resolved config, the model and eval
config, the seed, the parent checkpoint's content hash and the source data's fingerprint) equals
the current one is skipped. Anything else reruns it, with a log line that says why (no record,
an unreadable one, changed config, parent or data, a changed checkpoint file), and with it every
later stage, because their parent's hash changes.

Layout of a run::

    <output_dir>/<run_name>/pipeline.json        the stages and their results, in order
    <output_dir>/<run_name>/<stage>/result.json  the record (alignment/records.py: StageResult)
    <output_dir>/<run_name>/<stage>/checkpoint/  Hugging Face format model + tokenizer
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Optional

from alignment.config import AlignmentConfig, StageConfig, TrainConfig
from alignment.data.stage_data import source_fingerprint
from alignment.records import (
    RESULT_FILE,
    StageResult,
    UnreadableRecord,
    atomic_write_json,
    changed_files,
    changed_outputs,
    git_commit,
    hash_directory,
    inputs_hash,
    package_versions,
    read_result,
    remove_orphans,
)
from alignment.report.markdown import write_report
from alignment.report.table import format_table
from alignment.scale import distributed
from alignment.scale.checkpoints import SAMPLING_DIR, trainer_dir
from alignment.scale.preemption import Preempted
from alignment.stages import POLICY_STAGES, runner
from alignment.stages.common import StageContext, StartPoint, resolve_start
from alignment.tracking.base import record_result, stage_run
from alignment.tracking.choose import make_tracker

log = logging.getLogger(__name__)


def run_pipeline(cfg: AlignmentConfig) -> list[StageResult]:
    """Run (or skip) each stage of ``cfg.stages``; return their records in order."""
    run_dir = Path(cfg.output_dir).resolve() / cfg.run_name
    run_dir.mkdir(parents=True, exist_ok=True)
    tracker = make_tracker(cfg, run_dir)  # the W&B mode is decided here, before any stage
    results: list[StageResult] = []
    skipped: list[bool] = []
    previous: dict[str, StageResult] = {}
    for index, stage in enumerate(cfg.stages):
        stage_cfg = getattr(cfg, stage)
        stage_dir = run_dir / stage
        policy_parent = next((r for r in reversed(results) if r.stage in POLICY_STAGES), None)
        start = _start_point(cfg, stage_cfg, policy_parent, run_dir=run_dir)
        parts = _inputs_parts(cfg, stage, start, upstream=results)
        key = inputs_hash(**parts)
        # Rank 0 decides and every rank follows, so no rank trains a stage the others skip.
        existing, reason = _existing_record(stage_dir, key, parts) if distributed.is_main() else (None, None)
        existing = distributed.broadcast(existing)
        if existing is not None:
            log.info("[%s] skipped: complete in %s (inputs unchanged, checkpoint verified)", stage, stage_dir)
            results.append(existing)
            skipped.append(True)
            previous[stage] = existing
            _write_pipeline(run_dir, cfg, results, skipped)
            continue
        if distributed.is_main():
            log.info("[%s] runs: %s", stage, reason)
            (stage_dir / RESULT_FILE).unlink(missing_ok=True)  # never describe weights about to change
            for orphan in remove_orphans(stage_dir):
                log.info("[%s] removed %s, left by an interrupted write", stage, orphan)
        distributed.barrier()
        log.info("[%s] running from %s -> %s", stage, start.label, stage_dir)
        ctx = StageContext(cfg, run_dir, stage_dir, stage, start, index == 0, previous=dict(previous), inputs_key=key, tracker=tracker)
        # One W&B run per stage, finished (as failed) also when the stage raises.
        with stage_run(tracker, stage=stage, inputs_key=key, started_from=None if start.adapter else start.path):
            result = _run_stage(stage, stage_cfg, ctx, key, parts)
            record_result(tracker, result)
        results.append(result)
        skipped.append(False)
        previous[stage] = result
        _write_pipeline(run_dir, cfg, results, skipped)
        log.info("[%s] done in %.1f s: %s", stage, result.wall_seconds, result.checkpoint)
    if distributed.is_main():
        print(format_table(results), flush=True)
        print(f"results: {run_dir / 'pipeline.json'}", flush=True)
        try:
            print(f"report: {write_report([run_dir])}", flush=True)
        except Exception as err:  # the stages are done and recorded; a broken report must not fail the run
            log.warning("report not written: %s: %s (python -m alignment.report %s retries)", type(err).__name__, err, run_dir)
    return results


def _start_point(cfg: AlignmentConfig, stage_cfg: StageConfig, parent: Optional[StageResult], *, run_dir: Path) -> StartPoint:
    if stage_cfg.init_from:
        return resolve_start(stage_cfg.init_from, run_dir=run_dir)
    if parent is not None:
        return StartPoint(parent.checkpoint, parent.checkpoint_hash, parent.stage)
    if cfg.model.name_or_path:
        return resolve_start(cfg.model.name_or_path, run_dir=run_dir, gguf_file=cfg.model.gguf_file)
    return StartPoint(None, None)


def _inputs_parts(cfg: AlignmentConfig, stage: str, start: StartPoint, *, upstream: list[StageResult]) -> dict:
    """What decides whether a finished stage is still valid: ``records.inputs_hash``'s arguments."""
    stage_cfg = getattr(cfg, stage)
    config = {
        # Any earlier stage's checkpoint may be an input (a reward model), so all of them count.
        "upstream": {r.stage: r.checkpoint_hash for r in upstream},
        "stage": dataclasses.asdict(stage_cfg),
        "model": dataclasses.asdict(cfg.model),
        "data": dataclasses.asdict(cfg.data),
        "eval": dataclasses.asdict(cfg.eval),
        "seed": cfg.seed,
    }
    # Rows an earlier stage wrote for later ones (self_instruct's SFT data) are data too.
    written = [f"{r.stage}:{o['sha256']}" for r in upstream for o in (r.outputs or {}).values()]
    fingerprint = source_fingerprint(cfg.data, stage_cfg) + ("+generated:" + ",".join(written) if written else "")
    return {"config": config, "parent_hash": start.hash, "parent_ref": start.path, "data_fingerprint": fingerprint}


def _part_digests(parts: dict) -> dict[str, str]:
    """Each input on its own, so a rerun can say which one changed: config, parent or data."""
    return {"config": inputs_hash(config=parts["config"], parent_hash=None, parent_ref=None, data_fingerprint=None),
            "parent": f"{parts['parent_ref']}@{parts['parent_hash']}", "data": str(parts["data_fingerprint"])}


def _existing_record(stage_dir: Path, key: str, parts: dict) -> tuple[Optional[StageResult], str]:
    """The stage's record when it can be skipped, else None and why it runs (logged)."""
    try:
        record = read_result(stage_dir)
    except UnreadableRecord as err:
        return None, f"its record is unreadable ({err})"
    if record is None:
        return None, "no record of an earlier run"
    if record.status != "complete":
        return None, f"the earlier run ended {record.status}" + (f" ({record.error})" if record.error else "")
    if record.inputs_hash != key:
        before, now = record.inputs_parts, _part_digests(parts)
        changed = [name for name in ("config", "parent", "data") if before.get(name) != now[name]] if before else []
        return None, ("inputs changed: " + ", ".join(changed)) if changed else "inputs changed (not recorded which: an older record)"
    changed = changed_outputs(record.outputs or {})
    if changed:
        return None, f"a file it wrote changed since it was recorded: {', '.join(changed)}"
    if record.checkpoint == record.parent_checkpoint and record.checkpoint_hash == record.parent_checkpoint_hash:
        # A stage that trains nothing (self_instruct) hands on its parent, whose hash is one of the inputs.
        return record, "complete"
    checkpoint = Path(record.checkpoint) if record.checkpoint else None
    if checkpoint is None or not (checkpoint / "config.json").is_file():
        return None, f"its checkpoint {checkpoint} is gone"
    if record.checkpoint_files:
        changed = changed_files(checkpoint, record.checkpoint_files)
        if changed:
            return None, f"its checkpoint changed since it was recorded: {', '.join(changed)} in {checkpoint}"
    elif hash_directory(checkpoint) != record.checkpoint_hash:  # a record without per-file digests
        return None, f"its checkpoint's content hash differs from the recorded {record.checkpoint_hash[:12]}"
    return record, "complete"


def _run_stage(stage: str, stage_cfg: StageConfig, ctx: StageContext, key: str, parts: dict) -> StageResult:
    started = time.monotonic()
    try:
        result = runner(stage)(stage_cfg, ctx)
    except BaseException as err:
        if distributed.is_main():
            # "preempted" and "failed" both rerun on the next command; a preempted stage resumes
            # from its mid-stage checkpoint, so does a failed one that had written any.
            failed = StageResult(
                stage=stage, status="preempted" if isinstance(err, Preempted) else "failed", checkpoint=None,
                checkpoint_hash=None, parent_stage=ctx.start.parent_stage, parent_checkpoint=ctx.start.path,
                parent_checkpoint_hash=ctx.start.hash, data_fingerprint=None, inputs_hash=key,
                config=dataclasses.asdict(stage_cfg), wall_seconds=time.monotonic() - started, versions=package_versions(),
                git_commit=git_commit(), error=f"{type(err).__name__}: {err}", launch=launch_record(ctx.cfg, stage_cfg),
            )
            atomic_write_json(ctx.stage_dir / RESULT_FILE, failed.to_dict())
        raise
    result.inputs_hash = key
    result.inputs_parts = _part_digests(parts)
    result.wall_seconds = time.monotonic() - started
    result.versions = package_versions()
    result.git_commit = git_commit()
    result.launch = launch_record(ctx.cfg, stage_cfg)
    if distributed.is_main():
        atomic_write_json(ctx.stage_dir / RESULT_FILE, result.to_dict())
        # The stage is committed: its mid-stage checkpoints (optimizer states included, several
        # times the model's size) can no longer be resumed from, so they go.
        shutil.rmtree(trainer_dir(ctx.stage_dir), ignore_errors=True)
        shutil.rmtree(ctx.stage_dir / SAMPLING_DIR, ignore_errors=True)  # journaled pair sampling, likewise
    distributed.barrier()
    return result


def launch_record(cfg: AlignmentConfig, stage_cfg: StageConfig) -> dict:
    """How the stage ran: processes, its batch split over them, ZeRO stage and, under Slurm, the
    job (its id survives requeues)."""
    env = os.environ
    record = {"world_size": distributed.world_size(), "nnodes": cfg.launcher.nnodes, "zero_stage": cfg.deepspeed.zero_stage,
              "offload_optimizer": cfg.deepspeed.offload_optimizer, "offload_params": cfg.deepspeed.offload_params,
              "peft": cfg.model.peft}
    if isinstance(stage_cfg, TrainConfig):
        forward, accumulation = stage_cfg.split_batch(distributed.world_size())
        record["batch"] = {"global": stage_cfg.sequences_per_step(distributed.world_size()), "per_device": forward,
                           "accumulation": accumulation}
    if "SLURM_JOB_ID" in env:
        record["slurm"] = {"job_id": env["SLURM_JOB_ID"], "restart_count": int(env.get("SLURM_RESTART_COUNT", "0")),
                           "nodelist": env.get("SLURM_JOB_NODELIST"), "partition": env.get("SLURM_JOB_PARTITION")}
    return record


def _write_pipeline(run_dir: Path, cfg: AlignmentConfig, results: list[StageResult], skipped: list[bool]) -> None:
    if not distributed.is_main():
        return
    atomic_write_json(
        run_dir / "pipeline.json",
        {
            "run_name": cfg.run_name,
            "recipe": cfg.recipe,
            "stages": list(cfg.stages),
            "results": [
                {"stage": r.stage, "status": r.status, "skipped": s, "result": str(run_dir / r.stage / RESULT_FILE),
                 "checkpoint": r.checkpoint, "checkpoint_hash": r.checkpoint_hash, "parent_stage": r.parent_stage,
                 "wall_seconds": r.wall_seconds, "metrics": r.metrics}
                for r, s in zip(results, skipped)
            ],
        },
    )
