"""Where a PPO step's time goes: generation, scoring and training, with tokens per second each.

PPO has no plain-TRL baseline (TRL 1.x has no PPOTrainer), so this runs our PPO stage itself
(``alignment.stages.ppo.stage.train_ppo``, the pipeline's code) for ``warmup + steps`` rollouts, starting
from the embedded model at init for the policy and for the reward and value models (a random
score head: the timings do not depend on what it has learnt). The stage records each rollout's
phase times (``time/generation_s``, ``time/scoring_s``, ``time/training_s``; also in W&B as
``ppo/time/*``); the first ``warmup`` rollouts are dropped.

Tokens per second, per phase: generation counts sampled response tokens; scoring counts the
tokens of every prompt + response sequence, each passing four forwards (policy, reference,
value, reward); training counts those tokens once per PPO epoch (forward and backward of policy
and value).

    python -m alignment.bench --parts ppo --steps 10 --warmup 2
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import torch

from alignment.bench.trainers import TINY_MODEL, bench_config, build_workload
from alignment.run import compose_config
from alignment.stages.common import StageContext, StartPoint

PHASES = ("generation", "scoring", "training")


def ppo_phases(*, steps: int, warmup: int, threads: int, tiny: bool, overrides: list[str], work_dir: Path) -> dict[str, Any]:
    """Run the PPO stage for ``warmup + steps`` rollouts; phase times and tokens/s of the last ``steps``."""
    from alignment.stages.ppo.stage import train_ppo  # the stage module: imported when used, like the pipeline does

    torch.set_num_threads(threads)
    workload = build_workload(bench_config(tiny=tiny, dpo_sft_weight=None, rows_for_steps=1, overrides=overrides), work_dir=work_dir)
    init = str(workload.init_dir)
    base = ["+recipe=sft_rm_ppo", "logger=none", "eval.enabled=false", f"ppo.num_rollouts={warmup + steps}",
            "ppo.save_every_n_steps=0", f"ppo.reward_from={init}"]
    if tiny:
        base += [*TINY_MODEL, "ppo.rollout_batch_size=8", "ppo.mini_batch_size=4", "ppo.max_new_tokens=8"]
    cfg = compose_config([*base, *overrides])
    stage_dir = work_dir / "ppo"
    stage_dir.mkdir(parents=True, exist_ok=True)
    ctx = StageContext(cfg=cfg, run_dir=work_dir, stage_dir=stage_dir, stage="ppo", start=StartPoint(init, None, "sft"), is_first=False)
    history = train_ppo(cfg.ppo, ctx).metrics["history"][warmup:]
    seconds = {phase: [h[f"time/{phase}_s"] for h in history] for phase in PHASES}
    tokens = {
        "generation": [h["tokens/generated"] for h in history],
        "scoring": [h["tokens/scored"] for h in history],
        "training": [h["tokens/scored"] * cfg.ppo.ppo_epochs for h in history],
    }
    step_seconds = [sum(seconds[p][i] for p in PHASES) for i in range(len(history))]
    return {
        "rollouts": len(history),
        "rollout_batch_size": cfg.ppo.rollout_batch_size,
        "max_new_tokens": cfg.ppo.max_new_tokens,
        "step_seconds_median": statistics.median(step_seconds),
        "phases": phase_summary(seconds, tokens, step_seconds),
    }


def print_ppo(result: dict[str, Any]) -> None:
    print(f"ppo: {result['rollouts']} rollouts of {result['rollout_batch_size']} prompts, up to {result['max_new_tokens']} new "
          f"tokens; median step {result['step_seconds_median']:.2f} s")
    print_phases(result["phases"])


def phase_summary(seconds: dict[str, list[float]], tokens: dict[str, list[float]], step_seconds: list[float]) -> dict[str, dict]:
    """Per phase of an RL step (PPO's or GRPO's), over the timed steps: median, min and max
    seconds, share of the steps' time and tokens per second."""
    return {
        phase: {
            "seconds_median": statistics.median(seconds[phase]),
            "seconds_min": min(seconds[phase]),
            "seconds_max": max(seconds[phase]),
            "share_of_step": sum(seconds[phase]) / sum(step_seconds),
            "tokens_per_second": sum(tokens[phase]) / max(sum(seconds[phase]), 1e-9),
        }
        for phase in PHASES
    }


def print_phases(phases: dict[str, dict]) -> None:
    print(f"{'phase':<11} {'median s':>9} {'min s':>9} {'max s':>9} {'share':>6} {'tok/s':>9}")
    for phase, r in phases.items():
        print(f"{phase:<11} {r['seconds_median']:9.3f} {r['seconds_min']:9.3f} {r['seconds_max']:9.3f} {r['share_of_step']:6.1%} "
              f"{r['tokens_per_second']:9.0f}")
