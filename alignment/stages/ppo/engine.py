"""The trainable half of PPO (policy + value model + optimizer) on one process, several, or ZeRO.

The PPO loop (loop.py) calls only :class:`PPOEngine`: ``engine(micro_batch)`` for the new
log-probs and values, ``engine.zero_grad()``, ``engine.backward(loss, ...)`` per micro-batch and
``engine.step()`` for one optimiser step, ``engine.sampling_policy()`` around generation,
``engine.save(dir)`` / ``engine.load(dir)`` for mid-stage checkpoints. Behind it:

- one process: AdamW, gradient clipping, as before;
- several processes without ZeRO: every rank holds the models; gradients are averaged over
  ranks (one flattened all-reduce) before clipping, so ranks stay identical;
- ZeRO 1/2/3 (``deepspeed=zero*``): one DeepSpeed engine over a module holding both models;
  DeepSpeed averages, clips and shards. Under ZeRO-3 sampling gathers the policy's weights
  (alignment.distributed.generation_weights).

The frozen models (reference, reward) are not the engine's: without ZeRO-3 they are whole on every
rank; under ZeRO-3 each is a DeepSpeed inference engine of its own (stage.py) holding 1/world of
its weights on each rank.
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from transformers import get_scheduler

from alignment.config import PPOConfig
from alignment.modeling.scoring import Packed, policy_forward, token_values
from alignment.scale import distributed
from alignment.scale.checkpoints import mark_complete, step_of


class PolicyAndValue(torch.nn.Module):
    """Both trained models in one module, so one optimizer (or one DeepSpeed engine) owns them."""

    def __init__(self, policy: torch.nn.Module, value_model: torch.nn.Module):
        super().__init__()
        self.policy, self.value_model = policy, value_model

    def forward(self, packed: Packed, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
        logprobs, _ = policy_forward(self.policy, packed, temperature=temperature)
        return logprobs, token_values(self.value_model, packed)


class PPOEngine:
    """Policy and value model with their optimiser (one process, several, or a DeepSpeed engine)."""

    def __init__(self, cfg: PPOConfig, ctx, *, policy: torch.nn.Module, value_model: torch.nn.Module):
        self.cfg, self.module = cfg, PolicyAndValue(policy, value_model)
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        adam = dict(lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.weight_decay)
        if distributed.uses_cpu_adam(ctx.cfg.deepspeed):  # offloaded states: DeepSpeed's CPU Adam steps them
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            optimizer = DeepSpeedCPUAdam(self.params, adamw_mode=True, **adam)
        else:
            optimizer = torch.optim.AdamW(self.params, **adam)
        scheduler = lr_schedule(cfg, optimizer)
        self.ds_engine = None
        ds = ppo_deepspeed_config(ctx.cfg, cfg)
        if ds is not None:
            import deepspeed

            self.ds_engine, optimizer, _, scheduler = deepspeed.initialize(model=self.module, optimizer=optimizer, config=ds,
                                                                          lr_scheduler=scheduler)
        self.optimizer, self.scheduler = optimizer, scheduler
        # PPO trains with dropout off, as TRL's PPO did: the rollout's log-probs and values and the
        # updates' must come from the same network, so that the first update's ratio is exactly 1
        # and clip fraction and approx-KL measure the updates, not dropout noise (LoRA's 0.05, or
        # a model's own). eval() switches off every dropout, functional ones included; nothing
        # here switches it back.
        self.module.eval()

    @property
    def policy(self) -> torch.nn.Module:
        return self.module.policy

    @property
    def value_model(self) -> torch.nn.Module:
        return self.module.value_model

    def __call__(self, packed: Packed, *, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
        return (self.ds_engine or self.module)(packed, temperature)


    def zero_grad(self) -> None:
        """Before a mini-batch's first micro-batch (DeepSpeed clears its gradients itself)."""
        if self.ds_engine is None:
            self.optimizer.zero_grad(set_to_none=True)

    def backward(self, loss: torch.Tensor, *, weight: float, micro_batches: int) -> None:
        """Accumulate ``weight * loss`` (``weight``: the micro-batch's share of the mini-batch)."""
        if self.ds_engine is not None:
            # DeepSpeed divides by its gradient_accumulation_steps (= micro_batches) and steps
            # the optimizer itself at the last micro-batch of a mini-batch.
            self.ds_engine.backward(loss * (weight * micro_batches))
            self.ds_engine.step()
            return
        (loss * weight).backward()

    def step(self) -> float:
        """Average the accumulated gradients over ranks, clip, step; returns the gradient norm
        before clipping."""
        if self.ds_engine is not None:
            norm = self.ds_engine.get_global_grad_norm()
            return float(norm) if norm is not None else float("nan")
        if dist.is_initialized():
            # One all-reduce of every gradient flattened together (a parameter without a
            # gradient on this rank contributes zeros, so no rank waits on a missing tensor).
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
            flat = _flatten_dense_tensors(grads).to(distributed.collective_device())
            dist.all_reduce(flat)
            flat.div_(dist.get_world_size())
            for p, reduced in zip(self.params, _unflatten_dense_tensors(flat.to(grads[0].device), grads)):
                p.grad = reduced
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        return float(norm)

    @property
    def learning_rate(self) -> float:
        """The rate of the next optimiser step."""
        return float(self.scheduler.get_last_lr()[0])

    @contextlib.contextmanager
    def sampling_policy(self) -> Iterator[torch.nn.Module]:
        with distributed.generation_weights(self.ds_engine, self.policy) as policy:
            yield policy

    @contextlib.contextmanager
    def whole_policy(self) -> Iterator[torch.nn.Module]:
        """The policy with every weight present (ZeRO-3: gathered), to save or evaluate it."""
        if self.ds_engine is None or not distributed.is_zero3(self.policy):
            yield self.policy
            return
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(self.policy.parameters()), modifier_rank=None):
            yield self.policy

    def save(self, directory: Path) -> None:
        """Weights and optimizer state (a collective: call on every rank)."""
        if self.ds_engine is not None:
            self.ds_engine.save_checkpoint(str(directory), tag="engine")
        elif distributed.is_main():
            torch.save({"module": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                        "scheduler": self.scheduler.state_dict()}, directory / "engine.pt")

    def load(self, directory: Path) -> None:
        if self.ds_engine is not None:
            self.ds_engine.load_checkpoint(str(directory), tag="engine")
            return
        state = torch.load(directory / "engine.pt", map_location="cpu", weights_only=False)
        self.module.load_state_dict(state["module"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])


def optimiser_steps(cfg: PPOConfig) -> int:
    """Optimiser steps in the whole stage: one per mini-batch, ppo_epochs passes per rollout."""
    return cfg.num_rollouts * cfg.ppo_epochs * (cfg.rollout_batch_size // cfg.mini_batch_size)


def lr_schedule(cfg: PPOConfig, optimizer: torch.optim.Optimizer):
    """``ppo.lr_scheduler`` over the stage's optimiser steps, with ``ppo.warmup_ratio`` of them warming up."""
    total = optimiser_steps(cfg)
    name = "constant_with_warmup" if cfg.lr_scheduler == "constant" else cfg.lr_scheduler
    return get_scheduler(name, optimizer, num_warmup_steps=round(cfg.warmup_ratio * total), num_training_steps=total)


def ppo_deepspeed_config(run_cfg, cfg: PPOConfig) -> Optional[dict[str, Any]]:
    """The DeepSpeed JSON for PPO's own loop: the Trainer's "auto" values resolved here, one
    optimiser step per mini-batch (``mini_batch_size`` rollouts over all ranks), accumulated
    over micro-batches of ``micro_batch_size`` rows per rank."""
    ds = distributed.deepspeed_config(run_cfg.deepspeed)
    if ds is None:
        return None
    ds.pop("optimizer", None)  # PPO builds its optimizer itself (DeepSpeedCPUAdam when offloading)
    world = distributed.world_size()
    per_rank = cfg.mini_batch_size // world
    micro = min(cfg.micro_batch_size or per_rank, per_rank)
    bf16 = run_cfg.model.dtype == "bfloat16"
    ds.update(
        train_micro_batch_size_per_gpu=micro,
        train_batch_size=cfg.mini_batch_size,
        gradient_accumulation_steps=per_rank // micro,
        gradient_clipping=cfg.max_grad_norm,
        bf16={"enabled": bf16},
        fp16={"enabled": run_cfg.model.dtype == "float16"},
    )
    return ds


def save_loop(directory: Path, *, engine: PPOEngine, step: int, loop: dict[str, Any], inputs_hash: str, keep: int,
              zero_stage: int) -> None:
    """A complete mid-stage PPO checkpoint ``checkpoint-<step>``: engine state, every rank's RNG
    and loop state (KL controller, score moments, history), then the completion marker."""
    target = directory / f"checkpoint-{step}"
    if distributed.is_main():
        target.mkdir(parents=True, exist_ok=True)
    distributed.barrier()
    engine.save(target)
    rng = {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
    torch.save({"step": step, "rng": rng, **loop}, target / f"loop_rank{distributed.rank()}.pt")
    distributed.barrier()
    if distributed.is_main():
        mark_complete(target, inputs_hash=inputs_hash, step=step, zero_stage=zero_stage)
        older = sorted((p for p in directory.glob("checkpoint-*") if step_of(p) < step), key=step_of)
        for path in older[: max(0, len(older) - (keep - 1))]:
            shutil.rmtree(path, ignore_errors=True)
    distributed.barrier()


def load_loop(checkpoint: Path, *, engine: PPOEngine) -> dict[str, Any]:
    """Restore what :func:`save_loop` wrote; returns the loop state (with ``step``)."""
    engine.load(checkpoint)
    state = torch.load(checkpoint / f"loop_rank{distributed.rank()}.pt", map_location="cpu", weights_only=False)
    torch.set_rng_state(state["rng"]["torch"])
    if state["rng"]["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return state
