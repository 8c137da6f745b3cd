"""The end-of-run table: the starting model and every stage, side by side, on the same prompts."""

from __future__ import annotations

import math
from typing import Any, Sequence

from alignment.records import StageResult

# (metric key, label) in display order; a row is shown when any column has the metric.
ROWS = (
    ("gold_accuracy_greedy", "gold accuracy, greedy"),
    ("gold_accuracy_sampled", "gold accuracy, sampled T=1"),
    ("seen/gold_accuracy_sampled", "  seen phrasings, sampled"),
    ("unseen/gold_accuracy_sampled", "  unseen phrasings, sampled"),
    ("response_tokens_mean", "response length (tokens)"),
    ("eos_rate", "ends with EOS"),
    ("reward_model_score", "reward-model score of samples"),
    ("pairwise_accuracy", "reward model: pair accuracy"),
    ("correct_vs_incorrect_auc", "reward model: correct/wrong AUC"),
    ("reward_accuracy", "implicit reward accuracy"),
    ("reward_margin", "implicit reward margin"),
    ("kl_to_parent", "KL to parent (nats/response)"),
    ("pair_label_agreement", "pair labels agreeing with gold"),
    ("final/rollout/gold_accuracy", "PPO rollouts: gold accuracy, last"),
    ("train_loss_final", "final train loss"),
    ("wall_seconds", "wall seconds"),
)


def format_table(results: Sequence[StageResult]) -> str:
    columns: list[tuple[str, dict[str, Any]]] = []
    if results and results[0].start_metrics:
        columns.append(("base", results[0].start_metrics))
    for r in results:
        columns.append((r.stage + (" (failed)" if r.status != "complete" else ""), {**r.metrics, "wall_seconds": r.wall_seconds}))
    # A reward stage scores the policy it started from: show that in the policy's column.
    by_stage = {r.stage: metrics for r, (_, metrics) in zip(results, columns[-len(results):])}
    for r in results:
        if "parent_policy_score" in r.metrics and r.parent_stage in by_stage:
            by_stage[r.parent_stage].setdefault("reward_model_score", r.metrics["parent_policy_score"])
    rows = [(label, [_fmt(metrics.get(key), key) for _, metrics in columns]) for key, label in ROWS if any(key in m for _, m in columns)]
    label_width = max([len("metric")] + [len(label) for label, _ in rows])
    widths = [max(len(name), *(len(values[i]) for _, values in rows)) for i, (name, _) in enumerate(columns)]
    lines = [
        "  ".join(["metric".ljust(label_width)] + [name.rjust(w) for (name, _), w in zip(columns, widths)]),
        "  ".join(["-" * label_width] + ["-" * w for w in widths]),
    ]
    lines += ["  ".join([label.ljust(label_width)] + [v.rjust(w) for v, w in zip(values, widths)]) for label, values in rows]
    return "\n".join(lines)


def _fmt(value: Any, key: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.1f}" if key == "wall_seconds" or abs(value) >= 100 else f"{value:.3f}"
    return str(value)
