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
import time
from pathlib import Path
from typing import Callable, Optional

from alignment.config import AlignmentConfig
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
    results: list[StageResult] = []
    skipped: list[bool] = []
    previous: dict[str, StageResult] = {}
    for index, stage in enumerate(cfg.stages):
        stage_cfg = getattr(cfg, stage)
        stage_dir = run_dir / stage
        policy_parent = next((r for r in reversed(results) if r.stage in POLICY_STAGES), None)
        start = _start_point(cfg, stage_cfg, policy_parent, run_dir=run_dir)
        key = _inputs_key(cfg, stage, start, upstream=results)
        existing = read_result(stage_dir)
        if existing is not None and _still_valid(existing, key):
            log.info("[%s] skipped: complete in %s (inputs unchanged)", stage, stage_dir)
            results.append(existing)
            skipped.append(True)
            previous[stage] = existing
            _write_pipeline(run_dir, cfg, results, skipped)
            continue
        (stage_dir / RESULT_FILE).unlink(missing_ok=True)  # never describe weights about to change
        log.info("[%s] running from %s -> %s", stage, start.label, stage_dir)
        ctx = StageContext(cfg, run_dir, stage_dir, stage, start, index == 0, previous=dict(previous))
        result = _run_stage(stage, stage_cfg, ctx, key)
        results.append(result)
        skipped.append(False)
        previous[stage] = result
        _write_pipeline(run_dir, cfg, results, skipped)
        log.info("[%s] done in %.1f s: %s", stage, result.wall_seconds, result.checkpoint)
    print(format_table(results), flush=True)
    print(f"results: {run_dir / 'pipeline.json'}", flush=True)
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
        failed = StageResult(
            stage=stage, status="failed", checkpoint=None, checkpoint_hash=None, parent_stage=ctx.start.parent_stage,
            parent_checkpoint=ctx.start.path, parent_checkpoint_hash=ctx.start.hash, data_fingerprint=None,
            inputs_hash=key, config=dataclasses.asdict(stage_cfg), wall_seconds=time.monotonic() - started,
            versions=package_versions(), git_commit=git_commit(), error=f"{type(err).__name__}: {err}",
        )
        atomic_write_json(ctx.stage_dir / RESULT_FILE, failed.to_dict())
        raise
    result.inputs_hash = key
    result.wall_seconds = time.monotonic() - started
    result.versions = package_versions()
    result.git_commit = git_commit()
    checkpoint = Path(result.checkpoint)
    result.data["checkpoint_files"] = {p.relative_to(checkpoint).as_posix(): p.stat().st_size for p in sorted(checkpoint.rglob("*")) if p.is_file()}
    atomic_write_json(ctx.stage_dir / RESULT_FILE, result.to_dict())
    return result


def _write_pipeline(run_dir: Path, cfg: AlignmentConfig, results: list[StageResult], skipped: list[bool]) -> None:
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
    if cfg.ppo.rollout_batch_size % cfg.ppo.mini_batch_size:
        raise StageError(
            f"ppo.rollout_batch_size={cfg.ppo.rollout_batch_size} must be a multiple of ppo.mini_batch_size={cfg.ppo.mini_batch_size}"
        )
    if cfg.data.over_length not in ("drop", "truncate", "error"):
        raise StageError(f"data.over_length={cfg.data.over_length!r}: use drop, truncate or error")
    if cfg.eval.samples_per_prompt < 1 or cfg.eval.temperature < 0 or cfg.eval.max_new_tokens < 1:
        raise StageError("eval.samples_per_prompt and eval.max_new_tokens must be >= 1 and eval.temperature >= 0")
