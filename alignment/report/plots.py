"""The report's plots: one function per figure, each writing one PNG.

Every function takes the runs that alignment.report.table.load_run read, overlays them when there are
several, and returns False without writing anything when its data is absent (a recipe without
PPO, a stage that failed before logging); alignment/report/markdown.py then says so in report.md.
Figures are built with matplotlib's object API (``Figure``, rendered by Agg), so nothing needs a
display and no global pyplot state is touched::

    python -m alignment.report outputs/sft_rm_ppo   # writes outputs/sft_rm_ppo/report/*.png
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from alignment.report.table import Run, compare_columns

DPI = 100
PANEL_INCHES = (4.5, 3.2)
PANELS_PER_ROW = 3
RUN_MARKERS = "osD^v<>p*h"

# (panel title, ((metric key, bar group label), ...)): one panel per scale, grouped bars per column.
EVAL_PANELS = (
    ("gold accuracy", (("gold_accuracy_greedy", "greedy"), ("gold_accuracy_sampled", "sampled"),
                       ("seen/gold_accuracy_sampled", "seen phr.,\nsampled"),
                       ("unseen/gold_accuracy_sampled", "unseen phr.,\nsampled"))),
    ("preference accuracy, held-out pairs", (("pairwise_accuracy", "reward model"), ("reward_accuracy", "DPO implicit reward"))),
    ("reward-model score of samples", (("reward_model_score", "mean score"),)),
    ("KL to parent", (("kl_to_parent", "nats/response"),)),
    ("plain-text perplexity (eval.lm_text)", (("lm_perplexity", "per token"),)),
)
# (panel title, ((history key, line label), ...)) for the PPO per-rollout curves.
ROLLOUT_PANELS = (
    ("reward", (("reward/raw", "raw"), ("reward/normalised", "normalised"))),
    ("KL to reference (nats/response)", (("kl", "kl"),)),
    ("gold accuracy of rollouts", (("rollout/gold_accuracy", "gold accuracy"),)),
    ("entropy (nats/token)", (("entropy", "entropy"),)),
)


def training_loss(runs: Sequence[Run], path: Path) -> bool:
    """Training loss against optimiser step, one panel per stage, one line per run (PPO: policy and value loss)."""
    panels: dict[str, list[tuple[str, list[float], list[float]]]] = {}
    for run in runs:
        for result in run.stages:
            for name, steps, losses in _loss_curves(result.metrics, result.stage):
                label = " ".join(part for part in (run.name if len(runs) > 1 else "", name) if part)
                panels.setdefault(result.stage, []).append((label or "train loss", steps, losses))
    if not panels:
        return False
    fig, axes = _grid(len(panels))
    for ax, (stage, curves) in zip(axes, panels.items()):
        for label, steps, losses in curves:
            ax.plot(steps, losses, marker="o", markersize=3, label=label)
        ax.set(title=stage, xlabel="step", ylabel="loss")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if len(curves) > 1:
            ax.legend(fontsize="small")
    fig.savefig(path, dpi=DPI)
    return True


def eval_metrics(runs: Sequence[Run], path: Path) -> bool:
    """Held-out evaluation per stage (and per run): one panel per scale, a bar per stage in each group."""
    columns = compare_columns(runs)
    colours = {name: f"C{i % 10}" for i, (name, _) in enumerate(columns)}
    panels = []
    for title, metrics in EVAL_PANELS:
        present = [(key, label) for key, label in metrics if any(_number(m.get(key)) is not None for _, m in columns)]
        bars = [(name, m) for name, m in columns if any(_number(m.get(key)) is not None for key, _ in present)]
        if present:
            panels.append((title, present, bars))
    if not panels:
        return False
    fig, axes = _grid(len(panels))
    for ax, (title, present, bars) in zip(axes, panels):
        width = 0.8 / len(bars)
        for i, (name, metrics) in enumerate(bars):
            xs = [g + (i - (len(bars) - 1) / 2) * width for g in range(len(present))]
            values = [_number(metrics.get(key)) for key, _ in present]
            drawn = ax.bar([x for x, v in zip(xs, values) if v is not None], [v for v in values if v is not None],
                           width=width, color=colours[name], label=name)
            if len(bars) * len(present) <= 16:  # value labels stay legible up to about this many bars
                ax.bar_label(drawn, fmt="%.3g", fontsize=6)
        ax.set_xticks(range(len(present)), [label for _, label in present], fontsize="small")
        ax.set_title(title)
        ax.axhline(0, color="black", linewidth=0.5)
    shown = {name for _, _, bars in panels for name, _ in bars}
    handles = [Patch(color=colours[name], label=name) for name, _ in columns if name in shown]
    fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 6), fontsize="small")
    fig.savefig(path, dpi=DPI)
    return True


def ppo_reward_vs_kl(runs: Sequence[Run], path: Path) -> bool:
    """PPO's reward (raw and normalised) against KL per rollout, coloured by step; a marker per run."""
    histories = _ppo_histories(runs)
    panels = []
    for key, title in (("reward/raw", "raw reward"), ("reward/normalised", "normalised reward")):
        per_run = [(index, name, _points(history, "kl", key)) for index, (name, history) in enumerate(histories)]
        if any(points for _, _, points in per_run):
            panels.append((title, [run for run in per_run if run[2]]))
    if not panels:
        return False
    steps = [step for _, per_run in panels for _, _, points in per_run for step, _, _ in points]
    fig, axes = _grid(len(panels))
    for ax, (title, per_run) in zip(axes, panels):
        for index, name, points in per_run:
            step, kl, reward = zip(*points)
            ax.plot(kl, reward, color="grey", linewidth=0.7, zorder=1)
            scatter = ax.scatter(kl, reward, c=step, cmap="viridis", vmin=min(steps), vmax=max(steps),
                                 marker=RUN_MARKERS[index % len(RUN_MARKERS)], label=name, zorder=2)
        ax.set(title=f"{title} against KL", xlabel="KL to reference (nats/response)", ylabel=title)
        if len(histories) > 1:
            ax.legend(fontsize="small")
    fig.colorbar(scatter, ax=axes, label="rollout step").ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    fig.savefig(path, dpi=DPI)
    return True


def ppo_rollouts(runs: Sequence[Run], path: Path) -> bool:
    """PPO's per-rollout curves: reward, KL, gold accuracy of the rollouts and entropy, a colour per run."""
    histories = _ppo_histories(runs)
    if not histories:
        return False
    fig, axes = _grid(len(ROLLOUT_PANELS), per_row=2)
    for ax, (title, keys) in zip(axes, ROLLOUT_PANELS):
        for index, (name, history) in enumerate(histories):
            for line, (key, label) in enumerate(keys):
                steps, values = _series(history, key)
                if steps:
                    ax.plot(steps, values, color=f"C{index % 10}", linestyle=("-", "--", ":")[line % 3], marker="o", markersize=3,
                            label=" ".join(part for part in (name if len(histories) > 1 else "", label if len(keys) > 1 else "") if part))
        ax.set(title=title, xlabel="rollout step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if ax.get_legend_handles_labels()[1]:
            ax.legend(fontsize="small")
    fig.savefig(path, dpi=DPI)
    return True


def _loss_curves(metrics: dict[str, Any], stage: str) -> list[tuple[str, list[float], list[float]]]:
    """(name, steps, losses) lines of one stage: TRL's logged loss, or PPO's policy and value loss."""
    logged = [(_number(step), _number(loss)) for step, loss in _pairs(metrics.get("train_loss_history"))]
    logged = [(step, loss) for step, loss in logged if step is not None and loss is not None]
    if logged:
        return [("", [s for s, _ in logged], [v for _, v in logged])]
    if stage != "ppo":
        return []
    curves = [(label, *_series(metrics.get("history"), key)) for key, label in (("loss/policy", "policy loss"), ("loss/value", "value loss"))]
    return [curve for curve in curves if curve[1]]


def _ppo_histories(runs: Sequence[Run]) -> list[tuple[str, list[dict[str, Any]]]]:
    histories = []
    for run in runs:
        for result in run.stages:
            history = result.metrics.get("history")
            if result.stage == "ppo" and isinstance(history, list) and any(isinstance(row, dict) for row in history):
                histories.append((run.name, [row for row in history if isinstance(row, dict)]))
    return histories


def _series(history: Any, key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of ``key`` over a PPO history, leaving out rollouts that lack it."""
    points = _points(history, key, key)
    return [step for step, _, _ in points], [value for _, value, _ in points]


def _points(history: Any, x_key: str, y_key: str) -> list[tuple[float, float, float]]:
    """(step, x, y) of each rollout that has both keys; a rollout without a step counts from 1."""
    points = []
    for i, row in enumerate(history if isinstance(history, list) else []):
        if not isinstance(row, dict):
            continue
        step, x, y = _number(row.get("step")), _number(row.get(x_key)), _number(row.get(y_key))
        if x is not None and y is not None:
            points.append((i + 1 if step is None else step, x, y))
    return points


def _pairs(value: Any) -> list[tuple[Any, Any]]:
    return [tuple(item) for item in value if isinstance(item, (list, tuple)) and len(item) == 2] if isinstance(value, list) else []


def _number(value: Any) -> float | None:
    """A finite float, or None for anything a plot cannot place (missing, text, NaN, inf)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _grid(n_panels: int, *, per_row: int = PANELS_PER_ROW) -> tuple[Figure, list[Any]]:
    ncols = min(n_panels, per_row)
    nrows = math.ceil(n_panels / ncols)
    fig = Figure(figsize=(PANEL_INCHES[0] * ncols, PANEL_INCHES[1] * nrows), layout="constrained")
    axes = list(fig.subplots(nrows, ncols, squeeze=False).flat)
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    return fig, axes[:n_panels]
