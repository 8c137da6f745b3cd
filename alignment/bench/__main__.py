"""Our training step against plain TRL's, side by side, on the same model and rows.

For each stage (SFT, reward model, DPO) it trains ``--warmup + --steps`` optimiser steps from
the same initial weights twice per repetition: once with the trainer as the pipeline
configures it ("ours") and once with TRL's default config ("trl"; alignment/bench/trainers.py
says exactly what each side gets). Runs alternate in one process, the side that goes first
swapping each repetition (ours, trl, trl, ours, ...) so slow drift and allocator reuse do not
always favour one side. Torch threads are pinned before every run.

It prints, per stage: median tokens per second of each side, the ratio ours/TRL (paired by
repetition) as min/median/max, peak memory, and the first step's loss of each side with
whether they agree (``differs`` where the objectives are not the same: DPO's default RPO term;
``--dpo-sft-weight 0`` makes DPO comparable). The same goes to JSON. A benchmark, not a test:
tests/test_bench_smoke.py runs it once at tiny sizes.

    python -m alignment.bench --reps 3 --steps 20 --warmup 3
    python -m alignment.bench --stages sft dpo --dpo-sft-weight 0 --threads 2 --out bench.json
    python -m alignment.bench --tiny --reps 1 --steps 2 --warmup 1     # the smoke

The whole-recipe benchmark is ``python -m alignment.bench.recipe``.
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

from alignment.bench.steps import spread, timed_run
from alignment.bench.trainers import SIDES, STAGES, build_workload, same_objective
from alignment.run import compose_config, threads_per_process

# First-step losses agree when |ours - trl| <= LOSS_RTOL * max(1, |trl|). Not tighter: TRL's
# default runs under bf16 autocast (on CPU too), ours in float32 on the embedded default.
LOSS_RTOL = 2e-2

TINY = ["model.hidden_size=32", "model.num_layers=1", "model.num_heads=2", "model.intermediate_size=64",
        "sft.per_device_batch_size=8", "reward.per_device_batch_size=8", "dpo.per_device_batch_size=8", "data.suite.n_eval=14"]


def bench_config(args: argparse.Namespace):
    """The default recipe's config, with enough suite rows for every step and the benchmark's
    overrides (tiny sizes, DPO's RPO weight, anything after ``--``)."""
    overrides = ["+recipe=sft_then_dpo", "logger=none", *(TINY if args.tiny else [])]
    if args.dpo_sft_weight is not None:
        overrides.append(f"dpo.sft_loss_weight={args.dpo_sft_weight}")
    cfg = compose_config([*overrides, *args.overrides])
    biggest_batch = max(getattr(cfg, s).per_device_batch_size * getattr(cfg, s).gradient_accumulation_steps for s in STAGES)
    rows = (args.warmup + args.steps) * biggest_batch
    return compose_config([*overrides, f"data.suite.n_train={rows}", *args.overrides])


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    parser.add_argument("--steps", type=int, default=20, help="timed optimiser steps per run")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before them")
    parser.add_argument("--reps", type=int, default=3, help="repetitions of each (ours, trl) pair")
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0: every core this process may use")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dpo-sft-weight", type=float, default=None, help="dpo.sft_loss_weight; 0 makes DPO's objective TRL's")
    parser.add_argument("--tiny", action="store_true", help="a 1-layer, 32-wide model and batches of 8 (the smoke)")
    parser.add_argument("--out", type=Path, default=Path("bench.json"))
    parser.add_argument("overrides", nargs="*", help="config overrides for both sides' workload, after --")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    threads = threads_per_process(args.threads, 1)
    datasets.disable_progress_bars()  # per-run tokenizing bars would bury the results
    transformers.logging.set_verbosity_error()
    cfg = bench_config(args)
    started = time.monotonic()
    summaries, runs = [], []
    with tempfile.TemporaryDirectory(prefix="alignment_bench_") as tmp:
        workload = build_workload(cfg, work_dir=Path(tmp))
        for stage in args.stages:
            stage_runs = []
            for rep in range(args.reps):
                for side in SIDES if rep % 2 == 0 else SIDES[::-1]:
                    run = timed_run(stage, side, workload, steps=args.steps, warmup=args.warmup, threads=threads,
                                    device=args.device, run_dir=Path(tmp) / f"{stage}_{side}_{rep}")
                    stage_runs.append({**run, "rep": rep})
                    print(f"{stage} {side} rep {rep}: {run['tokens_per_second']:.0f} tok/s, loss {run['first_loss']:.4f}", flush=True)
            summaries.append(stage_summary(stage, stage_runs, same=same_objective(stage, cfg)))
            runs.extend(stage_runs)
    memory_label = "peak alloc MB" if args.device == "cuda" else "RSS growth MB"
    print_table(summaries, memory_label=memory_label)
    report = {
        "device": args.device, "threads": threads, "steps": args.steps, "warmup": args.warmup, "reps": args.reps,
        "tiny": args.tiny, "dpo_sft_loss_weight": cfg.dpo.sft_loss_weight, "overrides": args.overrides,
        "memory": "torch.cuda.max_memory_allocated" if args.device == "cuda" else "peak process RSS minus RSS before train()",
        "loss_rtol": LOSS_RTOL, "torch": torch.__version__, "cpu_count": os.cpu_count(),
        "wall_seconds": time.monotonic() - started, "stages": summaries, "runs": runs,
    }
    bad = [s["stage"] for s in summaries if not all(math.isfinite(x) and x > 0 for x in s["ratio_ours_over_trl"].values())]
    args.out.write_text(json.dumps(report, indent=2))
    print(f"written: {args.out} ({report['wall_seconds']:.0f} s)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
