"""The frontier: every preference stage of one or more runs placed on quality against KL to its parent.

Each complete DPO, PPO, GRPO or RLOO stage is one point: x is its KL to the policy it started from
(nats per response, estimated on its own samples of the held-out prompts), y its sampled gold
accuracy, or the reward model's mean score where the data has no verifier. The parent (SFT) sits
at KL 0. Points of one method share a colour and are labelled with the knob that trades reward
for KL (DPO's beta, PPO's kl_coef, GRPO's and RLOO's beta): the DPO paper's reward-versus-KL
comparison in miniature. ``python -m alignment.bench.frontier`` sweeps those knobs from one SFT
checkpoint and writes this figure and table.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from matplotlib.figure import Figure

from alignment.records import StageResult, UnreadableRecord, read_result
from alignment.report.table import Run

# method -> the config key that trades reward for KL
KNOBS = {"dpo": "beta", "ppo": "kl_coef", "grpo": "beta", "rloo": "beta"}
COLOURS = {"dpo": "tab:blue", "ppo": "tab:orange", "grpo": "tab:green", "rloo": "tab:red"}
DPI = 100


@dataclass(frozen=True)
class Point:
    run: str
    method: str  # dpo | ppo | grpo | rloo, or the parent stage for the KL-0 point
    knob: Optional[float]
    kl: float
    quality: float
    quality_name: str  # what y is: gold_accuracy_sampled or reward_model_score


def quality(metrics: dict) -> Optional[tuple[str, float]]:
    for key in ("gold_accuracy_sampled", "reward_model_score"):
        if isinstance(metrics.get(key), (int, float)):
            return key, float(metrics[key])
    return None


def frontier_points(runs: Sequence[Run]) -> tuple[list[Point], list[Point]]:
    """(points of the preference stages, their parents at KL 0, each parent once)."""
    points, parents, seen = [], [], set()
    for run in runs:
        for r in run.stages:
            if r.stage not in KNOBS or r.status != "complete" or not isinstance(r.metrics.get("kl_to_parent"), (int, float)):
                continue
            q = quality(r.metrics)
            if q is None:
                continue
            knob = r.config.get(KNOBS[r.stage])
            points.append(Point(run.name, r.stage, float(knob) if knob is not None else None, float(r.metrics["kl_to_parent"]), q[1], q[0]))
            parent = _parent(r, run)
            if parent is not None and r.parent_checkpoint not in seen:
                seen.add(r.parent_checkpoint)
                pq = quality(parent.metrics)
                if pq is not None and pq[0] == q[0]:
                    parents.append(Point(run.name, parent.stage, None, 0.0, pq[1], pq[0]))
    return points, parents


def _parent(result: StageResult, run: Run) -> Optional[StageResult]:
    """The stage the result started from: in the same run, or the stage directory its checkpoint lives in."""
    in_run = next((r for r in run.stages if r.checkpoint == result.parent_checkpoint and r.checkpoint), None)
    if in_run is not None or not result.parent_checkpoint:
        return in_run
    try:
        return read_result(Path(result.parent_checkpoint).parent)
    except UnreadableRecord:
        return None


def frontier_figure(runs: Sequence[Run], path: Path) -> bool:
    points, parents = frontier_points(runs)
    if not points:
        return False
    fig = Figure(figsize=(6.5, 4.5), layout="constrained")
    ax = fig.add_subplot()
    for method in KNOBS:
        mine = sorted((p for p in points if p.method == method), key=lambda p: p.kl)
        if not mine:
            continue
        ax.scatter([p.kl for p in mine], [p.quality for p in mine], color=COLOURS[method], label=method.upper(), zorder=2)
        for p in mine:
            if p.knob is not None:
                ax.annotate(f"{KNOBS[method]}={p.knob:g}", (p.kl, p.quality), textcoords="offset points", xytext=(4, 3), fontsize="x-small")
    if parents:
        ax.scatter([0.0] * len(parents), [p.quality for p in parents], marker="*", s=140, color="black", label="parent (KL 0)", zorder=3)
    ylabel = "gold accuracy, sampled" if points[0].quality_name == "gold_accuracy_sampled" else "reward-model score"
    ax.set(title="Quality against KL to the parent policy", xlabel="KL to parent (nats/response)", ylabel=ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.savefig(path, dpi=DPI)
    return True


def frontier_table(runs: Sequence[Run]) -> list[str]:
    """The same points as a Markdown table, parents first, then by method and KL."""
    points, parents = frontier_points(runs)
    if not points:
        return []
    lines = ["| run | stage | knob | KL to parent | " + points[0].quality_name + " |", "|---|---|---|---:|---:|"]
    for p in parents + sorted(points, key=lambda p: (list(KNOBS).index(p.method), p.kl)):
        knob = f"{KNOBS[p.method]}={p.knob:g}" if p.knob is not None else ""
        lines.append(f"| {p.run} | {p.method} | {knob} | {p.kl:.3f} | {p.quality:.3f} |")
    return lines
