"""The benchmark: our training steps against plain TRL's, PPO's time split, whole recipes, MFU.

Parts (``--parts``, all by default; ``mfu`` only on a GPU unless named):

- ``steps``: for each stage (SFT, reward model, DPO) it trains ``--warmup + --steps`` optimiser
  steps from the same initial weights twice per repetition: once with the trainer as the
  pipeline builds it ("ours") and once with TRL's default config ("trl"; alignment/bench/
  trainers.py says exactly what each side gets). Each run is a process of its own, sides
  alternating and the side that goes first swapping each repetition (ours, trl, trl, ours, ...),
  torch threads pinned. Per stage: median tokens per second of each side, the ratio ours/TRL
  (paired by repetition) as min/median/max, peak memory, and the first step's loss of each
  side with whether they agree. DPO runs TRL's objective unless ``--dpo-sft-weight`` sets the
  pipeline's RPO term (then the losses differ, and the table says so).
- ``ppo``: our PPO stage's step split into generation, scoring and training, tokens/s of each
  (alignment/bench/ppo.py).
- ``recipes``: the default ``sft_then_dpo`` and ``sft_rm_ppo`` end to end, as a user runs them
  (alignment/bench/recipe.py), wall time per stage and quality.
- ``mfu``: model FLOPs utilisation of SFT and DPO on a ~0.5B model in bf16 (alignment/bench/mfu.py).

Everything printed goes to ``--out`` as JSON too. A benchmark, not a test:
tests/test_bench_smoke.py runs it once at tiny sizes.

    python -m alignment.bench                                    # everything, ~10 min on 2 cores
    python -m alignment.bench --parts steps --reps 5 --steps 20 --warmup 3
    python -m alignment.bench --parts steps --stages dpo --dpo-sft-weight 0.2 -- dpo.beta=0.2
    python -m alignment.bench --tiny --reps 1 --steps 2 --warmup 1 --parts steps ppo   # the smoke
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import datasets
import torch
import transformers

from alignment.bench import recipe
from alignment.bench.ppo import ppo_phases, print_ppo
from alignment.bench.steps import run_in_child, spread, timed_run
from alignment.bench.trainers import SIDES, STAGES, bench_config, build_workload, same_objective
from alignment.run import threads_per_process

# First-step losses agree when |ours - trl| <= LOSS_RTOL * max(1, |trl|). Not tighter: TRL's
# default runs under bf16 autocast (on CPU too), ours in float32 on the embedded default.
LOSS_RTOL = 2e-2

def stage_summary(stage: str, runs: list[dict[str, Any]], *, same: bool) -> dict[str, Any]:
    side = {s: [r for r in runs if r["side"] == s] for s in SIDES}
    ratios = [o["tokens_per_second"] / t["tokens_per_second"] for o, t in zip(side["ours"], side["trl"])]
    loss = {s: side[s][0]["first_loss"] for s in SIDES}
    if not same:
        match = "differs"
    else:
        match = "yes" if abs(loss["ours"] - loss["trl"]) <= LOSS_RTOL * max(1.0, abs(loss["trl"])) else "no"
    return {
        "stage": stage,
        "tokens_per_second": {s: spread([r["tokens_per_second"] for r in side[s]]) for s in SIDES},
        "ratio_ours_over_trl": spread(ratios),
        "peak_memory_mb": {s: spread([r["peak_memory_mb"] for r in side[s]]) for s in SIDES},
        "first_loss": loss,
        "loss_match": match,
        "settings": {s: {k: side[s][0][k] for k in ("precision", "gradient_checkpointing", "lr_scheduler")} for s in SIDES},
    }


def print_table(summaries: list[dict[str, Any]], *, memory_label: str) -> None:
    head = ["stage", "ours tok/s", "trl tok/s", "ratio min", "median", "max", f"{memory_label} ours", "trl", "loss ours", "trl", "match"]
    rows = []
    for s in summaries:
        tps, ratio, mem, loss = s["tokens_per_second"], s["ratio_ours_over_trl"], s["peak_memory_mb"], s["first_loss"]
        rows.append([s["stage"], f"{tps['ours']['median']:.0f}", f"{tps['trl']['median']:.0f}", f"{ratio['min']:.2f}",
                     f"{ratio['median']:.2f}", f"{ratio['max']:.2f}", f"{mem['ours']['median']:.0f}", f"{mem['trl']['median']:.0f}",
                     f"{loss['ours']:.4f}", f"{loss['trl']:.4f}", s["loss_match"]])
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    for r in [head, *rows]:
        print("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))))
    for s in summaries:
        print(f"{s['stage']}: ours {s['settings']['ours']}, trl {s['settings']['trl']}")


PARTS = ("steps", "ppo", "recipes", "mfu")
RECIPES = ("sft_then_dpo", "sft_rm_ppo")


def run_steps(args: argparse.Namespace, threads: int, tmp: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The A/B step benchmark: per stage, ``--reps`` alternating (ours, trl) pairs."""
    cfg = bench_config(tiny=args.tiny, dpo_sft_weight=args.dpo_sft_weight, rows_for_steps=args.warmup + args.steps,
                       overrides=args.overrides)
    workload = build_workload(cfg, work_dir=tmp) if args.in_process else None
    summaries, runs = [], []
    for stage in args.stages:
        stage_runs = []
        for rep in range(args.reps):
            for side in SIDES if rep % 2 == 0 else SIDES[::-1]:
                if workload is not None:
                    run = timed_run(stage, side, workload, steps=args.steps, warmup=args.warmup, threads=threads,
                                    device=args.device, run_dir=tmp / f"{stage}_{side}_{rep}")
                else:
                    run = run_in_child(stage, side, steps=args.steps, warmup=args.warmup, threads=threads, device=args.device,
                                       tiny=args.tiny, dpo_sft_weight=args.dpo_sft_weight, overrides=args.overrides, work_dir=tmp)
                stage_runs.append({**run, "rep": rep})
                print(f"{stage} {side} rep {rep}: {run['tokens_per_second']:.0f} tok/s, loss {run['first_loss']:.4f}", flush=True)
        summaries.append(stage_summary(stage, stage_runs, same=same_objective(stage, cfg)))
        runs.extend(stage_runs)
    print_table(summaries, memory_label="peak alloc MB" if args.device == "cuda" else "RSS growth MB")
    return summaries, runs


def run_recipes(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """Each default recipe once, seed 0, as a user runs it; wall times, quality and its bars."""
    results = {}
    for name in RECIPES:
        row = recipe.run_seed(name, 0, tmp / "recipes", [])
        failures = recipe.check_bars(name, [row])
        results[name] = {**row, "bar_failures": failures}
        stages = " ".join(f"{k.split('/')[0]} {v:.0f} s" for k, v in row.items() if k.endswith("/wall_seconds"))
        print(f"{name}: {row['wall_seconds']:.0f} s ({stages}); "
              + " ".join(f"{k} {v:.3f}" for k, v in row.items() if k.endswith("gold_accuracy_sampled"))
              + ("; bars met" if not failures else "; BAR MISSED: " + "; ".join(failures)), flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=None, help="default: steps ppo recipes (+ mfu on a GPU)")
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    parser.add_argument("--steps", type=int, default=20, help="timed optimiser steps (PPO: rollouts) per run")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before them")
    parser.add_argument("--reps", type=int, default=3, help="repetitions of each (ours, trl) pair")
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0: every core this process may use")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dpo-sft-weight", type=float, default=0.0, help="dpo.sft_loss_weight (0: TRL's objective, losses comparable)")
    parser.add_argument("--tiny", action="store_true", help="a 1-layer, 32-wide model and batches of 8 (the smoke)")
    parser.add_argument("--in-process", action="store_true", help="all step runs in this process (faster; rougher memory)")
    parser.add_argument("--out", type=Path, default=Path("bench.json"))
    parser.add_argument("overrides", nargs="*", help="config overrides for both sides' workload, after --")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    parts = args.parts or [p for p in PARTS if p != "mfu" or args.device == "cuda"]
    threads = threads_per_process(args.threads, 1)
    datasets.disable_progress_bars()  # per-run tokenizing bars would bury the results
    transformers.logging.set_verbosity_error()
    started = time.monotonic()
    report: dict[str, Any] = {
        "device": args.device, "threads": threads, "steps": args.steps, "warmup": args.warmup, "reps": args.reps,
        "tiny": args.tiny, "dpo_sft_loss_weight": args.dpo_sft_weight, "overrides": args.overrides, "parts": parts,
        "memory": "torch.cuda.max_memory_allocated" if args.device == "cuda" else "peak process RSS minus RSS before train()",
        "isolation": "one process per run" if not args.in_process else "one process",
        "loss_rtol": LOSS_RTOL, "torch": torch.__version__, "cpu_count": os.cpu_count(),
    }
    bad = []
    with tempfile.TemporaryDirectory(prefix="alignment_bench_") as tmp:
        if "steps" in parts:
            report["stages"], report["runs"] = run_steps(args, threads, Path(tmp))
            bad += [s["stage"] for s in report["stages"] if not all(math.isfinite(x) and x > 0 for x in s["ratio_ours_over_trl"].values())]
        if "ppo" in parts:
            report["ppo"] = ppo_phases(steps=args.steps, warmup=args.warmup, threads=threads, tiny=args.tiny,
                                       overrides=args.overrides, work_dir=Path(tmp) / "ppo_bench")
            print_ppo(report["ppo"])
        if "recipes" in parts:
            report["recipes"] = run_recipes(args, Path(tmp))
        if "mfu" in parts:
            from alignment.bench import mfu

            report["mfu"] = mfu.measure(device=args.device, size="tiny" if args.tiny else "0.5b", stages=["sft", "dpo"],
                                        steps=args.steps, warmup=args.warmup, batch=4 if args.tiny else 8,
                                        seq_tokens=64 if args.tiny else 1024, threads=threads)
            mfu.print_table(report["mfu"])
    report["wall_seconds"] = time.monotonic() - started
    args.out.write_text(json.dumps(report, indent=2))
    print(f"written: {args.out} ({report['wall_seconds']:.0f} s)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
