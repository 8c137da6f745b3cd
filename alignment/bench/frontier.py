"""The frontier sweep: DPO, PPO, GRPO and RLOO from one SFT checkpoint, over their KL knobs and seeds.

Each (method, knob value, seed) is the real command, run as a user would, in a fresh process:
``python -m alignment.run +recipe=<method> <method>.init_from=<SFT stage> <method>.<knob>=<value>
seed=<seed>``; PPO first gets one reward model trained from the same SFT checkpoint (seed 0), which
every PPO run shares. It prints each run's sampled gold accuracy, KL to the SFT parent and stage
wall time, then the mean and std over seeds per (method, knob), writes them as JSON, and writes
the report of all runs, whose frontier figure (alignment/report/frontier.py) places every point
on accuracy against KL::

    python -m alignment.run +recipe=sft run_name=sft                      # the shared parent
    python -m alignment.bench.frontier --sft outputs/sft/sft --out outputs/frontier
    python -m alignment.bench.frontier --sft outputs/sft/sft --methods grpo --grpo 0 0.04 --seeds 0 1 2

A knob list left empty skips that method; ``--`` passes overrides to every run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

from alignment.report.frontier import KNOBS
from alignment.report.markdown import write_report

DEFAULT_VALUES = {"dpo": [0.05, 0.1, 0.5], "ppo": [0.01, 0.05, 0.2], "grpo": [0.0, 0.04, 0.2], "rloo": [0.0]}


def run_command(args: list[str], *, log: Path) -> float:
    started = time.monotonic()
    with log.open("w") as out:
        done = subprocess.run([sys.executable, "-m", "alignment.run", *args], stdout=out, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise SystemExit(f"failed ({done.returncode}): python -m alignment.run {' '.join(args)}\n  log: {log}")
    return time.monotonic() - started


def stage_row(run_dir: Path, method: str) -> dict[str, Any]:
    pipeline = json.loads((run_dir / "pipeline.json").read_text())
    stage = next(s for s in pipeline["results"] if s["stage"] == method)
    m = stage["metrics"]
    return {"gold_accuracy_sampled": m.get("gold_accuracy_sampled"), "gold_accuracy_greedy": m.get("gold_accuracy_greedy"),
            "kl_to_parent": m.get("kl_to_parent"), "stage_seconds": stage["wall_seconds"]}


def sweep(sft: Path, out: Path, plan: dict[str, list[float]], seeds: list[int], extra: list[str]) -> tuple[list[dict], list[Path]]:
    rows, run_dirs = [], []
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    common = [f"output_dir={out}", *extra]
    reward_dir = None
    if plan.get("ppo"):
        reward_dir = out / "reward" / "reward"
        wall = run_command(["+recipe=reward", f"reward.init_from={sft}", "run_name=reward", "seed=0", *common], log=logs / "reward.log")
        print(f"reward model: {reward_dir} ({wall:.0f} s)", flush=True)
    for method, values in plan.items():
        knob = KNOBS[method]
        for value in values:
            for seed in seeds:
                name = f"{method}_{knob}{value:g}_seed{seed}"  # no "=": Hydra would parse it
                args = [f"+recipe={method}", f"{method}.init_from={sft}", f"{method}.{knob}={value}", f"seed={seed}", f"run_name={name}", *common]
                if method == "ppo":
                    args.append(f"ppo.reward_from={reward_dir}")
                wall = run_command(args, log=logs / f"{name}.log")
                row = {"method": method, "knob": knob, "value": value, "seed": seed, "process_seconds": wall, **stage_row(out / name, method)}
                rows.append(row)
                run_dirs.append(out / name)
                print(f"{name}: sampled {row['gold_accuracy_sampled']:.3f}, KL {row['kl_to_parent']:.3f}, stage {row['stage_seconds']:.0f} s",
                      flush=True)
    return rows, run_dirs


def summarise(rows: list[dict]) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["method"], row["knob"], row["value"]), []).append(row)
    out = []
    for (method, knob, value), members in groups.items():
        entry: dict[str, Any] = {"method": method, "knob": knob, "value": value, "seeds": len(members)}
        for key in ("gold_accuracy_sampled", "kl_to_parent", "stage_seconds"):
            values = [m[key] for m in members]
            entry[key] = {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}
        out.append(entry)
    return out


def print_summary(summary: list[dict], parent: Optional[float]) -> None:
    if parent is not None:
        print(f"SFT parent: sampled gold accuracy {parent:.3f}")
    print(f"{'method':<6} {'knob':<14} {'seeds':>5} {'sampled acc':>15} {'KL to SFT':>15} {'stage s':>12}")
    for e in summary:
        cells = [f"{e[k]['mean']:.3f} ± {e[k]['std']:.3f}" for k in ("gold_accuracy_sampled", "kl_to_parent")]
        print(f"{e['method']:<6} {e['knob'] + '=' + format(e['value'], 'g'):<14} {e['seeds']:>5} {cells[0]:>15} {cells[1]:>15} "
              f"{e['stage_seconds']['mean']:>6.0f} ± {e['stage_seconds']['std']:<3.0f}")


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sft", type=Path, required=True, help="the SFT stage directory every method starts from")
    parser.add_argument("--out", type=Path, default=Path("outputs/frontier"))
    parser.add_argument("--methods", nargs="+", choices=list(KNOBS), default=list(KNOBS))
    for method, knob in KNOBS.items():
        parser.add_argument(f"--{method}", type=float, nargs="*", default=DEFAULT_VALUES[method], metavar=knob.upper(),
                            help=f"values of {method}.{knob} (default {DEFAULT_VALUES[method]})")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("overrides", nargs="*", help="config overrides for every run, after --")
    args = parser.parse_args(argv)
    sft, out = args.sft.resolve(), args.out.resolve()
    plan = {m: getattr(args, m) for m in args.methods if getattr(args, m)}
    rows, run_dirs = sweep(sft, out, plan, args.seeds, args.overrides)
    summary = summarise(rows)
    parent_metrics = json.loads((sft / "result.json").read_text()).get("metrics", {})
    print_summary(summary, parent_metrics.get("gold_accuracy_sampled"))
    (out / "frontier.json").write_text(json.dumps({"sft": str(sft), "plan": plan, "seeds": args.seeds, "overrides": args.overrides,
                                                   "rows": rows, "summary": summary}, indent=2))
    print(f"written: {out / 'frontier.json'}")
    print(f"report: {write_report(run_dirs, out_dir=out / 'report')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
