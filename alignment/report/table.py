"""A finished run, read back from disk, and the table that compares its stages.

``format_table`` is the text table the pipeline prints at the end of a run. ``load_run`` reads a
run directory (``pipeline.json`` plus each ``<stage>/result.json``) for the Markdown report and
its plots, which alignment/report/markdown.py and alignment/report/plots.py write::

    python -m alignment.report outputs/sft_then_dpo [outputs/other_run ...] [--out DIR]
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from alignment.records import StageResult, UnreadableRecord, read_result

PIPELINE_FILE = "pipeline.json"
NOT_RUN = "not run"  # the status of a planned stage that never started

# (metric key, label) in display order; a row is shown when any column has the metric.
ROWS = (
    ("gold_accuracy_greedy", "gold accuracy, greedy"),
    ("gold_accuracy_sampled", "gold accuracy, sampled T=1"),
    ("seen/gold_accuracy_sampled", "  seen phrasings, sampled"),
    ("unseen/gold_accuracy_sampled", "  unseen phrasings, sampled"),
    ("response_tokens_mean", "response length (tokens)"),
    ("eos_rate", "ends with EOS"),
    ("lm_perplexity", "plain-text perplexity (eval.lm_text)"),
    ("reward_model_score", "reward-model score of samples"),
    ("pairwise_accuracy", "reward model: pair accuracy"),
    ("correct_vs_incorrect_auc", "reward model: correct/wrong AUC"),
    ("reward_accuracy", "implicit reward accuracy"),
    ("reward_margin", "implicit reward margin"),
    ("kl_to_parent", "KL to parent (nats/response)"),
    ("pair_label_agreement", "pair labels agreeing with gold"),
    ("final/rollout/gold_accuracy", "PPO rollouts: gold accuracy, last"),
    ("train_reward_final", "GRPO/RLOO: mean reward, last step"),
    ("candidates_generated", "self-instruct: candidates written"),
    ("instructions_kept", "self-instruct: instructions kept"),
    ("train_loss_final", "final train loss"),
    ("wall_seconds", "wall seconds"),
)


class ReportError(Exception):
    """A directory that is not a run directory, or a run record that cannot be read."""


@dataclass
class Run:
    """One run directory: every stage its recipe planned, in order."""

    name: str
    path: Path
    stages: list[StageResult]  # a stage that never started has status NOT_RUN and no metrics


def table_columns(results: Sequence[StageResult]) -> list[tuple[str, dict[str, Any]]]:
    """(column name, metrics) for the starting model and each stage; unfinished stages say so."""
    columns: list[tuple[str, dict[str, Any]]] = []
    if results and results[0].start_metrics:
        columns.append(("base", results[0].start_metrics))
    stage_columns = []
    for r in results:
        name = r.stage if r.status == "complete" else f"{r.stage} ({r.status})"
        stage_columns.append((name, {**r.metrics, "wall_seconds": r.wall_seconds} if r.status != NOT_RUN else {}))
    # A reward stage scores the policy it started from: show that in the policy's column.
    by_stage = {r.stage: metrics for r, (_, metrics) in zip(results, stage_columns)}
    for r in results:
        if "parent_policy_score" in r.metrics and r.parent_stage in by_stage:
            by_stage[r.parent_stage].setdefault("reward_model_score", r.metrics["parent_policy_score"])
    return columns + stage_columns


def compare_columns(runs: Sequence[Run]) -> list[tuple[str, dict[str, Any]]]:
    """The columns of several runs side by side, named ``<run>/<column>`` (plain names for one run)."""
    return [(f"{run.name}/{name}" if len(runs) > 1 else name, metrics) for run in runs for name, metrics in table_columns(run.stages)]


def table_rows(columns: Sequence[tuple[str, dict[str, Any]]]) -> list[tuple[str, list[str]]]:
    """(label, formatted value per column) for each ROWS metric that some column has."""
    return [(label, [_fmt(metrics.get(key), key) for _, metrics in columns]) for key, label in ROWS if any(key in m for _, m in columns)]


def format_table(results: Sequence[StageResult]) -> str:
    columns = table_columns(results)
    rows = table_rows(columns)
    label_width = max([len("metric")] + [len(label) for label, _ in rows])
    widths = [max(len(name), *(len(values[i]) for _, values in rows)) for i, (name, _) in enumerate(columns)]
    lines = [
        "  ".join(["metric".ljust(label_width)] + [name.rjust(w) for (name, _), w in zip(columns, widths)]),
        "  ".join(["-" * label_width] + ["-" * w for w in widths]),
    ]
    lines += ["  ".join([label.ljust(label_width)] + [v.rjust(w) for v, w in zip(values, widths)]) for label, values in rows]
    return "\n".join(lines)


def load_run(run_dir: Path) -> Run:
    """Read ``pipeline.json`` and the stage records of one run directory."""
    run_dir = Path(run_dir)
    path = run_dir / PIPELINE_FILE
    if not path.is_file():
        raise ReportError(f"{path}: no such file; give a run directory <output_dir>/<run_name> (the one holding pipeline.json)")
    try:
        pipeline = json.loads(path.read_text(encoding="utf-8"))
        entries = {entry["stage"]: entry for entry in pipeline["results"]}
        planned = list(pipeline["stages"])
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ReportError(f"{path}: not a pipeline record ({type(err).__name__}: {err})") from err
    stages = []
    for stage in planned:
        try:
            record = read_result(run_dir / stage)
        except UnreadableRecord:
            record = None  # a broken result.json: pipeline.json's entry, if any, stands in
        entry = entries.get(stage)
        if entry is not None and (record is None or record.checkpoint_hash != entry.get("checkpoint_hash")):
            record = _from_entry(stage, entry)  # result.json lost or rewritten since: pipeline.json is this run's truth
        elif entry is None and (record is None or record.status == "complete" or len(stages) > len(entries)):
            # pipeline.json lists each stage once it finishes, so only the stage right after the last
            # one listed can have failed in this run; a complete record here is from an older command.
            record = _from_entry(stage, {"status": NOT_RUN})
        stages.append(record)
    return Run(name=pipeline.get("run_name") or run_dir.name, path=run_dir, stages=stages)


def _from_entry(stage: str, entry: dict[str, Any]) -> StageResult:
    return StageResult(stage=stage, status=entry.get("status", NOT_RUN), checkpoint=entry.get("checkpoint"),
                       checkpoint_hash=entry.get("checkpoint_hash"), parent_stage=entry.get("parent_stage"), parent_checkpoint=None,
                       parent_checkpoint_hash=None, data_fingerprint=None, inputs_hash="", config={},
                       metrics=entry.get("metrics") or {}, wall_seconds=entry.get("wall_seconds") or 0.0)


def _fmt(value: Any, key: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.1f}" if key == "wall_seconds" or abs(value) >= 100 else f"{value:.3f}"
    return str(value)
