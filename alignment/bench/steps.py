"""One timed training run: wall time per optimiser step, real tokens per step, first-step loss
peak memory and FLOPs per token, for one stage and one side (ours, TRL tuned or TRL's default;
see trainers.py).

A step's time runs from the end of the previous step to the end of this one, so it includes
data loading and whatever the trainer does between steps, as a user's run would. The first
``warmup`` steps are dropped (allocator, kernel selection, lazy initialisation). Tokens are the
non-pad tokens of every micro-batch the loss saw (see ``real_tokens``), counted by
wrapping ``compute_loss``; for DPO a pair's chosen and rejected sequences both count, and the
reference model's forward pass over them is part of the step's time, not extra tokens. With
``dpo.precompute_ref_log_probs`` the reference pass runs once, over every row, while the trainer
is built: the timed steps are charged their share of it (steps / (warmup + steps)).

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` over ``train()``; on CPU the process's
resident set (read from /proc every few milliseconds) at its highest during ``train()``, minus
its size just before, i.e. what training added on top of the loaded model and data. Each run
has a process of its own (``python -m alignment.bench.steps``, started by the benchmark), so
no memory freed by an earlier run is reused unseen; ``--in-process`` trades that for speed.

Utilisation: FLOPs per trained token as alignment/bench/flops.py counts them, times tokens/s
(``achieved_tflops``); the benchmark divides it by the matmul peak it measured.

    python -m alignment.bench.steps --stage dpo --side ours --steps 10 --warmup 2 --out run.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from alignment.bench.flops import flops_per_token, model_shape
from alignment.bench.trainers import SIDES, STAGES, Workload, bench_config, build_trainer, build_workload


class StepClock(TrainerCallback):
    """Wall time at the end of every optimiser step (and at the start of training)."""

    def __init__(self) -> None:
        self.marks: list[float] = []

    def on_train_begin(self, args, state, control, **kwargs):
        self.marks = [time.perf_counter()]

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.marks.append(time.perf_counter())


class RssSampler:
    """Highest resident set size of this process while running, from /proc/self/statm."""

    def __init__(self, every_s: float = 0.005) -> None:
        self.every_s, self.peak_bytes, self._stop = every_s, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def rss_bytes() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, self.rss_bytes())
            time.sleep(self.every_s)

    def __enter__(self) -> "RssSampler":
        self.peak_bytes = self.rss_bytes()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_bytes = max(self.peak_bytes, self.rss_bytes())


def count_tokens_and_first_loss(trainer, tokens_per_step: list[int], first_loss: list[float]) -> None:
    """Wrap the trainer's ``compute_loss`` (this instance only) to count real tokens per step
    and keep the loss of the first micro-batch, computed before any update."""
    inner = trainer.compute_loss

    def compute_loss(model, inputs, *args, **kwargs):
        step = trainer.state.global_step  # the step being computed, 0-based
        while len(tokens_per_step) <= step:
            tokens_per_step.append(0)
        tokens_per_step[step] += real_tokens(inputs, pad_token_id=trainer.processing_class.pad_token_id)
        out = inner(model, inputs, *args, **kwargs)
        if not first_loss:
            first_loss.append(float((out[0] if isinstance(out, tuple) else out).detach()))
        return out

    trainer.compute_loss = compute_loss


def real_tokens(inputs: dict[str, Any], *, pad_token_id: int) -> int:
    """Non-pad tokens of a collated batch: the attention mask's ones where there is one; for TRL's
    padding-free SFT batch (every sequence in one row, no mask) the end of its last sequence
    (``cu_seq_lens_q``); otherwise the tokens that are not the pad token, which with a pad token
    equal to EOS misses the EOS tokens (not the case for the embedded tokenizer)."""
    if "attention_mask" in inputs:
        return int(inputs["attention_mask"].sum())
    if "cu_seq_lens_q" in inputs:
        return int(inputs["cu_seq_lens_q"][-1])
    return int((inputs["input_ids"] != pad_token_id).sum())


def train_and_measure(trainer, *, steps: int, warmup: int, device: str) -> tuple[list[float], list[int], float, int]:
    """Run ``trainer.train()`` (``warmup + steps`` steps); the last ``steps`` steps' seconds and
    real tokens, the first micro-batch's loss, and peak memory in bytes (see the module docstring).
    On CPU the whole process's peak RSS is kept too, in ``trainer.peak_rss_bytes``."""
    clock, tokens, first_loss = StepClock(), [], []
    trainer.add_callback(clock)
    count_tokens_and_first_loss(trainer, tokens, first_loss)
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    before = RssSampler.rss_bytes()
    with RssSampler() as rss:
        trainer.train()
    step_seconds = [b - a for a, b in zip(clock.marks, clock.marks[1:])][warmup:]
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else rss.peak_bytes - before
    trainer.peak_rss_bytes = rss.peak_bytes
    return step_seconds, tokens[warmup : warmup + steps], first_loss[0], peak


def timed_run(stage: str, side: str, w: Workload, *, steps: int, warmup: int, threads: int, device: str, run_dir: Path) -> dict[str, Any]:
    """Train ``warmup + steps`` steps from fresh weights; numbers for the last ``steps``."""
    torch.set_num_threads(threads)
    with _timed_precompute() as precompute_seconds:
        trainer = build_trainer(stage, side, w, max_steps=warmup + steps, run_dir=run_dir, device=device)
    step_seconds, timed_tokens, first_loss, peak = train_and_measure(trainer, steps=steps, warmup=warmup, device=device)
    # Precomputed reference log-probs (DPO) are a one-off pass over every training row, made
    # while the trainer is built: the timed steps carry their share of it.
    precompute_share = sum(precompute_seconds) * steps / (warmup + steps)
    args = trainer.args
    # Every step trains on exactly one batch of rows (rows are never cut); pairs are two sequences.
    sequences = steps * args.per_device_train_batch_size * args.gradient_accumulation_steps * (1 if stage == "sft" else 2)
    shape = model_shape(trainer.model, stage)
    mean_seq = sum(timed_tokens) / sequences
    tokens_per_second = sum(timed_tokens) / (sum(step_seconds) + precompute_share)
    per_token = flops_per_token(stage, n_params=shape["parameters"], n_layers=shape["n_layers"], d_model=shape["d_model"],
                                mean_seq_tokens=mean_seq)
    result = {
        "stage": stage,
        "side": side,
        "step_seconds": step_seconds,
        "tokens": timed_tokens,
        "tokens_per_second": tokens_per_second,
        "precompute_seconds": sum(precompute_seconds),
        "first_loss": first_loss,
        "peak_memory_mb": peak / 2**20,
        "peak_rss_mb": getattr(trainer, "peak_rss_bytes", 0) / 2**20,
        "model": shape,
        "mean_seq_tokens": mean_seq,
        "flops_per_token": per_token,
        "achieved_tflops": tokens_per_second * per_token / 1e12,
        "precision": "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32",
        "gradient_checkpointing": bool(args.gradient_checkpointing),
        "lr_scheduler": getattr(args.lr_scheduler_type, "value", str(args.lr_scheduler_type)),
        "padding_free": bool(getattr(args, "padding_free", False)) or side == "ours" and w.cfg.model.padding_free,
    }
    del trainer
    shutil.rmtree(run_dir, ignore_errors=True)
    return result


@contextlib.contextmanager
def _timed_precompute():
    """Seconds spent in TRL's DPO reference precompute while the block runs (a list, filled in)."""
    from trl import DPOTrainer

    seconds: list[float] = []
    inner = DPOTrainer._precompute_ref_logps

    def timed(self, *args, **kwargs):
        started = time.perf_counter()
        try:
            return inner(self, *args, **kwargs)
        finally:
            seconds.append(time.perf_counter() - started)

    DPOTrainer._precompute_ref_logps = timed
    try:
        yield seconds
    finally:
        DPOTrainer._precompute_ref_logps = inner


def spread(values: list[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def run_in_child(stage: str, side: str, *, steps: int, warmup: int, threads: int, device: str, tiny: bool,
                 dpo_sft_weight: float | None, overrides: list[str], work_dir: Path, init_dir: Path) -> dict[str, Any]:
    """``timed_run`` in a fresh process (its own workload, same seed: the same rows; the initial
    model that the benchmark saved once in ``init_dir``)."""
    out = work_dir / f"{stage}_{side}_{time.monotonic_ns()}.json"
    cmd = [sys.executable, "-m", "alignment.bench.steps", "--stage", stage, "--side", side, "--steps", str(steps),
           "--warmup", str(warmup), "--threads", str(threads), "--device", device, "--init-dir", str(init_dir), "--out", str(out)]
    cmd += ["--tiny"] if tiny else []
    cmd += ["--dpo-sft-weight", str(dpo_sft_weight)] if dpo_sft_weight is not None else []
    done = subprocess.run([*cmd, "--", *overrides], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"benchmark run {stage}/{side} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> int:
    import datasets
    import transformers

    parser = argparse.ArgumentParser(description="one timed run of the step benchmark (see alignment.bench)")
    parser.add_argument("--stage", choices=STAGES, required=True)
    parser.add_argument("--side", choices=SIDES, required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--warmup", type=int, required=True)
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--device", choices=("cpu", "cuda"), required=True)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--dpo-sft-weight", type=float, default=None)
    parser.add_argument("--init-dir", type=Path, default=None, help="an initial model saved by the benchmark (default: save one)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    cfg = bench_config(tiny=args.tiny, dpo_sft_weight=args.dpo_sft_weight, rows_for_steps=args.warmup + args.steps,
                       overrides=args.overrides)
    with tempfile.TemporaryDirectory(prefix="alignment_bench_") as tmp:
        workload = build_workload(cfg, work_dir=Path(tmp), init_dir=args.init_dir)
        result = timed_run(args.stage, args.side, workload, steps=args.steps, warmup=args.warmup, threads=args.threads,
                           device=args.device, run_dir=Path(tmp) / "run")
    args.out.write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
