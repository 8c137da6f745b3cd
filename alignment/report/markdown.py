"""The report of one run or several: a Markdown table comparing stages (or runs) and PNG plots.

    python -m alignment.report outputs/sft_then_dpo                     # one run: a column per stage
    python -m alignment.report outputs/run_a outputs/run_b --out cmp/   # runs side by side, plots overlaid

writes ``report.md`` and the plots of alignment/report/plots.py into ``--out`` (default
``<first run dir>/report/``) and prints the path of ``report.md``. The main command calls
``write_report`` at the end of every run. A plot whose data is absent (no PPO stage, a stage
that failed before logging) is left out with a line in report.md saying why; a stage that did
not complete is named in the table's header and listed under it with its error.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

from alignment.report import frontier, plots
from alignment.records import atomic_write_text
from alignment.report.table import Run, ReportError, compare_columns, load_run, table_rows

log = logging.getLogger(__name__)

REPORT_FILE = "report.md"
# (file name, section title, plot function, what is missing when it draws nothing)
PLOTS: tuple[tuple[str, str, Callable[[Sequence[Run], Path], bool], str], ...] = (
    ("training_loss.png", "Training loss", plots.training_loss,
     "no stage logged a training loss (TRL stages log every `<stage>.logging_every_n_steps` steps)"),
    ("eval_metrics.png", "Evaluation metrics", plots.eval_metrics, "no stage has held-out evaluation metrics"),
    ("ppo_reward_vs_kl.png", "PPO: reward against KL", plots.ppo_reward_vs_kl, "no PPO stage with logged rollouts"),
    ("ppo_rollouts.png", "PPO: per-rollout curves", plots.ppo_rollouts, "no PPO stage with logged rollouts"),
    ("frontier.png", "Frontier: quality against KL to the parent", frontier.frontier_figure,
     "no DPO, PPO, GRPO or RLOO stage with a KL to its parent"),
)


def write_report(run_dirs: Sequence[Path], *, out_dir: Optional[Path] = None) -> Path:
    """Write report.md and the plots for ``run_dirs``; return the path of report.md."""
    runs = [load_run(Path(d)) for d in run_dirs]
    _name_runs(runs)
    out = Path(out_dir) if out_dir is not None else runs[0].path / "report"
    out.mkdir(parents=True, exist_ok=True)
    figures = []
    for filename, title, draw, missing in PLOTS:
        path = out / filename
        path.unlink(missing_ok=True)  # a plot left from an earlier report must not pass for this one
        try:
            drawn = draw(runs, path)
        except Exception as err:  # one broken plot must not cost the table and the other plots
            log.warning("report: %s not drawn: %s: %s", filename, type(err).__name__, err)
            path.unlink(missing_ok=True)
            figures.append((title, None, f"drawing it failed ({type(err).__name__}: {err})"))
            continue
        figures.append((title, filename if drawn else None, missing))
    report = out / REPORT_FILE
    atomic_write_text(report, render_markdown(runs, figures))
    return report


def render_markdown(runs: Sequence[Run], figures: Sequence[tuple[str, Optional[str], str]]) -> str:
    """The report's text; ``figures`` holds (title, PNG file name or None, why it is absent)."""
    lines = [f"# Report: {' vs '.join(run.name for run in runs)}", ""]
    lines += [f"- `{run.name}`: `{run.path.resolve()}` (stages: {', '.join(r.stage for r in run.stages) or 'none'})" for run in runs]
    lines += ["", "## Stages" if len(runs) == 1 else "## Runs side by side", "", *markdown_table(runs)]
    unfinished = [(run, r) for run in runs for r in run.stages if r.status != "complete"]
    if unfinished:
        lines += ["", "Did not complete:", ""]
        lines += [f"- `{_prefix(runs, run)}{r.stage}`: {r.status}" + (f": {_cell(r.error)}" if r.error else "") for run, r in unfinished]
    for title, filename, missing in figures:
        lines += ["", f"## {title}", ""]
        lines.append(f"[![{title}]({filename})]({filename})" if filename else f"Not drawn: {missing}.")
        if filename == "frontier.png":
            lines += ["", *frontier.frontier_table(runs)]
    return "\n".join(lines) + "\n"


def markdown_table(runs: Sequence[Run]) -> list[str]:
    """The end-of-run table as Markdown: rows are metrics, columns the starting model and each stage."""
    columns = compare_columns(runs)
    if not columns:
        return ["(no stages)"]
    rows = table_rows(columns)
    lines = ["| metric | " + " | ".join(_cell(name) for name, _ in columns) + " |", "|---|" + "---:|" * len(columns)]
    lines += ["| " + _cell(label.strip()) + " | " + " | ".join(values) + " |" for label, values in rows]
    return lines


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m alignment.report", description="Write report.md and PNG plots for run directories.")
    parser.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR", help="<output_dir>/<run_name>, the directory holding pipeline.json")
    parser.add_argument("--out", type=Path, default=None, help="where to write report.md and the plots (default: <first RUN_DIR>/report)")
    args = parser.parse_args(argv)
    try:
        path = write_report(args.run_dirs, out_dir=args.out)
    except ReportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"report: {path}")
    return 0


def _name_runs(runs: Sequence[Run]) -> None:
    """Give runs that share a name (the same recipe under two output dirs) their parent dir as prefix."""
    names = [run.name for run in runs]
    for run in runs:
        if names.count(run.name) > 1:
            run.name = f"{run.path.resolve().parent.name}/{run.name}"
    seen: dict[str, int] = {}
    for run in runs:  # still equal (the same directory twice): number them
        seen[run.name] = seen.get(run.name, 0) + 1
        if seen[run.name] > 1:
            run.name = f"{run.name}#{seen[run.name]}"


def _prefix(runs: Sequence[Run], run: Run) -> str:
    return f"{run.name}/" if len(runs) > 1 else ""


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell or list item: one line, pipes escaped."""
    return " ".join(str(text).split()).replace("|", "\\|")
