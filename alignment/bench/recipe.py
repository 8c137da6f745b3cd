"""Time and quality of a recipe on the embedded default, over several seeds.

Runs the real command once per seed, as a user would (a fresh process, start-up included),
with ``seed``, ``model.init_seed`` and ``data.suite.seed`` all set to the seed, then prints
per-seed rows and the mean and spread, checks the bars of the default recipe, and writes the
same as JSON.

    python -m alignment.bench.recipe --seeds 0 1 2
    python -m alignment.bench.recipe --recipe sft_then_dpo --seeds 0 --out /tmp/bench -- sft.max_steps=20

Bars: ``sft_then_dpo`` in <= 300 s on a 2-core machine with SFT sampled gold accuracy >= 0.5
and DPO's above SFT's; ``sft_rm_ppo`` in <= 600 s with reward pair accuracy >= 0.8 and PPO's
sampled gold accuracy above SFT's; ``sft_rm_dpo`` in <= 600 s with DPO's above SFT's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

# Per recipe: wall-time limit on a 2-core machine and the stage whose sampled gold accuracy must
# beat SFT's (issues 2 and 3). sft_rm_ppo also needs a reward model with pair accuracy >= 0.8.
BARS = {"sft_then_dpo": (300.0, "dpo"), "sft_rm_ppo": (600.0, "ppo"), "sft_rm_dpo": (600.0, "dpo")}
SFT_SAMPLED_FLOOR = 0.5
REWARD_PAIR_ACCURACY_FLOOR = 0.8


def run_seed(recipe: str, seed: int, out: Path, extra: list[str]) -> dict[str, Any]:
    run_name = f"bench_{recipe}_seed{seed}"
    cmd = [sys.executable, "-m", "alignment.run", f"+recipe={recipe}", f"seed={seed}", f"model.init_seed={seed}",
           f"data.suite.seed={seed}", f"run_name={run_name}", f"output_dir={out}", *extra]
    started = time.monotonic()
    done = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.monotonic() - started
    if done.returncode != 0:
        raise SystemExit(f"seed {seed} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    pipeline = json.loads((out / run_name / "pipeline.json").read_text())
    row: dict[str, Any] = {"seed": seed, "wall_seconds": wall}
    for stage in pipeline["results"]:
        for key in ("gold_accuracy_greedy", "gold_accuracy_sampled", "kl_to_parent", "reward_accuracy", "pairwise_accuracy",
                    "correct_vs_incorrect_auc", "reward_model_score", "pair_label_agreement"):
            if key in stage["metrics"]:
                row[f"{stage['stage']}/{key}"] = stage["metrics"][key]
        row[f"{stage['stage']}/wall_seconds"] = stage["wall_seconds"]
    return row


def summarise(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    keys = [k for k in rows[0] if k != "seed"]
    out = {}
    for key in keys:
        values = [r[key] for r in rows if key in r]
        out[key] = {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                    "min": min(values), "max": max(values)}
    return out


def print_table(rows: list[dict[str, Any]], summary: dict[str, dict[str, float]]) -> None:
    keys = list(summary)
    width = max(len(k) for k in keys)
    print("metric".ljust(width), *(f"seed {r['seed']}".rjust(9) for r in rows), "mean".rjust(9), "std".rjust(8))
    for key in keys:
        cells = [f"{r[key]:9.3f}" if key in r else " " * 9 for r in rows]
        print(key.ljust(width), *cells, f"{summary[key]['mean']:9.3f}", f"{summary[key]['std']:8.3f}")


def check_bars(recipe: str, rows: list[dict[str, Any]]) -> list[str]:
    if recipe not in BARS:
        return []
    wall_limit, final = BARS[recipe]
    failures = []
    for r in rows:
        if r["wall_seconds"] > wall_limit:
            failures.append(f"seed {r['seed']}: wall {r['wall_seconds']:.0f} s > {wall_limit:.0f} s")
        if recipe == "sft_then_dpo" and r["sft/gold_accuracy_sampled"] < SFT_SAMPLED_FLOOR:
            failures.append(f"seed {r['seed']}: SFT sampled accuracy {r['sft/gold_accuracy_sampled']:.3f} < {SFT_SAMPLED_FLOOR}")
        if recipe == "sft_rm_ppo" and r["reward/pairwise_accuracy"] < REWARD_PAIR_ACCURACY_FLOOR:
            failures.append(f"seed {r['seed']}: reward pair accuracy {r['reward/pairwise_accuracy']:.3f} < {REWARD_PAIR_ACCURACY_FLOOR}")
        if r[f"{final}/gold_accuracy_sampled"] <= r["sft/gold_accuracy_sampled"]:
            failures.append(f"seed {r['seed']}: {final} sampled accuracy {r[f'{final}/gold_accuracy_sampled']:.3f} not above SFT's")
    return failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="sft_then_dpo")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path("outputs/bench"))
    parser.add_argument("overrides", nargs="*", help="extra config overrides, after --")
    args = parser.parse_args(argv)
    rows = []
    for seed in args.seeds:
        rows.append(run_seed(args.recipe, seed, args.out.resolve(), args.overrides))
        print(f"seed {seed}: {rows[-1]['wall_seconds']:.0f} s", flush=True)
    summary = summarise(rows)
    print_table(rows, summary)
    failures = check_bars(args.recipe, rows)
    for failure in failures:
        print("BAR MISSED:", failure)
    if args.recipe in BARS and not failures:
        print(f"bars of {args.recipe} met on every seed")
    report = {"recipe": args.recipe, "seeds": args.seeds, "overrides": args.overrides, "rows": rows, "summary": summary, "bar_failures": failures}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"bench_{args.recipe}.json").write_text(json.dumps(report, indent=2))
    print(f"written: {args.out / f'bench_{args.recipe}.json'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
