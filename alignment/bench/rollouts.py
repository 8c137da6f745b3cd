"""Rollout speed: our generation path against plain ``model.generate``, batch by batch.

"ours" is :func:`alignment.modeling.generation.generate_ids`, what PPO's HF rollouts
(alignment/modeling/rollout_engine.py: ``HFRollouts``), evaluation and pair sampling call: one
left-padded batch of rendered prompts, sampling at the stage's temperature with top-k and top-p
off, replies cut after the first EOS. "plain" is what a user writes first: the tokenizer's own
left padding of the same prompts (as text) and ``model.generate(**batch, max_new_tokens=...)``
with the model's generation config as it ships (whatever it says about sampling). Same model
object, same prompts, same batches, the sides alternating and the first side swapping each
repetition.

Per batch and side: kept tokens (replies up to their EOS) per second, and milliseconds per decode
step (seconds / the longest reply of the batch: a batch runs until its last reply ends, so this is
the figure that does not depend on what was sampled). The prompts are the task suite's, rendered
with the model's chat template.

    python -m alignment.bench.rollouts --smollm2 ../shared/data/models --batches 4 --batch-size 8 --reps 3
    python -m alignment.bench.rollouts --tiny --batches 2 --batch-size 4 --reps 1   # the test
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import datasets
import torch
import transformers

from alignment.bench.trainers import TINY_MODEL, bench_config, save_initial_model, smollm2
from alignment.data.stage_data import load_suite, user_turn
from alignment.modeling.generation import cut_after_eos, generate_ids, render_prompts
from alignment.modeling.loading import load_causal_lm, load_tokenizer
from alignment.run import threads_per_process

SIDES = ("ours", "plain")


def plain_generate(model, tokenizer, texts: list[str], *, max_new_tokens: int) -> list[list[int]]:
    """``model.generate`` as a user first calls it: tokenizer-padded (left) batch, default settings."""
    tokenizer.padding_side = "left"
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    out = model.generate(**batch, max_new_tokens=max_new_tokens)
    return [cut_after_eos(row, tokenizer.eos_token_id) for row in out[:, batch["input_ids"].shape[1]:].tolist()]


def _timed(fn) -> tuple[float, list[list[int]]]:
    started = time.perf_counter()
    replies = fn()
    return time.perf_counter() - started, replies


def measure(model, tokenizer, prompts: list[list[int]], *, batch_size: int, reps: int, temperature: float, max_new_tokens: int,
            seed: int) -> dict[str, Any]:
    """Every batch of ``prompts`` through both sides, ``reps`` times; per-batch numbers and totals."""
    texts = [tokenizer.decode(ids) for ids in prompts]
    batches = [range(i, min(i + batch_size, len(prompts))) for i in range(0, len(prompts), batch_size)]
    rows = []
    model.eval()
    with torch.no_grad():
        for rep in range(reps):
            for number, index in enumerate(batches):
                for side in SIDES if rep % 2 == 0 else SIDES[::-1]:
                    torch.manual_seed(seed + rep)
                    if side == "ours":
                        seconds, replies = _timed(lambda: generate_ids(model, tokenizer, [prompts[i] for i in index],
                                                                       temperature=temperature, max_new_tokens=max_new_tokens,
                                                                       device=torch.device("cpu")))
                    else:
                        seconds, replies = _timed(lambda: plain_generate(model, tokenizer, [texts[i] for i in index],
                                                                         max_new_tokens=max_new_tokens))
                    kept, steps = sum(len(r) for r in replies), max(len(r) for r in replies)
                    rows.append({"rep": rep, "batch": number, "side": side, "seconds": seconds, "kept_tokens": kept,
                                 "decode_steps": steps, "tokens_per_second": kept / seconds, "ms_per_step": 1e3 * seconds / steps})
    summary = {}
    for side in SIDES:
        mine = [r for r in rows if r["side"] == side]
        per_rep = [sum(r["kept_tokens"] for r in mine if r["rep"] == k) / sum(r["seconds"] for r in mine if r["rep"] == k)
                   for k in range(reps)]
        summary[side] = {"tokens_per_second": _spread(per_rep), "ms_per_step": _spread([r["ms_per_step"] for r in mine])}
    return {"batches": len(batches), "batch_size": batch_size, "reps": reps, "temperature": temperature,
            "max_new_tokens": max_new_tokens, "generation_config": model.generation_config.to_diff_dict(),
            "summary": summary, "runs": rows}


def _spread(values: list[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def print_rollouts(result: dict[str, Any]) -> None:
    print(f"rollouts: {result['batches']} batches of {result['batch_size']} prompts, up to {result['max_new_tokens']} new tokens, "
          f"{result['reps']} reps; ours samples at T={result['temperature']}; plain: generation config "
          f"{result['generation_config']}")
    print(f"{'batch':<6} {'side':<6} {'tok/s med':>9} {'ms/step med':>11} {'steps':>6}")
    for number in range(result["batches"]):
        for side in SIDES:
            mine = [r for r in result["runs"] if r["batch"] == number and r["side"] == side]
            print(f"{number:<6} {side:<6} {statistics.median(r['tokens_per_second'] for r in mine):9.1f} "
                  f"{statistics.median(r['ms_per_step'] for r in mine):11.1f} {statistics.median(r['decode_steps'] for r in mine):6.0f}")
    for side, s in result["summary"].items():
        t, m = s["tokens_per_second"], s["ms_per_step"]
        print(f"{side}: {t['median']:.1f} kept tok/s (min {t['min']:.1f}, max {t['max']:.1f} over reps); "
              f"{m['median']:.1f} ms per decode step (min {m['min']:.1f}, max {m['max']:.1f} over batches and reps)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--smollm2", metavar="DIR", help="SmolLM2-135M-Instruct's GGUF in DIR, float32")
    which.add_argument("--tiny", action="store_true", help="the embedded toy at the smoke's size (the test)")
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0: every core this process may use")
    parser.add_argument("--out", type=Path, default=Path("rollouts.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(threads_per_process(args.threads, 1))
    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    overrides = smollm2(args.smollm2) if args.smollm2 else TINY_MODEL
    cfg = bench_config(tiny=False, dpo_sft_weight=None, rows_for_steps=args.batches, overrides=overrides)  # suite rows enough for every batch
    if args.smollm2:
        tokenizer = load_tokenizer(cfg.model.name_or_path, cfg.model, gguf_file=cfg.model.gguf_file)
        model = load_causal_lm(cfg.model.name_or_path, cfg.model, tokenizer, key="--smollm2", gguf_file=cfg.model.gguf_file)
    else:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            save_initial_model(cfg, Path(tmp))
            tokenizer = load_tokenizer(tmp, cfg.model)
            model = load_causal_lm(tmp, cfg.model, tokenizer, key="--tiny")
    examples = load_suite(cfg.data.suite).train
    prompts = render_prompts(tokenizer, [user_turn(e.prompt) for e in examples[: args.batches * args.batch_size]])
    result = measure(model, tokenizer, prompts, batch_size=args.batch_size, reps=args.reps, temperature=cfg.ppo.temperature,
                     max_new_tokens=args.max_new_tokens, seed=cfg.seed)
    print_rollouts(result)
    args.out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
