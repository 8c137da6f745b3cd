"""Model FLOPs utilisation (MFU) of our SFT and DPO training steps.

Trains ``--warmup + --steps`` optimiser steps per stage on synthetic chat rows, with the
trainer built by the stage module's own ``build_trainer`` (as alignment/bench/trainers.py
builds "ours"), and times the last ``--steps`` (alignment/bench/steps.py's ``StepClock``, real
tokens counted by wrapping ``compute_loss``). MFU = tokens/s x FLOPs per token / peak FLOP/s.

FLOPs per token and the measured peak: alignment/bench/flops.py (SFT 6N + 12·L·d·T, DPO 8N +
16·L·d·T; what is counted and what is not).

Peak: a square matmul timed on the same device (8192 in bf16 on CUDA, 1024 in float32 on CPU).
It is below a datasheet peak (H100 bf16 dense: 989 TFLOP/s), so MFU reads higher against it;
the JSON keeps it, to rescale. Models: "0.5b" is the embedded Llama at width 1024, 24 layers,
MLP 5120 (~0.48B parameters, bf16 on CUDA); "tiny" is width 64, 2 layers (CPU, the test). Rows
are seeded random letters of seq_tokens/2..seq_tokens-8 tokens (the tokenizer is per character).

    python -m alignment.bench.mfu --device cuda --steps 10 --warmup 3
    python -m alignment.bench.mfu --device cpu --size tiny --steps 3 --warmup 1 --out mfu.json
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import random
import string
import sys
import tempfile
from pathlib import Path
from typing import Any

import datasets
import torch
import transformers
from datasets import Dataset

from alignment.bench.flops import MATMUL, flops_per_token, matmul_peak_tflops
from alignment.bench.steps import train_and_measure
from alignment.data.stage_data import HeldOut, StageData
from alignment.modeling import embedded
from alignment.run import compose_config, threads_per_process
from alignment.stages import dpo, sft
from alignment.stages.common import StageContext, StartPoint, load_policy, padding_free
from alignment.stages.trl_stage import Prepared

STAGES = ("sft", "dpo")
SIZES = {
    "0.5b": {"hidden_size": 1024, "num_layers": 24, "num_heads": 16, "intermediate_size": 5120},
    "tiny": {"hidden_size": 64, "num_layers": 2, "num_heads": 2, "intermediate_size": 128},
}
TEMPLATE_TOKENS = 4  # rendered tokens that are not content: <|user|>, <|end|>, <|assistant|>, <|end|>


def synthetic_rows(stage: str, *, n_rows: int, seq_tokens: int) -> Dataset:
    """Deterministic chat rows of random letters, each sequence seq_tokens/2..seq_tokens-8 tokens."""
    rng = random.Random(0)

    def letters(n: int) -> str:
        return "".join(rng.choices(string.ascii_letters, k=n))

    def answer(prompt_chars: int) -> list[dict[str, str]]:
        total = rng.randint(seq_tokens // 2, seq_tokens - 8)
        return [{"role": "assistant", "content": letters(max(1, total - TEMPLATE_TOKENS - prompt_chars))}]

    rows = []
    for _ in range(n_rows):
        prompt_chars = rng.randint(seq_tokens // 8, seq_tokens // 4)  # room left for the answer
        prompt = [{"role": "user", "content": letters(prompt_chars)}]
        if stage == "sft":
            rows.append({"messages": prompt + answer(prompt_chars)})
        else:
            rows.append({"prompt": prompt, "chosen": answer(prompt_chars), "rejected": answer(prompt_chars)})
    return Dataset.from_list(rows)


def _build_trainer(stage: str, cfg, *, init_dir: Path, run_dir: Path, rows: Dataset, overrides: dict[str, Any]):
    """The stage's trainer as the pipeline builds it, from the saved initial model."""
    start = StartPoint(str(init_dir), None, None if stage == "sft" else "sft")
    ctx = StageContext(cfg=cfg, run_dir=run_dir, stage_dir=run_dir, stage=stage, start=start, is_first=stage == "sft")
    tokenizer = embedded.build_tokenizer()
    model = padding_free(load_policy(ctx, tokenizer), ctx)
    data = StageData(train=rows, held_out=HeldOut(), fingerprint="bench", counts={})
    if stage == "sft":
        return sft.build_trainer(cfg.sft, ctx, Prepared(model, tokenizer, data), **overrides)
    return dpo.build_trainer(cfg.dpo, ctx, Prepared(model, tokenizer, data, extras={"reference": dpo.reference_model(cfg.dpo, ctx, model, tokenizer)}),
                             **overrides)


def _timed_stage(trainer, *, stage: str, device: str, steps: int, warmup: int, model_info: dict, peak_tflops: float) -> dict[str, Any]:
    step_seconds, timed_tokens, first_loss, peak = train_and_measure(trainer, steps=steps, warmup=warmup, device=device)
    # Every step trains on exactly one batch of rows (rows are never cut): DPO's has two sequences a row.
    sequences = steps * trainer.args.per_device_train_batch_size * (2 if stage == "dpo" else 1)
    mean_seq = sum(timed_tokens) / sequences
    per_token = flops_per_token(stage, n_params=model_info["parameters"], n_layers=model_info["n_layers"],
                                d_model=model_info["d_model"], mean_seq_tokens=mean_seq)
    tokens_per_second = sum(timed_tokens) / sum(step_seconds)
    achieved = tokens_per_second * per_token / 1e12
    return {
        "stage": stage, "tokens_per_second": tokens_per_second, "mean_seq_tokens": mean_seq,
        "flops_per_token": per_token, "achieved_tflops": achieved, "mfu": achieved / peak_tflops,
        "peak_memory_mb": peak / 2**20, "first_loss": first_loss, "step_seconds": step_seconds, "tokens": timed_tokens,
    }


def measure(*, device: str, size: str, stages: list[str], steps: int, warmup: int, batch: int, seq_tokens: int, threads: int) -> dict:
    """MFU of each stage's training step; the peak is measured first, on the same device."""
    threads = threads_per_process(threads, 1)
    torch.set_num_threads(threads)
    dtype = "bfloat16" if device == "cuda" else "float32"
    cfg = compose_config([
        "+recipe=sft_then_dpo", "logger=none", *(f"model.{k}={v}" for k, v in SIZES[size].items()),
        f"model.max_position_embeddings={2 * seq_tokens}", f"model.dtype={dtype}",
        f"sft.max_seq_tokens={seq_tokens}", f"dpo.max_seq_tokens={seq_tokens}", "dpo.sft_loss_weight=0",
    ])
    overrides = {"max_steps": warmup + steps, "save_strategy": "no", "use_cpu": device == "cpu",
                 "per_device_train_batch_size": batch, "max_length": seq_tokens}
    peak_tflops = matmul_peak_tflops(device)
    results = []
    with tempfile.TemporaryDirectory(prefix="alignment_mfu_") as tmp:
        tokenizer, init_dir = embedded.build_tokenizer(), Path(tmp) / "init_model"
        model = embedded.build_model(cfg.model, tokenizer)
        # parameters() yields a tied weight once: the embedding is counted as the LM head.
        model_info = {"parameters": sum(p.numel() for p in model.parameters()), "n_layers": model.config.num_hidden_layers,
                      "d_model": model.config.hidden_size, "dtype": dtype}
        model.save_pretrained(init_dir, safe_serialization=True)
        tokenizer.save_pretrained(init_dir)
        del model
        for stage in stages:
            transformers.set_seed(cfg.seed)
            rows = synthetic_rows(stage, n_rows=(warmup + steps) * batch, seq_tokens=seq_tokens)
            trainer = _build_trainer(stage, cfg, init_dir=init_dir, run_dir=Path(tmp) / stage, rows=rows, overrides=overrides)
            results.append(_timed_stage(trainer, stage=stage, device=device, steps=steps, warmup=warmup,
                                        model_info=model_info, peak_tflops=peak_tflops))
            del trainer
            gc.collect()  # the trainer holds cycles: free this stage's model before the next one's peak
    return {
        "device": device, "size": size, "threads": threads, "steps": steps, "warmup": warmup, "batch": batch,
        "seq_tokens": seq_tokens, "torch": torch.__version__, "model": model_info,
        "peak": {"tflops": peak_tflops, "matmul_size": MATMUL[device][0], "dtype": str(MATMUL[device][1]).removeprefix("torch.")},
        "memory": "torch.cuda.max_memory_allocated" if device == "cuda" else "peak process RSS minus RSS before train()",
        "stages": results,
    }


def print_table(result: dict) -> None:
    m, peak = result["model"], result["peak"]
    print(f"model {result['size']}: {m['parameters'] / 1e6:.2f}M parameters, {m['n_layers']} layers x {m['d_model']}, {m['dtype']}; "
          f"measured peak {peak['tflops']:.3g} TFLOP/s ({peak['matmul_size']}^2 matmul, {peak['dtype']}, {result['device']})")
    memory = "peak alloc MB" if result["device"] == "cuda" else "RSS growth MB"
    head = ["stage", "mean T", "tok/s", "GFLOP/tok", "TFLOP/s", "MFU", memory, "first loss"]
    rows = [[s["stage"], f"{s['mean_seq_tokens']:.0f}", f"{s['tokens_per_second']:.0f}", f"{s['flops_per_token'] / 1e9:.4g}",
             f"{s['achieved_tflops']:.3g}", f"{100 * s['mfu']:.2f}%", f"{s['peak_memory_mb']:.0f}", f"{s['first_loss']:.4f}"]
            for s in result["stages"]]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    for r in [head, *rows]:
        print("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", choices=tuple(SIZES), default=None, help="default: 0.5b on cuda, tiny on cpu")
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    parser.add_argument("--steps", type=int, default=10, help="timed optimiser steps per stage")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before them")
    parser.add_argument("--batch", type=int, default=8, help="rows per step (DPO: pairs, two sequences each)")
    parser.add_argument("--seq-tokens", type=int, default=1024, help="max_length; rows are 1/2 to all of it")
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0: every core this process may use")
    parser.add_argument("--out", type=Path, default=Path("mfu.json"))
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()  # weight loading and saving bars
    result = measure(device=args.device, size=args.size or ("0.5b" if args.device == "cuda" else "tiny"), stages=args.stages,
                     steps=args.steps, warmup=args.warmup, batch=args.batch, seq_tokens=args.seq_tokens, threads=args.threads)
    print_table(result)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"written: {args.out}")
    return 0 if all(math.isfinite(s["mfu"]) and s["mfu"] > 0 for s in result["stages"]) else 1


if __name__ == "__main__":
    sys.exit(main())
