"""Where a GRPO step's time goes: generation, scoring and training, as alignment/bench/ppo.py does
for PPO.

Runs our GRPO stage's trainer (``alignment.stages.grpo.build_trainer`` on the prompts and
rewards ``online_rl.prepare`` makes, the pipeline's code; TRL's GRPOTrainer inside) for
``warmup + steps`` optimiser steps from the initial model, pre-flight off. The phases are timed
on this trainer instance only: generation is TRL's ``_generate`` (HF ``generate`` on CPU, vLLM
with ``grpo.use_vllm``); scoring is the rest of ``_generate_and_score_completions`` (the
rewards, and the old/reference log-probs where TRL computes them); training is the rest of the
step (forward, backward, optimiser). The first ``warmup`` steps are dropped.

Tokens per second, per phase: generation counts sampled reply tokens; scoring and training count
prompt + reply tokens of every sequence.

    python -m alignment.bench --parts grpo --steps 3 --warmup 1
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import torch

from alignment.bench.ppo import phase_summary, print_phases
from alignment.bench.steps import StepClock
from alignment.bench.trainers import TINY_MODEL, bench_config, build_workload
from alignment.modeling.loading import load_tokenizer
from alignment.run import compose_config
from alignment.stages.common import StageContext, StartPoint



def _time_phases(trainer, record: dict[str, list[float]]) -> None:
    """Wrap this trainer's generation and scoring (instance attributes: TRL's class is untouched)."""
    generate, score = trainer._generate, trainer._generate_and_score_completions

    def timed_generate(prompts):
        started = time.perf_counter()
        out = generate(prompts)
        record["generation"][trainer.state.global_step] += time.perf_counter() - started
        record["generated_tokens"][trainer.state.global_step] += sum(len(c) for c in out[1])
        return out

    def timed_score(inputs):
        started = time.perf_counter()
        out = score(inputs)
        record["generate_and_score"][trainer.state.global_step] += time.perf_counter() - started
        record["sequence_tokens"][trainer.state.global_step] += int(out["prompt_mask"].sum() + out["completion_mask"].sum())
        return out

    trainer._generate, trainer._generate_and_score_completions = timed_generate, timed_score


def grpo_phases(*, steps: int, warmup: int, threads: int, tiny: bool, overrides: list[str], work_dir: Path) -> dict[str, Any]:
    """Train GRPO for ``warmup + steps`` steps; phase times and tokens/s of the last ``steps``."""
    from alignment.stages import grpo, online_rl  # the stage modules: imported when used, like the pipeline does

    torch.set_num_threads(threads)
    workload = build_workload(bench_config(tiny=tiny, dpo_sft_weight=None, rows_for_steps=1, overrides=overrides), work_dir=work_dir)
    init = str(workload.init_dir)
    base = ["+recipe=sft_then_grpo", "logger=none", "eval.enabled=false", "grpo.preflight=false"]
    if tiny:
        base += [*TINY_MODEL, "grpo.global_batch_size=8", "grpo.per_device_batch_size=8", "grpo.num_generations=4",
                 "grpo.max_new_tokens=8"]
    cfg = compose_config([*base, *overrides])
    stage_dir = work_dir / "grpo"
    stage_dir.mkdir(parents=True, exist_ok=True)
    ctx = StageContext(cfg=cfg, run_dir=work_dir, stage_dir=stage_dir, stage="grpo", start=StartPoint(init, None, "sft"), is_first=False)
    tokenizer = load_tokenizer(init, cfg.model)
    prepared = online_rl.prepare(cfg.grpo, ctx, tokenizer)
    trainer = grpo.build_trainer(cfg.grpo, ctx, prepared, max_steps=warmup + steps, save_strategy="no",
                                 use_cpu=not torch.cuda.is_available())
    total = warmup + steps
    record = {k: [0.0] * (total + 1) for k in ("generation", "generate_and_score", "generated_tokens", "sequence_tokens")}
    _time_phases(trainer, record)
    clock = StepClock()
    trainer.add_callback(clock)
    trainer.train()
    step_seconds = [b - a for a, b in zip(clock.marks, clock.marks[1:])]
    timed = range(warmup, total)
    seconds = {
        "generation": [record["generation"][i] for i in timed],
        "scoring": [record["generate_and_score"][i] - record["generation"][i] for i in timed],
    }
    seconds["training"] = [step_seconds[i] - seconds["generation"][k] - seconds["scoring"][k] for k, i in enumerate(timed)]
    tokens = {"generation": [record["generated_tokens"][i] for i in timed], "scoring": [record["sequence_tokens"][i] for i in timed],
              "training": [record["sequence_tokens"][i] * cfg.grpo.num_iterations for i in timed]}
    return {
        "steps": steps,
        "replies_per_step": cfg.grpo.sequences_per_step(1),
        "num_generations": cfg.grpo.num_generations,
        "max_new_tokens": cfg.grpo.max_new_tokens,
        "step_seconds_median": statistics.median(step_seconds[warmup:]),
        "phases": phase_summary(seconds, tokens, step_seconds[warmup:]),
    }


def print_grpo(result: dict[str, Any]) -> None:
    print(f"grpo: {result['steps']} steps of {result['replies_per_step']} replies ({result['num_generations']} per prompt), up to "
          f"{result['max_new_tokens']} new tokens; median step {result['step_seconds_median']:.2f} s")
    print_phases(result["phases"])
