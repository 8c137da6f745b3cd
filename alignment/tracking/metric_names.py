"""Metric names shared by every tracker, so that W&B's run comparison lines stages up.

``train/step`` is every chart's x axis; eval metrics every stage shares go under ``eval/``
(``eval/gold_accuracy_sampled``, ``eval/reward_mean``, ``eval/kl_to_<parent stage>``);
everything else under the stage's name (``dpo/reward_accuracy``, ``ppo/kl``). See
alignment/tracking/ for where they are logged.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Mapping, Optional

if TYPE_CHECKING:
    from alignment.records import StageResult

STEP = "train/step"

_SHARED_EVAL = {"gold_accuracy_greedy", "gold_accuracy_sampled", "response_tokens_mean", "eos_rate"}
_RESULT_NAMES = {"eval_prompts": "eval/prompts", "reward_model_score": "eval/reward_mean", "train_loss_mean": "train/loss_mean",
                 "train_loss_final": "train/loss_final", "train_steps": "train/steps", "train_seconds": "train/seconds",
                 "train_tokens": "train/tokens"}
_TRAIN_LOG_NAMES = {"loss": "train/loss", "grad_norm": "train/grad_norm", "learning_rate": "train/learning_rate",
                    "epoch": "train/epoch", "num_tokens": "train/tokens", "train_loss": "train/loss_mean",
                    "train_runtime": "train/seconds", "train_samples_per_second": "train/samples_per_second",
                    "train_steps_per_second": "train/steps_per_second", "total_flos": "train/total_flos"}
# Streamed while training (TrainLogCallback, rollout_metrics); logging them again would duplicate.
_STREAMED = ("history", "train_loss_history", "final/")


def result_metrics(result: "StageResult") -> dict[str, float]:
    """A finished stage's metrics under the shared names, logged at its last training step."""
    out = {}
    for key, value in result.metrics.items():
        name = _result_name(key, stage=result.stage, parent_stage=result.parent_stage)
        if name and _is_number(value):
            out[name] = float(value)
    for key, value in result.start_metrics.items():
        name = _result_name(key, stage=result.stage, parent_stage=None)
        if name and name.startswith("eval/") and _is_number(value):
            out[f"start/{name}"] = float(value)
    out["stage/wall_seconds"] = float(result.wall_seconds)
    if _is_number(result.metrics.get("train_steps")):
        out[STEP] = float(result.metrics["train_steps"])
    return out


def _result_name(key: str, *, stage: str, parent_stage: Optional[str]) -> Optional[str]:
    if key.startswith(_STREAMED):
        return None
    if key in _SHARED_EVAL or key.startswith(("seen/", "unseen/", "family/", "lm_perplexity", "lm_scored_tokens")):
        return f"eval/{key}"
    if key == "kl_to_parent":
        # The KL is to whatever the stage started from: the SFT policy in the shipped recipes.
        return f"eval/kl_to_{parent_stage or 'start'}"
    return _RESULT_NAMES.get(key, f"{stage}/{key}")


def train_log_metrics(stage: str, logs: Mapping[str, Any], *, step: int) -> dict[str, float]:
    """A TRL trainer's log line under the shared names (``loss`` -> ``train/loss``)."""
    out = {_TRAIN_LOG_NAMES.get(key, f"{stage}/{key}"): float(value) for key, value in logs.items() if _is_number(value)}
    out[STEP] = float(step)
    return out


def rollout_metrics(stats: Mapping[str, Any]) -> dict[str, float]:
    """One PPO rollout-and-update iteration's statistics (alignment/stages/ppo/loop.py)."""
    out = {("train/grad_norm" if key == "grad_norm" else f"ppo/{key}"): float(value)
           for key, value in stats.items() if key != "step" and _is_number(value)}
    out[STEP] = float(stats["step"])
    return out


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
