"""Where a training step's time goes: torch-profiler tables of one SFT and one DPO step.

Builds each side's trainer exactly as the step benchmark does (alignment/bench/trainers.py:
"ours" as the stage builds it, "trl_tuned" as TRL alone is best configured), trains ``--warmup``
steps unprofiled, then profiles the next optimiser step (forward, backward, optimiser, data
loading: everything between two step ends) on the CPU, and writes the top ops by self time, one
text file per stage and side, with the step's wall time and real tokens in its header.

    python -m alignment.bench.torch_profile --smollm2 ../shared/data/models --out-dir bench_results/cpu-2core
    python -m alignment.bench.torch_profile --tiny --stages sft --sides ours --out-dir /tmp/prof   # the test
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import datasets
import torch
import transformers
from torch.profiler import ProfilerActivity, profile
from transformers import TrainerCallback

from alignment.bench.steps import count_tokens_and_first_loss
from alignment.bench.trainers import SIDES, bench_config, build_trainer, build_workload, smollm2
from alignment.run import threads_per_process


class ProfileStep(TrainerCallback):
    """Profile optimiser step number ``step`` (0-based), from the end of the one before it."""

    def __init__(self, step: int) -> None:
        self.step, self.profiler, self.seconds = step, None, 0.0

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:  # the step before the profiled one has just ended
            self.profiler = profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else []))
            self.profiler.__enter__()
            self.started = time.perf_counter()
        elif state.global_step == self.step + 1 and self.profiler is not None:
            self.seconds = time.perf_counter() - self.started
            self.profiler.__exit__(None, None, None)


def profile_step(stage: str, side: str, workload, *, warmup: int, device: str, run_dir: Path, rows: int) -> str:
    """The profiler's table for one step of ``stage`` on ``side``, with a header."""
    trainer = build_trainer(stage, side, workload, max_steps=warmup + 1, run_dir=run_dir, device=device)
    tokens, first_loss = [], []
    count_tokens_and_first_loss(trainer, tokens, first_loss)
    callback = ProfileStep(warmup)
    trainer.add_callback(callback)
    trainer.train()
    table = callback.profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)
    args = trainer.args
    header = (f"# {stage}, {side}: optimiser step {warmup} (0-based) after {warmup} unprofiled; {tokens[warmup]} real tokens, "
              f"{callback.seconds:.2f} s wall under the profiler ({tokens[warmup] / callback.seconds:.0f} tok/s); "
              f"torch threads {torch.get_num_threads()}; batch {args.per_device_train_batch_size} x {args.gradient_accumulation_steps} "
              f"accumulated; {'bf16' if args.bf16 else 'fp32'}, gradient checkpointing {bool(args.gradient_checkpointing)}\n"
              f"# top {rows} ops by self CPU time\n")
    return header + table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--smollm2", metavar="DIR", help="SmolLM2-135M-Instruct's GGUF in DIR (as the step benchmark's --smollm2)")
    which.add_argument("--tiny", action="store_true", help="the smoke's toy sizes")
    parser.add_argument("--stages", nargs="+", choices=("sft", "dpo", "reward"), default=["sft", "dpo"])
    parser.add_argument("--sides", nargs="+", choices=SIDES, default=["ours", "trl_tuned"])
    parser.add_argument("--warmup", type=int, default=1, help="unprofiled steps first")
    parser.add_argument("--rows", type=int, default=30, help="ops listed")
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0: every core this process may use")
    parser.add_argument("--out-dir", type=Path, required=True)
    args = parser.parse_args(argv)
    torch.set_num_threads(threads_per_process(args.threads, 1))
    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    cfg = bench_config(tiny=args.tiny, dpo_sft_weight=0.0, rows_for_steps=args.warmup + 1,
                       overrides=smollm2(args.smollm2) if args.smollm2 else [])
    scale = "135m" if args.smollm2 else "tiny"
    args.out_dir.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory(prefix="alignment_profile_") as tmp:
        workload = build_workload(cfg, work_dir=Path(tmp))
        for stage in args.stages:
            for side in args.sides:
                text = profile_step(stage, side, workload, warmup=args.warmup, device=device, run_dir=Path(tmp) / f"{stage}_{side}",
                                    rows=args.rows)
                path = args.out_dir / f"profile_{stage}_{side}_{scale}.txt"
                path.write_text(text)
                print(text.splitlines()[0], "->", path, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
