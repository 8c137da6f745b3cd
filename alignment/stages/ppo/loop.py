"""PPO's loop: ``num_rollouts`` iterations of rollout (rollout.py) and ``ppo_epochs`` of updates.

Each iteration samples and scores this rank's share of ``rollout_batch_size`` prompts, then makes
``ppo_epochs`` passes over them in mini-batches of ``mini_batch_size`` rollouts (over all ranks):
clipped policy loss + clipped value loss, gradient clipping, one optimiser step per mini-batch,
each mini-batch split into micro-batches of ``micro_batch_size`` rows whose gradients accumulate.
Then the (fixed or adaptive) KL controller updates and the health check looks at the statistics.

Mid-stage checkpoints every ``save_every_n_steps`` rollouts hold the engine, every rank's RNG and
the loop's state; the loop resumes from the newest complete one and stops after a checkpoint on
a stop request (alignment/scale/preemption.py).
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from alignment.config import PPOConfig
from alignment.errors import NonFiniteLoss
from alignment.modeling.rollout_engine import RolloutEngine
from alignment.modeling.scoring import Packed, plain_text_nll, select
from alignment.scale import checkpoints, distributed, preemption
from alignment.stages.ppo import maths as pm
from alignment.stages.ppo.engine import PPOEngine, load_loop, save_loop
from alignment.stages.ppo.health import HealthCheck
from alignment.stages.ppo.rollout import clock, rollout
from alignment.tracking.metric_names import rollout_metrics

log = logging.getLogger(__name__)


def ppo_loop(cfg: PPOConfig, ctx, *, engine: PPOEngine, sampler: RolloutEngine, reference, reward_model, tokenizer, prompts, examples,
             ptx_windows: Sequence[list[int]] = ()) -> list[dict[str, Any]]:
    """``num_rollouts`` rollout-and-update iterations; each rank samples its share of every
    rollout batch. Resumes from the newest complete mid-stage checkpoint; stops (after one)
    when a stop is requested (alignment/scale/preemption.py)."""
    controller = (pm.AdaptiveKLController(cfg.kl_coef, target_kl=cfg.kl_target, horizon=cfg.kl_horizon)
                  if cfg.adaptive_kl else pm.FixedKLController(cfg.kl_coef))
    moments = pm.RunningMoments()
    health = HealthCheck(kl_target=cfg.kl_target if cfg.adaptive_kl else None)
    history: list[dict[str, Any]] = []
    generator = torch.Generator().manual_seed(ctx.cfg.seed + distributed.rank())
    first = 0
    resume = checkpoints.find_resume(ctx.stage_dir, inputs_hash=ctx.inputs_key, requested=cfg.resume_from, key="ppo.resume_from",
                                     zero_stage=ctx.cfg.deepspeed.zero_stage)
    if resume is not None:
        state = load_loop(resume, engine=engine)
        first, history, health.history = state["step"], state["history"], state["health"]
        controller.value = state["kl_coef"]
        moments.count, moments.mean, moments.var = state["moments"]
        generator.set_state(state["generator"])
        log.info("[ppo] resumed at rollout %d from %s", first, resume)
    offsets = list(range(0, len(prompts) - cfg.rollout_batch_size + 1, cfg.rollout_batch_size))
    per_rank = cfg.rollout_batch_size // distributed.world_size()
    device = next(engine.policy.parameters()).device
    for step in tqdm(range(first, cfg.num_rollouts), desc="ppo rollouts", initial=first, total=cfg.num_rollouts,
                     disable=not distributed.is_main()):
        start = offsets[step % len(offsets)] + distributed.rank() * per_rank
        batch, stats = rollout(cfg, engine=engine, sampler=sampler, reference=reference, reward_model=reward_model, tokenizer=tokenizer,
                                  prompt_ids=prompts[start : start + per_rank], examples=examples[start : start + per_rank],
                                  moments=moments, kl_coef=controller.value)
        optimise_started = clock(device)
        stats.update(_optimise(cfg, batch, engine=engine, generator=generator, rollouts=per_rank, ptx_windows=ptx_windows,
                               pad_token_id=tokenizer.pad_token_id))
        stats["time/training_s"] = clock(device) - optimise_started
        stats = distributed.mean_over_ranks(stats)
        controller.update(stats["kl"], cfg.rollout_batch_size)
        stats.update(step=step + 1, kl_coef=controller.value)
        warnings = health.observe(stats)
        for warning in warnings:
            log.warning("[ppo] step %d: %s", step + 1, warning)
        history.append(stats)
        ctx.tracker.log(rollout_metrics(stats))
        if step % max(1, cfg.logging_every_n_steps) == 0 or step + 1 == cfg.num_rollouts:
            log.info("[ppo] step %d %s", step + 1, " ".join(f"{k}={v:.3g}" for k, v in stats.items() if isinstance(v, float)))
        stop = preemption.stop_requested()
        every = cfg.save_every_n_steps
        if stop or (every > 0 and (step + 1) % every == 0 and step + 1 < cfg.num_rollouts):
            save_loop(checkpoints.trainer_dir(ctx.stage_dir), engine=engine, step=step + 1, inputs_hash=ctx.inputs_key,
                      zero_stage=ctx.cfg.deepspeed.zero_stage,
                      keep=cfg.keep_checkpoints, loop={"history": history, "health": health.history, "kl_coef": controller.value,
                                                       "moments": (moments.count, moments.mean, moments.var),
                                                       "generator": generator.get_state()})
        if stop:
            raise preemption.Preempted(f"ppo: stopped after rollout {step + 1} on {preemption.signal_name()}; checkpoint in "
                                    f"{checkpoints.trainer_dir(ctx.stage_dir)}; rerun the same command to resume")
        if warnings and cfg.stop_on_hacking:
            stats["stopped_early"] = "; ".join(warnings)
            break
    return history


def _optimise(cfg: PPOConfig, rollout: dict[str, Any], *, engine: PPOEngine, generator, rollouts: int,
              ptx_windows: Sequence[list[int]] = (), pad_token_id: int = 0) -> dict[str, float]:
    """``ppo_epochs`` passes over this rank's rollouts in mini-batches (``mini_batch_size`` over
    all ranks), each split into micro-batches of ``micro_batch_size`` rows. A micro-batch's loss
    is weighted by its share of the mini-batch's response tokens, so the accumulated gradient is
    the whole mini-batch's, whatever the split. With ``ppo.ptx_coef`` each micro-batch adds
    ptx_coef x the language-modelling loss of ``ptx_batch_size`` plain-text windows drawn by the
    loop's generator (saved in mid-stage checkpoints, so a resumed run draws the same ones)."""
    sums: dict[str, float] = {}
    n_updates = 0
    mini = cfg.mini_batch_size * rollouts // cfg.rollout_batch_size  # this rank's share of a mini-batch
    micro = min(cfg.micro_batch_size or mini, mini)
    for _ in range(cfg.ppo_epochs):
        order = torch.randperm(rollouts, generator=generator)
        for start in range(0, rollouts, mini):
            index = order[start : start + mini]
            chunks = [index[i : i + micro] for i in range(0, len(index), micro)]
            # A micro-batch's weight is its share of the mini-batch's response tokens on every
            # rank together, times the number of ranks (their gradients are averaged): the
            # update is the token mean over the whole mini-batch, whatever the process count.
            mini_tokens = distributed.sum_over_ranks(rollout["packed"].mask[index].sum())
            engine.zero_grad()
            update: dict[str, float] = {}
            for chunk in chunks:
                weight = float(rollout["packed"].mask[chunk].sum() / mini_tokens) * distributed.world_size()
                losses = _micro_batch_loss(cfg, rollout, chunk, engine=engine, n_update=n_updates + 1)
                if cfg.ptx_coef > 0:
                    drawn = torch.randint(len(ptx_windows), (cfg.ptx_batch_size,), generator=generator).tolist()
                    ptx = plain_text_nll(lambda packed: engine(packed, temperature=1.0)[0], [ptx_windows[i] for i in drawn],
                                         pad_token_id=pad_token_id, device=next(engine.policy.parameters()).device)
                    losses.update(loss=losses["loss"] + cfg.ptx_coef * ptx, **{"loss/ptx": ptx})
                engine.backward(losses["loss"], weight=weight, micro_batches=len(chunks))
                for name, value in losses.items():
                    if name != "loss":
                        update[name] = update.get(name, 0.0) + weight * float(value.detach() if torch.is_tensor(value) else value)
            update["learning_rate"] = engine.learning_rate  # the rate this step is taken at
            update["grad_norm"] = engine.step()
            for name, value in update.items():
                sums[name] = sums.get(name, 0.0) + value
            n_updates += 1
    return {name: total / n_updates for name, total in sums.items()}


def _micro_batch_loss(cfg: PPOConfig, rollout: dict[str, Any], index: torch.Tensor, *, engine: PPOEngine, n_update: int) -> dict[str, Any]:
    """The clipped PPO objective on rows ``index`` of the rollout, with its statistics."""
    mb: Packed = select(rollout["packed"], index)
    new_logprobs, new_values = engine(mb, temperature=cfg.temperature)
    pg_loss, pg_stats = pm.policy_loss(new_logprobs, rollout["logprobs"][index], rollout["advantages"][index], mb.mask,
                                       clip_range=cfg.clip_range)
    vf_loss, vf_stats = pm.value_loss(new_values, rollout["values"][index], rollout["returns"][index], mb.mask,
                                      clip_range_value=cfg.clip_range_value)
    loss = pg_loss + cfg.value_loss_coef * vf_loss
    if not torch.isfinite(loss):
        raise NonFiniteLoss(f"ppo: the loss became {loss.item()} (policy {pg_loss.item()}, value {vf_loss.item()}) in "
                            f"update {n_update} of this rollout; stopped before the optimizer step. The last "
                            f"complete checkpoint in {checkpoints.TRAINER_DIR}/ is intact. Lower ppo.learning_rate")
    return {"loss": loss, "loss/policy": pg_loss, "loss/value": vf_loss, **pg_stats, **vf_stats}
