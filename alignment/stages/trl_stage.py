"""The skeleton every TRL-backed stage runs, written once.

    seed -> tokenizer -> prepare (data checked, model loaded) -> build trainer -> train (resume,
    guards, tracking) -> save -> training metrics -> evaluate -> record

A stage module (sft.py, reward.py, dpo.py) is a :class:`TRLStage`: how it prepares its data and
model, how it builds its TRL trainer, and how it evaluates the trained model. Everything else
lives here, so a new TRL-backed stage is a config dataclass and a module that says only what
differs.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from safetensors import SafetensorError
from transformers import PreTrainedModel, PreTrainedTokenizerBase, Trainer

from alignment.config import TrainConfig
from alignment.data.stage_data import StageData
from alignment.errors import CheckpointError
from alignment.records import StageResult
from alignment.scale import checkpoints, preemption
from alignment.scale.distributed import deepspeed_config, on_rank_zero, unsharded, world_size
from alignment.stages.common import StageContext, place, save_checkpoint, seed_everything, stage_result, stage_tokenizer
from alignment.tracking.base import TrainLogCallback

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    """What a stage trains and evaluates: its model and data, plus what its evaluation needs."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    data: StageData
    start_metrics: dict[str, Any] = field(default_factory=dict)  # the starting model, evaluated
    inputs: dict[str, Any] = field(default_factory=dict)  # other checkpoints used (a reward model)
    extras: dict[str, Any] = field(default_factory=dict)  # e.g. DPO's reference, the reward model that labelled pairs


@dataclass(frozen=True)
class TRLStage:
    """What a TRL-backed stage says; :func:`run_trl_stage` does the rest."""

    # (stage cfg, ctx, tokenizer) -> Prepared. Data files are checked before any model loads.
    prepare: Callable[[Any, StageContext, PreTrainedTokenizerBase], Prepared]
    # (stage cfg, ctx, prepared) -> the TRL trainer, with this project's fast paths switched on.
    build_trainer: Callable[[Any, StageContext, Prepared], Trainer]
    # (stage cfg, ctx, prepared, trained model) -> held-out metrics.
    evaluate: Callable[[Any, StageContext, Prepared, PreTrainedModel], dict[str, Any]]
    # The Auto class the checkpoint loads back with (a whole copy for evaluation after ZeRO-3).
    loader: type


def run_trl_stage(stage: TRLStage, cfg: TrainConfig, ctx: StageContext) -> StageResult:
    """Run one TRL-backed stage from its start point to its committed record."""
    seed_everything(ctx)
    tokenizer = stage_tokenizer(ctx)
    prepared = stage.prepare(cfg, ctx, tokenizer)
    trainer = stage.build_trainer(cfg, ctx, prepared)
    output = train(trainer, ctx, cfg)
    saved = save_checkpoint(trainer.model, prepared.tokenizer, ctx, trainer=trainer)
    metrics = train_metrics(output, trainer)
    if ctx.cfg.eval.enabled:
        started = time.monotonic()
        trained = place(unsharded(trainer.model, saved.path, loader=stage.loader))
        metrics.update(on_rank_zero(lambda: stage.evaluate(cfg, ctx, prepared, trained)))  # rank 0 evaluates, every rank records
        log.info("[%s] evaluated in %.1f s", ctx.stage, time.monotonic() - started)
    return stage_result(ctx, cfg, saved=saved, data=prepared.data, metrics=metrics, start_metrics=prepared.start_metrics,
                        inputs=prepared.inputs)


def trainer_kwargs(train: TrainConfig, ctx: StageContext) -> dict[str, Any]:
    """Keyword arguments shared by every TRL config class, from our TrainConfig."""
    forward, accumulation = train.split_batch(world_size())  # the global batch, whatever the process count
    return {
        "output_dir": str(checkpoints.trainer_dir(ctx.stage_dir)),
        "learning_rate": train.learning_rate,
        "per_device_train_batch_size": forward,
        "per_device_eval_batch_size": forward,
        "gradient_accumulation_steps": accumulation,
        "num_train_epochs": train.num_epochs,
        "max_steps": train.max_steps,
        "warmup_steps": train.warmup_ratio,  # a float < 1 is a ratio of the total steps
        "lr_scheduler_type": train.lr_scheduler,
        "weight_decay": train.weight_decay,
        "adam_beta1": train.adam_beta1,
        "adam_beta2": train.adam_beta2,
        "max_grad_norm": train.max_grad_norm,
        "gradient_checkpointing": train.gradient_checkpointing,
        "max_length": train.max_seq_tokens,
        "logging_steps": train.logging_every_n_steps,
        **checkpoints.trainer_save_kwargs(train),
        "deepspeed": deepspeed_config(ctx.cfg.deepspeed),
        "report_to": "none",
        "seed": ctx.cfg.seed,
        "data_seed": ctx.cfg.seed,
        "use_cpu": not torch.cuda.is_available(),
        "bf16": ctx.cfg.model.dtype == "bfloat16",
        "dataloader_num_workers": 0,
        "dataset_num_proc": None,
    }


def train(trainer: Trainer, ctx: StageContext, stage_cfg: TrainConfig) -> Any:
    """``trainer.train()`` with resume, completion markers, the NaN guard, stop requests and
    tracking (alignment/scale/checkpoints.py).

    Raises :class:`alignment.scale.preemption.Preempted` after the checkpoint when asked to stop.
    """
    zero_stage = ctx.cfg.deepspeed.zero_stage
    resume = checkpoints.find_resume(ctx.stage_dir, inputs_hash=ctx.inputs_key, requested=stage_cfg.resume_from,
                                     key=f"{ctx.stage}.resume_from", zero_stage=zero_stage)
    before = checkpoints.resumed_loss_sum(resume)  # the loss summed over the steps before the resume
    guard = checkpoints.StageGuard(inputs_hash=ctx.inputs_key, stage=ctx.stage, zero_stage=zero_stage,
                                   loss_sum=lambda: before + session_loss_sum(trainer))
    trainer.add_callback(guard)
    trainer.add_callback(TrainLogCallback(ctx.tracker, stage=ctx.stage))
    checkpoints.guard_finite_loss(trainer, stage=ctx.stage)
    try:
        output = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    except (OSError, SafetensorError) as err:
        if not checkpoints.is_disk_full(err):
            raise
        raise CheckpointError(checkpoints.disk_full_message(ctx.stage, checkpoints.trainer_dir(ctx.stage_dir), err)) from err
    if guard.preempted_at is not None:
        raise preemption.Preempted(f"{ctx.stage}: stopped at step {guard.preempted_at} on {preemption.signal_name()}; "
                                   f"checkpoint in {checkpoints.trainer_dir(ctx.stage_dir)}; rerun the same command to resume")
    # transformers averages over the steps of this process's run only (after a resume: those after
    # it; resumed at the last step: 0.0); the marker carried the sum over the steps before.
    session_steps = output.global_step - (checkpoints.step_of(resume) if resume else 0)
    return output._replace(training_loss=(before + output.training_loss * session_steps) / max(1, output.global_step))


def session_loss_sum(trainer: Trainer) -> float:
    """The training loss summed over the steps this ``trainer.train()`` call has run so far (read
    while it runs, at each checkpoint): the logged part plus what is not yet logged (transformers' private ``_total_loss_scalar`` and ``_tr_loss``;
    alignment/compat.py checks both)."""
    pending = getattr(trainer, "_tr_loss", None)
    return float(getattr(trainer, "_total_loss_scalar", 0.0)) + (float(pending.item()) if torch.is_tensor(pending) else 0.0)


def train_metrics(train_output: Any, trainer: Trainer) -> dict[str, Any]:
    """Headline training numbers from a transformers Trainer run."""
    log_history = trainer.state.log_history
    losses = [entry["loss"] for entry in log_history if "loss" in entry]
    metrics = {
        "train_loss_mean": float(train_output.training_loss),
        "train_loss_final": float(losses[-1]) if losses else None,
        "train_steps": int(train_output.global_step),
        "train_seconds": float(train_output.metrics.get("train_runtime", math.nan)),
        # [step, loss] at every logging step (averaged over ranks): the stage's training curve.
        "train_loss_history": [[entry["step"], entry["loss"]] for entry in log_history if "loss" in entry],
    }
    rewards = [[entry["step"], entry["reward"]] for entry in log_history if "reward" in entry]
    if rewards:  # the online-RL trainers (GRPO, RLOO) log the mean reward of each step's samples
        metrics["train_reward_history"] = rewards
        metrics["train_reward_final"] = float(rewards[-1][1])
    tokens = trained_tokens(trainer)
    if tokens is not None:
        metrics["train_tokens"] = tokens
    return metrics


def trained_tokens(trainer: Trainer) -> Optional[int]:
    """Tokens the trainer trained on, from TRL's private token count (alignment/compat.py)."""
    counted = getattr(trainer, "_metrics", {}).get("train", {}).get("num_tokens")
    return int(counted[-1]) if counted else None
