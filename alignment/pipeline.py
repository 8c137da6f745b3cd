"""Runs a recipe's stages in order, handing each one its parent's checkpoint.

For every stage the pipeline decides first whether it must run at all: a stage whose
``result.json`` is complete, whose checkpoint is still intact, and whose inputs hash (its
resolved config, the model and eval config, the seed, the parent checkpoint's content hash and
the source data's fingerprint) equals the current one is skipped. Anything else reruns it, and
with it every later stage, because their parent's hash changes.

Layout of a run::

    <output_dir>/<run_name>/pipeline.json        the stages and their results, in order
    <output_dir>/<run_name>/<stage>/result.json  the record (alignment.records.StageResult)
    <output_dir>/<run_name>/<stage>/checkpoint/  Hugging Face format model + tokenizer
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Callable, Optional

from alignment import distributed, tracking
from alignment.checkpoints import trainer_dir
from alignment.config import AlignmentConfig
from alignment.preempt import Preempted
from alignment.data import MIXTURE, load_suite, stage_data, stage_source
from alignment.dpo import train_dpo
from alignment.ppo import train_ppo
from alignment.reward import train_reward
from alignment.records import (
    RESULT_FILE,
    StageResult,
    atomic_write_json,
    git_commit,
    inputs_hash,
    package_versions,
    read_result,
)
from alignment.report import format_table
from alignment.report_md import write_report
from alignment.sft import train_sft
from alignment.stage import StageContext, StageError, StartPoint, resolve_start
from alignment.suite import suite_fingerprint

log = logging.getLogger(__name__)

RUNNERS: dict[str, Callable[..., StageResult]] = {"sft": train_sft, "reward": train_reward, "dpo": train_dpo, "ppo": train_ppo}
# Stages whose checkpoint is a policy (a causal LM). Every stage starts from the latest of
# these: the reward model from the SFT policy, and PPO or DPO after a reward stage from the
# same SFT policy (the reward model is their second input, not their parent).
POLICY_STAGES = ("sft", "dpo", "ppo")


def run_pipeline(cfg: AlignmentConfig) -> list[StageResult]:
    """Run (or skip) each stage of ``cfg.stages``; return their records in order."""
    run_dir = Path(cfg.output_dir).resolve() / cfg.run_name
    run_dir.mkdir(parents=True, exist_ok=True)
    tracker = tracking.make_tracker(cfg, run_dir)  # the W&B mode is decided here, before any stage
    results: list[StageResult] = []
    skipped: list[bool] = []
    previous: dict[str, StageResult] = {}
    for index, stage in enumerate(cfg.stages):
        stage_cfg = getattr(cfg, stage)
        stage_dir = run_dir / stage
        policy_parent = next((r for r in reversed(results) if r.stage in POLICY_STAGES), None)
        start = _start_point(cfg, stage_cfg, policy_parent, run_dir=run_dir)
        key = _inputs_key(cfg, stage, start, upstream=results)
        # Rank 0 decides and every rank follows, so no rank trains a stage the others skip.
        existing = read_result(stage_dir) if distributed.is_main() else None
        existing = distributed.broadcast(existing if existing is not None and _still_valid(existing, key) else None)
        if existing is not None:
            log.info("[%s] skipped: complete in %s (inputs unchanged)", stage, stage_dir)
            results.append(existing)
            skipped.append(True)
            previous[stage] = existing
            _write_pipeline(run_dir, cfg, results, skipped)
            continue
        if distributed.is_main():
            (stage_dir / RESULT_FILE).unlink(missing_ok=True)  # never describe weights about to change
        distributed.barrier()
        log.info("[%s] running from %s -> %s", stage, start.label, stage_dir)
        ctx = StageContext(cfg, run_dir, stage_dir, stage, start, index == 0, previous=dict(previous), inputs_key=key, tracker=tracker)
        with tracking.stage_run(ctx):  # one W&B run per stage, finished (as failed) also when the stage raises
            result = _run_stage(stage, stage_cfg, ctx, key)
            tracking.record_result(tracker, result)
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


def _start_point(cfg: AlignmentConfig, stage_cfg, parent: Optional[StageResult], *, run_dir: Path) -> StartPoint:
    if stage_cfg.init_from:
        return resolve_start(stage_cfg.init_from, run_dir=run_dir)
    if parent is not None:
        return StartPoint(parent.checkpoint, parent.checkpoint_hash, parent.stage)
    if cfg.model.name_or_path:
        return resolve_start(cfg.model.name_or_path, run_dir=run_dir)
    return StartPoint(None, None)


def _inputs_key(cfg: AlignmentConfig, stage: str, start: StartPoint, *, upstream: list[StageResult]) -> str:
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
    return inputs_hash(config=config, parent_hash=start.hash, parent_ref=start.path, data_fingerprint=source_fingerprint(cfg, stage_cfg))


def source_fingerprint(cfg: AlignmentConfig, stage_cfg) -> str:
    """A cheap fingerprint of the data a stage reads, known before anything is loaded."""
    data_cfg = stage_data(cfg.data, stage_cfg)
    path = stage_source(data_cfg, stage_cfg.data_path)
    if path is None:
        return "suite:" + suite_fingerprint(load_suite(cfg.data.suite))
    if path == MIXTURE:
        return "mixture:" + "|".join(f"{_file_fingerprint(s.path)}*{s.weight}" for s in data_cfg.sources)
    return _file_fingerprint(path)


def _file_fingerprint(path: str) -> str:
    local = Path(path).expanduser()
    if local.is_file():
        digest = hashlib.sha256()
        with open(local, "rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
        return f"file:{digest.hexdigest()}"
    return f"name:{path}"


def _still_valid(result: StageResult, key: str) -> bool:
    if result.status != "complete" or result.inputs_hash != key or not result.checkpoint:
        return False
    checkpoint = Path(result.checkpoint)
    expected = result.data.get("checkpoint_files") if isinstance(result.data, dict) else None
    if not (checkpoint / "config.json").is_file():
        return False
    # Sizes are a cheap check for a truncated or replaced checkpoint; the content hash stays
    # the lineage record (rehashing a 70B checkpoint on every rerun would cost minutes).
    return expected is None or all((checkpoint / name).is_file() and (checkpoint / name).stat().st_size == size for name, size in expected.items())


def _run_stage(stage: str, stage_cfg, ctx: StageContext, key: str) -> StageResult:
    started = time.monotonic()
    try:
        result = RUNNERS[stage](stage_cfg, ctx)
    except BaseException as err:
        if distributed.is_main():
            # "preempted" and "failed" both rerun on the next command; a preempted stage resumes
            # from its mid-stage checkpoint, so does a failed one that had written any.
            failed = StageResult(
                stage=stage, status="preempted" if isinstance(err, Preempted) else "failed", checkpoint=None,
                checkpoint_hash=None, parent_stage=ctx.start.parent_stage, parent_checkpoint=ctx.start.path,
                parent_checkpoint_hash=ctx.start.hash, data_fingerprint=None, inputs_hash=key,
                config=dataclasses.asdict(stage_cfg), wall_seconds=time.monotonic() - started, versions=package_versions(),
                git_commit=git_commit(), error=f"{type(err).__name__}: {err}", launch=launch_record(ctx.cfg),
            )
            atomic_write_json(ctx.stage_dir / RESULT_FILE, failed.to_dict())
        raise
    result.inputs_hash = key
    result.wall_seconds = time.monotonic() - started
    result.versions = package_versions()
    result.git_commit = git_commit()
    result.launch = launch_record(ctx.cfg)
    checkpoint = Path(result.checkpoint)
    result.data["checkpoint_files"] = {p.relative_to(checkpoint).as_posix(): p.stat().st_size for p in sorted(checkpoint.rglob("*")) if p.is_file()}
    if distributed.is_main():
        atomic_write_json(ctx.stage_dir / RESULT_FILE, result.to_dict())
        # The stage is committed: its mid-stage checkpoints (optimizer states included, several
        # times the model's size) can no longer be resumed from, so they go.
        shutil.rmtree(trainer_dir(ctx.stage_dir), ignore_errors=True)
    distributed.barrier()
    return result


def launch_record(cfg: AlignmentConfig) -> dict:
    """How the stage ran: processes, ZeRO stage and, under Slurm, the job (its id survives requeues)."""
    env = os.environ
    record = {"world_size": distributed.world_size(), "nnodes": cfg.launcher.nnodes, "zero_stage": cfg.deepspeed.zero_stage,
              "offload_optimizer": cfg.deepspeed.offload_optimizer, "offload_params": cfg.deepspeed.offload_params,
              "peft": cfg.model.peft}
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


def validate(cfg: AlignmentConfig) -> None:
    """Cross-field rules, checked before any model or data is loaded."""
    if not cfg.stages:
        raise StageError("no stages to run: pick a recipe with +recipe=NAME (see README: sft_then_dpo, sft, dpo)")
    unknown = [s for s in cfg.stages if s not in RUNNERS]
    if unknown:
        raise StageError(f"recipe {cfg.recipe!r}: unknown stage(s) {unknown} in 'stages'; known stages: {sorted(RUNNERS)}")
    if len(set(cfg.stages)) != len(cfg.stages):
        raise StageError(f"recipe {cfg.recipe!r}: a stage appears twice in 'stages' {list(cfg.stages)}")
    for stage in cfg.stages:
        train = getattr(cfg, stage)
        for name in ("learning_rate", "per_device_batch_size", "gradient_accumulation_steps", "max_seq_tokens"):
            if getattr(train, name) <= 0:
                raise StageError(f"{stage}.{name}={getattr(train, name)} must be > 0")
        if train.max_steps <= 0 and train.num_epochs <= 0:
            raise StageError(f"{stage}: set {stage}.num_epochs > 0 or {stage}.max_steps > 0")
        data_cfg = stage_data(cfg.data, train)
        path = stage_source(data_cfg, train.data_path)
        for source in [s.path for s in data_cfg.sources] if path == MIXTURE else [path] if path else []:
            if Path(source).suffix and not Path(source).expanduser().is_file():
                key = f"{stage}.data_path" if train.data_path else f"{stage}.data_sources/data.sources" if path == MIXTURE else "data.path"
                raise StageError(f"{key}: {source}: no such file")
    first = getattr(cfg, cfg.stages[0])
    if cfg.stages[0] in ("dpo", "ppo", "reward") and not (first.init_from or cfg.model.name_or_path):
        name = cfg.stages[0]
        raise StageError(f"recipe {cfg.recipe!r}: {name} is the first stage, so it needs a policy: set {name}.init_from=<stage dir or HF dir>")
    if "ppo" in cfg.stages and not cfg.ppo.reward_from and "reward" not in cfg.stages[: cfg.stages.index("ppo")]:
        raise StageError(f"recipe {cfg.recipe!r}: ppo needs a reward model: put a reward stage before it or set ppo.reward_from=<reward stage or HF dir>")
    if cfg.dpo.pair_labeler not in ("auto", "verifier", "reward"):
        raise StageError(f"dpo.pair_labeler={cfg.dpo.pair_labeler!r}: use auto, verifier or reward")
    if cfg.ppo.value_from not in ("reward", "policy"):
        raise StageError(f"ppo.value_from={cfg.ppo.value_from!r}: use reward or policy")
    _validate_scale_out(cfg)
    tracking.check_config(cfg)
    if cfg.data.over_length not in ("drop", "truncate", "error"):
        raise StageError(f"data.over_length={cfg.data.over_length!r}: use drop, truncate or error")
    if cfg.eval.samples_per_prompt < 1 or cfg.eval.temperature < 0 or cfg.eval.max_new_tokens < 1:
        raise StageError("eval.samples_per_prompt and eval.max_new_tokens must be >= 1 and eval.temperature >= 0")


def planned_world_size(cfg: AlignmentConfig) -> int:
    """Processes the run will have: this job's WORLD_SIZE once launched, else the launcher's plan."""
    if "WORLD_SIZE" in os.environ:
        return distributed.world_size()
    launcher = cfg.launcher
    if launcher.name == "slurm":
        return launcher.nodes * (launcher.gpus_per_node or launcher.cpu_procs_per_node)
    return launcher.nproc_per_node * launcher.nnodes


def batch_plan(cfg: AlignmentConfig) -> list[str]:
    """Each stage's batch algebra as a line a user can check: per device x accumulation x processes."""
    world = planned_world_size(cfg)
    lines = []
    for stage in cfg.stages:
        train = getattr(cfg, stage)
        if stage == "ppo":
            lines.append(f"ppo: {train.rollout_batch_size} prompts per rollout = {train.rollout_batch_size // world} per process x {world} "
                         f"processes; {train.mini_batch_size} rollouts per optimiser step = {train.mini_batch_size // world} per process x {world}")
        else:
            global_batch = train.per_device_batch_size * train.gradient_accumulation_steps * world
            lines.append(f"{stage}: {train.per_device_batch_size} per device x {train.gradient_accumulation_steps} accumulation x "
                         f"{world} processes = {global_batch} sequences per step")
    return lines


def _validate_scale_out(cfg: AlignmentConfig) -> None:
    """Batch-size algebra, ZeRO options, LoRA and the launcher, before anything is launched."""
    launcher, ds = cfg.launcher, cfg.deepspeed
    if launcher.name not in ("local", "slurm"):
        raise StageError(f"launcher.name={launcher.name!r}: use launcher=local or launcher=slurm")
    for key in ("nproc_per_node", "nnodes", "nodes", "cpu_procs_per_node"):
        if getattr(launcher, key) < 1:
            raise StageError(f"launcher.{key}={getattr(launcher, key)} must be >= 1")
    if ds.zero_stage not in (0, 1, 2, 3):
        raise StageError(f"deepspeed.zero_stage={ds.zero_stage}: use 0 (off), 1, 2 or 3 (deepspeed=none|zero1|zero2|zero3|zero3_offload)")
    if ds.offload_params and ds.zero_stage != 3:
        raise StageError(f"deepspeed.offload_params=true needs ZeRO stage 3 (deepspeed.zero_stage is {ds.zero_stage}); use deepspeed=zero3_offload")
    if ds.offload_optimizer and ds.zero_stage == 0:
        raise StageError("deepspeed.offload_optimizer=true needs ZeRO (deepspeed=zero1|zero2|zero3)")
    world = planned_world_size(cfg)
    for stage in cfg.stages:
        train = getattr(cfg, stage)
        global_batch = train.per_device_batch_size * train.gradient_accumulation_steps * world
        if train.global_batch_size is not None and train.global_batch_size != global_batch:
            per_step = train.per_device_batch_size * world
            hint = (f"set {stage}.gradient_accumulation_steps={train.global_batch_size // per_step}" if train.global_batch_size % per_step == 0
                    else f"pick a global batch that is a multiple of {per_step} (per device x processes)")
            raise StageError(
                f"{stage}: per_device_batch_size {train.per_device_batch_size} x gradient_accumulation_steps "
                f"{train.gradient_accumulation_steps} x {world} processes = {global_batch}, but {stage}.global_batch_size="
                f"{train.global_batch_size}; {hint}"
            )
        if train.save_every_n_steps < 0 or train.keep_checkpoints < 1:
            raise StageError(f"{stage}.save_every_n_steps must be >= 0 and {stage}.keep_checkpoints >= 1")
    ppo = cfg.ppo
    if ppo.rollout_batch_size % ppo.mini_batch_size:
        raise StageError(f"ppo.rollout_batch_size={ppo.rollout_batch_size} must be a multiple of ppo.mini_batch_size={ppo.mini_batch_size}")
    if "ppo" in cfg.stages and (ppo.rollout_batch_size % world or ppo.mini_batch_size % world):
        raise StageError(
            f"ppo: rollout_batch_size {ppo.rollout_batch_size} and mini_batch_size {ppo.mini_batch_size} must both divide evenly "
            f"over {world} processes (each process samples rollout_batch_size / {world} prompts and trains on "
            f"mini_batch_size / {world} of them per step)"
        )
    if cfg.model.peft not in (None, "lora", "qlora"):
        raise StageError(f"model.peft={cfg.model.peft!r}: use lora, qlora, or leave it unset for full fine-tuning")
    from alignment.lora import qlora_problem

    problem = qlora_problem(cfg)
    if problem:  # before anything loads: QLoRA needs a GPU, bitsandbytes and a checkpoint on disk
        raise StageError(problem)
