"""The benchmark: our training steps against TRL tuned and TRL's defaults, PPO's and GRPO's time
split, whole recipes, MFU.

Parts (``--parts``, all by default; ``mfu`` only on a GPU unless named):

- ``steps``: for each stage (SFT, reward model, DPO) it trains ``--warmup + --steps`` optimiser
  steps from the same initial weights on three sides per repetition: the trainer as the pipeline
  builds it ("ours"), TRL alone as someone who knows it would configure it here ("trl_tuned"),
  and TRL with its default config ("trl_default"); alignment/bench/trainers.py says exactly what
  each side gets. Each run is a process of its own, the side order reversing each repetition,
  torch threads pinned. Per stage and side: tokens per second (median, min, max), ours over each
  TRL side (paired by repetition; the headline is ours / trl_tuned), utilisation (achieved FLOP/s,
  counted as alignment/bench/flops.py says, over a square-matmul peak measured in this run before
  and after the runs, the higher of the two), peak RSS and its growth during ``train()``, and the
  first step's loss with whether it agrees with ours. DPO runs TRL's objective unless
  ``--dpo-sft-weight`` sets the pipeline's RPO term (then the losses differ, and the table says so).
  ``--smollm2 DIR`` runs it on SmolLM2-135M-Instruct (full fine-tuning, fp32, 8 x <=128 tokens).
- ``ppo``: our PPO stage's step split into generation, scoring and training, tokens/s of each
  (alignment/bench/ppo.py); ``grpo``: the same for our GRPO stage (alignment/bench/grpo.py).
- ``recipes``: the default ``sft_then_dpo`` and ``sft_rm_ppo`` end to end, as a user runs them
  (alignment/bench/recipe.py), wall time per stage and quality.
- ``mfu``: model FLOPs utilisation of SFT and DPO on a ~0.5B model in bf16 (alignment/bench/mfu.py).

Rollout speed against plain ``model.generate`` is alignment/bench/rollouts.py; per-op profiles of
a step, alignment/bench/torch_profile.py. Everything printed goes to ``--out`` as JSON too. A
benchmark, not a test: tests/test_bench_smoke.py runs it once at tiny sizes.

    python -m alignment.bench --threads 1                        # everything on the embedded toy
    python -m alignment.bench --parts steps --reps 3 --steps 20 --warmup 3 --threads 1
    python -m alignment.bench --parts steps ppo grpo --smollm2 ../shared/data/models --reps 3 --steps 2 --warmup 1 --threads 1
    python -m alignment.bench --parts steps --stages dpo --dpo-sft-weight 0.2 -- dpo.beta=0.2
    python -m alignment.bench --tiny --reps 1 --steps 2 --warmup 1 --parts steps ppo grpo   # the smoke
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
from alignment.bench.grpo import grpo_phases, print_grpo
from alignment.bench.ppo import ppo_phases, print_ppo
from alignment.bench.steps import run_in_child, spread, timed_run
from alignment.bench.flops import matmul_peak_tflops
from alignment.bench.trainers import (BASELINES, SIDES, SMOLLM2_GGUF, STAGES, bench_config, build_workload, same_objective,
                                       save_initial_model, smollm2)
from alignment.run import threads_per_process

# First-step losses agree when |ours - side| <= LOSS_RTOL * max(1, |side|). Not tighter: TRL's
# default runs under bf16 autocast (on CPU too); ours and TRL tuned in float32 (the table prints
# the losses, so how close they are is visible).
LOSS_RTOL = 2e-2


def stage_summary(stage: str, runs: list[dict[str, Any]], *, same: bool, peak_tflops: float) -> dict[str, Any]:
    """Per side: tokens/s, utilisation and memory spreads; ours over each TRL side, paired by repetition."""
    side = {s: [r for r in runs if r["side"] == s] for s in SIDES}
    loss = {s: side[s][0]["first_loss"] for s in SIDES}
    ours_by_rep = {r["rep"]: r["tokens_per_second"] for r in side["ours"]}

    def agrees(b: str) -> str:
        if not same:
            return "differs"
        return "yes" if abs(loss["ours"] - loss[b]) <= LOSS_RTOL * max(1.0, abs(loss[b])) else "no"

    return {
        "stage": stage,
        "tokens_per_second": {s: spread([r["tokens_per_second"] for r in side[s]]) for s in SIDES},
        "ratio_ours_over": {b: spread([ours_by_rep[t["rep"]] / t["tokens_per_second"] for t in side[b]]) for b in BASELINES},
        "repetitions": {s: len(side[s]) for s in SIDES},
        "utilisation": {s: spread([r["achieved_tflops"] / peak_tflops for r in side[s]]) for s in SIDES},
        "peak_memory_mb": {s: spread([r["peak_memory_mb"] for r in side[s]]) for s in SIDES},
        "peak_rss_mb": {s: spread([r["peak_rss_mb"] for r in side[s]]) for s in SIDES},
        "mean_seq_tokens": side["ours"][0]["mean_seq_tokens"],
        "flops_per_token": side["ours"][0]["flops_per_token"],
        "model": side["ours"][0]["model"],
        "first_loss": loss,
        "loss_match": {b: agrees(b) for b in BASELINES},
        "settings": {s: {k: side[s][0][k] for k in ("precision", "gradient_checkpointing", "lr_scheduler", "padding_free")} for s in SIDES},
    }


def print_table(summaries: list[dict[str, Any]], *, memory_label: str, peak_tflops: float) -> None:
    head = ["stage", "side", "reps", "tok/s", "min", "max", "ours/side min", "median", "max", "util", "peak RSS MB", memory_label,
            "first loss", "match"]
    rows = []
    for s in summaries:
        for side in SIDES:
            tps, util = s["tokens_per_second"][side], s["utilisation"][side]
            ratio = s["ratio_ours_over"].get(side)
            rows.append([s["stage"], side, str(s["repetitions"][side]), *(f"{tps[k]:.0f}" if tps[k] >= 100 else f"{tps[k]:.1f}" for k in ("median", "min", "max")),
                         *([f"{ratio[k]:.2f}" for k in ("min", "median", "max")] if ratio else ["-", "-", "-"]),
                         f"{100 * util['median']:.1f}%", f"{s['peak_rss_mb'][side]['median']:.0f}",
                         f"{s['peak_memory_mb'][side]['median']:.0f}", f"{s['first_loss'][side]:.4f}",
                         s["loss_match"].get(side, "-")])
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    for r in [head, *rows]:
        print("  ".join(c.rjust(w) if i > 1 else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))))
    s = summaries[0]
    print(f"model: {s['model']['parameters'] / 1e6:.2f}M parameters counted, {s['model']['n_layers']} layers x {s['model']['d_model']}; "
          f"util: achieved FLOP/s (alignment/bench/flops.py) over the measured matmul peak {1e3 * peak_tflops:.1f} GFLOP/s")
    for s in summaries:
        print(f"{s['stage']}: mean {s['mean_seq_tokens']:.0f} tokens/sequence, {s['flops_per_token'] / 1e9:.3g} GFLOP/token; "
              + "; ".join(f"{side} {s['settings'][side]}" for side in SIDES))


PARTS = ("steps", "ppo", "grpo", "recipes", "mfu")
RECIPES = ("sft_then_dpo", "sft_rm_ppo")


def run_steps(args: argparse.Namespace, threads: int, tmp: Path) -> dict[str, Any]:
    """The step benchmark: per stage, ``--reps`` repetitions of every side, the order rotating."""
    cfg = bench_config(tiny=args.tiny, dpo_sft_weight=args.dpo_sft_weight, rows_for_steps=args.warmup + args.steps,
                       overrides=args.overrides)
    init_dir = tmp / "init_model"
    save_initial_model(cfg, init_dir)  # once: every run, in this process or a child, loads it
    workload = build_workload(cfg, work_dir=tmp, init_dir=init_dir) if args.in_process else None
    peaks = [matmul_peak_tflops(args.device)]
    summaries, runs = [], []
    for stage in args.stages:
        stage_runs = []
        for rep in range(args.reps):
            sides = [s for s in SIDES if s != "trl_default" or rep < args.default_reps]
            for side in sides if rep % 2 == 0 else sides[::-1]:
                if workload is not None:
                    run = timed_run(stage, side, workload, steps=args.steps, warmup=args.warmup, threads=threads,
                                    device=args.device, run_dir=tmp / f"{stage}_{side}_{rep}")
                else:
                    run = run_in_child(stage, side, steps=args.steps, warmup=args.warmup, threads=threads, device=args.device,
                                       tiny=args.tiny, dpo_sft_weight=args.dpo_sft_weight, overrides=args.overrides, work_dir=tmp,
                                       init_dir=init_dir)
                stage_runs.append({**run, "rep": rep})
                print(f"{stage} {side} rep {rep}: {run['tokens_per_second']:.0f} tok/s, loss {run['first_loss']:.4f}", flush=True)
        runs.extend(stage_runs)
    peaks.append(matmul_peak_tflops(args.device))  # before and after: the machine is shared; the higher one is used
    for stage in args.stages:
        summaries.append(stage_summary(stage, [r for r in runs if r["stage"] == stage], same=same_objective(stage, cfg),
                                       peak_tflops=max(peaks)))
    print_table(summaries, memory_label="peak alloc MB" if args.device == "cuda" else "RSS growth MB", peak_tflops=max(peaks))
    return {"stages": summaries, "runs": runs, "peak_tflops": {"before": peaks[0], "after": peaks[1], "used": max(peaks)},
            "headline": "ratio_ours_over.trl_tuned"}


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
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=None, help="default: steps ppo grpo recipes (+ mfu on a GPU)")
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    parser.add_argument("--steps", type=int, default=20, help="timed optimiser steps (PPO: rollouts) per run")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before them")
    parser.add_argument("--reps", type=int, default=3, help="repetitions of each (ours, trl) pair")
    parser.add_argument("--default-reps", type=int, default=None,
                        help="repetitions of the trl_default side (default: --reps); its first ones, paired with ours by repetition")
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0: every core this process may use")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dpo-sft-weight", type=float, default=0.0, help="dpo.sft_loss_weight (0: TRL's objective, losses comparable)")
    parser.add_argument("--tiny", action="store_true", help="a 1-layer, 32-wide model and batches of 8 (the smoke)")
    parser.add_argument("--smollm2", metavar="DIR", default=None,
                        help=f"SmolLM2-135M-Instruct from DIR/{SMOLLM2_GGUF}, full fine-tuning in fp32, batches of 8 x <=128 tokens")
    parser.add_argument("--in-process", action="store_true", help="all step runs in this process (faster; rougher memory)")
    parser.add_argument("--out", type=Path, default=Path("bench.json"))
    parser.add_argument("overrides", nargs="*", help="config overrides for both sides' workload, after --")
    args = parser.parse_args(argv)
    args.default_reps = args.reps if args.default_reps is None else min(args.default_reps, args.reps)
    if args.smollm2:
        args.overrides = [*smollm2(args.smollm2), *args.overrides]
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    parts = args.parts or [p for p in PARTS if p != "mfu" or args.device == "cuda"]
    threads = threads_per_process(args.threads, 1)
    datasets.disable_progress_bars()  # per-run tokenizing bars would bury the results
    transformers.logging.set_verbosity_error()
    started = time.monotonic()
    report: dict[str, Any] = {
        "device": args.device, "threads": threads, "steps": args.steps, "warmup": args.warmup, "reps": args.reps,
        "default_reps": args.default_reps,
        "tiny": args.tiny, "smollm2": args.smollm2, "dpo_sft_loss_weight": args.dpo_sft_weight, "overrides": args.overrides, "parts": parts,
        "memory": "torch.cuda.max_memory_allocated" if args.device == "cuda" else "peak process RSS minus RSS before train()",
        "isolation": "one process per run" if not args.in_process else "one process",
        "loss_rtol": LOSS_RTOL, "torch": torch.__version__, "cpu_count": os.cpu_count(),
    }
    bad = []
    with tempfile.TemporaryDirectory(prefix="alignment_bench_") as tmp:
        if "steps" in parts:
            report.update(run_steps(args, threads, Path(tmp)))
            bad += [s["stage"] for s in report["stages"] for r in s["ratio_ours_over"].values()
                    if not all(math.isfinite(x) and x > 0 for x in r.values())]
        if "ppo" in parts:
            report["ppo"] = ppo_phases(steps=args.steps, warmup=args.warmup, threads=threads, tiny=args.tiny,
                                       overrides=args.overrides, work_dir=Path(tmp) / "ppo_bench")
            print_ppo(report["ppo"])
        if "grpo" in parts:
            report["grpo"] = grpo_phases(steps=args.steps, warmup=args.warmup, threads=threads, tiny=args.tiny,
                                         overrides=args.overrides, work_dir=Path(tmp) / "grpo_bench")
            print_grpo(report["grpo"])
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
