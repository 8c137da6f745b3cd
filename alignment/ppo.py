"""PPO against a reward model: the RLHF step of Ziegler et al. (2019) and Ouyang et al. (2022).

TRL 1.x no longer ships PPO, so it is written here in TRL's spirit: the maths are the pure
functions of ``alignment.ppo_math``; this module is the loop around them.

Models: the policy starts from the latest policy checkpoint (SFT), a frozen copy of it is the
reference, the reward model comes from the chain's reward stage (or ``ppo.reward_from``), and
the value model starts from the reward model (``ppo.value_from=reward``) or from the policy.

Each of ``num_rollouts`` iterations:
1. sample one response per prompt for ``rollout_batch_size`` prompts (temperature ``temperature``);
2. score: log-probs under policy and reference, values, the reward model's sequence score
   (minus ``missing_eos_penalty`` for responses that never end), normalised by running moments
   and clipped;
3. per-token rewards -kl_coef * KL_t (k1 or k3) plus the score on the last token; GAE; whiten;
4. ``ppo_epochs`` passes over mini-batches of ``mini_batch_size``: clipped policy loss + clipped
   value loss, gradient clipping; then the (fixed or adaptive) KL controller updates.

On the task suite the verifier also scores every rollout (``rollout/gold_accuracy``): training
never sees it, the health check does.

    python -m alignment.run +recipe=sft_rm_ppo
    python -m alignment.run +recipe=sft_rm_ppo ppo.kl_estimator=k3 ppo.adaptive_kl=true ppo.kl_target=0.5
"""

from __future__ import annotations

import copy
import logging
import time
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from alignment import checkpoints, distributed, lora, preempt
from alignment.metric_names import rollout_metrics
from alignment import ppo_math as pm
from alignment.checkpoints import NonFiniteLoss
from alignment.distributed import unsharded
from alignment.ppo_engine import PPOEngine, load_loop, save_loop
from alignment.data import HeldOut, StageData, fingerprint_rows, load_suite, prompt_file_rows, stage_data, stage_source, suite_held_out
from alignment.evaluate import evaluate_policy, kl_to_reference, user_turn
from alignment.health import HealthCheck
from alignment.inference import generate_ids, render_prompts
from alignment.ppo_rollout import Packed, pack, policy_forward, select, sequence_scores, token_values
from alignment.records import StageResult
from alignment.reward import load_reward_model, policy_reward_score
from alignment.sft import ctx_result
from alignment.stage import StageContext, StageError, find_reward_model, load_policy, padding_free, save_checkpoint, seed_everything
from alignment.suite import verify

log = logging.getLogger(__name__)


def train_ppo(cfg, ctx: StageContext) -> StageResult:
    """Run the PPO stage described by ``cfg`` (an ``alignment.config.PPOConfig``)."""
    seed_everything(ctx)
    if ctx.start.path is None:
        raise StageError("ppo needs a policy to start from: run it after sft, or set ppo.init_from")
    reward_start = find_reward_model(cfg.reward_from, ctx, key="ppo.reward_from")
    ctx.inputs["reward_model"] = {"stage": reward_start.parent_stage, "checkpoint": reward_start.path, "hash": reward_start.hash}
    policy, tokenizer = load_policy(ctx)  # with model.peft: a PeftModel (fresh, or init_from's adapter)
    if lora.is_peft(policy):
        if ctx.start.adapter:
            lora.add_reference_adapter(policy)  # a continued adapter: the reference is its frozen copy
        reference = lora.ReferenceView(policy)  # no second model: the same weights, adapters disabled
    else:
        reference = copy.deepcopy(policy).eval().requires_grad_(False)
    reward_model, reward_tokenizer = load_reward_model(reward_start.path, ctx=ctx)
    reward_model.eval().requires_grad_(False)
    if reward_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise StageError(f"ppo: the reward model {reward_start.path} uses another tokenizer than the policy; train it from the same base")
    value_model = _value_model(cfg, ctx, reward_start.path)
    prompts, examples, data = _prompts(cfg, ctx, tokenizer)

    engine = PPOEngine(cfg, ctx, policy=policy, value_model=value_model)
    history = _ppo_loop(cfg, ctx, engine=engine, reference=reference, reward_model=reward_model, tokenizer=tokenizer,
                        prompts=prompts, examples=examples)

    with engine.whole_policy() as whole:
        checkpoint, checkpoint_hash = save_checkpoint(whole, tokenizer, ctx)
    policy = unsharded(policy, checkpoint, loader=AutoModelForCausalLM)
    metrics: dict[str, Any] = {"train_steps": len(history), "history": history, **{f"final/{k}": v for k, v in history[-1].items()}}
    metrics["stopped_early"] = history[-1].get("stopped_early")
    if ctx.cfg.eval.enabled:
        held = data.held_out
        metrics.update(evaluate_policy(policy, tokenizer, cfg=ctx.cfg.eval, examples=held.examples, unseen=held.unseen,
                                       prompts=held.prompts, seed=ctx.cfg.seed))
        metrics["kl_to_parent"] = kl_to_reference(policy, reference, tokenizer, held, cfg=ctx.cfg.eval, seed=ctx.cfg.seed + 2)
        metrics["reward_model_score"] = policy_reward_score(policy, tokenizer, reward_model, held, cfg=ctx.cfg.eval, seed=ctx.cfg.seed + 3)
    return ctx_result(ctx, cfg, checkpoint=checkpoint, checkpoint_hash=checkpoint_hash, data=data, metrics=metrics)


def _ppo_loop(cfg, ctx, *, engine: PPOEngine, reference, reward_model, tokenizer, prompts, examples) -> list[dict[str, Any]]:
    """``num_rollouts`` rollout-and-update iterations; each rank samples its share of every
    rollout batch. Resumes from the newest complete mid-stage checkpoint; stops (after one)
    when a stop is requested (alignment/preempt.py)."""
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
        rollout, stats = _rollout(cfg, engine=engine, reference=reference, reward_model=reward_model, tokenizer=tokenizer,
                                  prompt_ids=prompts[start : start + per_rank], examples=examples[start : start + per_rank],
                                  moments=moments, kl_coef=controller.value)
        optimise_started = _clock(device)
        stats.update(_optimise(cfg, rollout, engine=engine, generator=generator, rollouts=per_rank))
        stats["time/training_s"] = _clock(device) - optimise_started
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
        stop = preempt.stop_requested()
        every = cfg.save_every_n_steps
        if stop or (every > 0 and (step + 1) % every == 0 and step + 1 < cfg.num_rollouts):
            save_loop(checkpoints.trainer_dir(ctx.stage_dir), engine=engine, step=step + 1, inputs_hash=ctx.inputs_key,
                      zero_stage=ctx.cfg.deepspeed.zero_stage,
                      keep=cfg.keep_checkpoints, loop={"history": history, "health": health.history, "kl_coef": controller.value,
                                                       "moments": (moments.count, moments.mean, moments.var),
                                                       "generator": generator.get_state()})
        if stop:
            raise preempt.Preempted(f"ppo: stopped after rollout {step + 1} on {preempt.signal_name()}; checkpoint in "
                                    f"{checkpoints.trainer_dir(ctx.stage_dir)}; rerun the same command to resume")
        if warnings and cfg.stop_on_hacking:
            stats["stopped_early"] = "; ".join(warnings)
            break
    return history


def _clock(device: torch.device) -> float:
    """Seconds, after the device's queued work is done (phase timings on a GPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _rollout(cfg, *, engine: PPOEngine, reference, reward_model, tokenizer, prompt_ids, examples, moments, kl_coef):
    device = next(engine.policy.parameters()).device
    engine.eval()
    started = _clock(device)
    with torch.no_grad():
        with engine.sampling_policy() as sampler:
            responses = generate_ids(sampler, tokenizer, prompt_ids, temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens,
                                     device=device)
        generated = _clock(device)
        packed = pack(prompt_ids, responses, pad_token_id=tokenizer.pad_token_id)
        logprobs, logits = policy_forward(engine.policy, packed, temperature=cfg.temperature)
        ref_logprobs, _ = policy_forward(reference, packed, temperature=cfg.temperature)
        values = token_values(engine.value_model, packed)
        raw_scores = sequence_scores(reward_model, packed)
        scored = _clock(device)
    ended = torch.tensor([bool(r) and r[-1] == tokenizer.eos_token_id for r in responses])
    scores = pm.eos_penalty_scores(raw_scores, ended, penalty=cfg.missing_eos_penalty)
    if cfg.normalize_scores:
        moments.update(distributed.all_gather_cat(scores))  # every rank normalises by the whole batch
        scores = (scores - moments.mean) / max(moments.std, 1e-6)
    if cfg.score_clip is not None:
        scores = pm.clip_scores(scores, clip=cfg.score_clip)
    mask = packed.mask
    kl = pm.kl_penalty(logprobs, ref_logprobs, estimator=cfg.kl_estimator) * mask
    rewards = pm.per_token_rewards(scores, kl, mask, kl_coef=kl_coef)
    advantages, returns = pm.gae_advantages(rewards, values, mask, gamma=cfg.gamma, lam=cfg.lam)
    if cfg.whiten_advantages:
        advantages = pm.masked_whiten(advantages, mask)
    texts = [tokenizer.decode(r[:-1] if ended_i else r, skip_special_tokens=True) for r, ended_i in zip(responses, ended.tolist())]
    gold = [float(verify(e, t)) for e, t in zip(examples, texts) if e is not None]
    stats = {
        "reward/raw": float(raw_scores.mean()),
        "reward/normalised": float(scores.mean()),
        "kl": float(kl.sum(-1).mean()),
        "entropy": float(pm.entropy_from_logits(logits, mask)),
        "response_tokens": float(mask.sum(-1).mean()),
        "eos_rate": float(ended.float().mean()),
        # Where a step's time goes (alignment.bench reports tokens/s per phase from these).
        "time/generation_s": generated - started,
        "time/scoring_s": scored - generated,
        "tokens/generated": float(mask.sum()),
        "tokens/scored": float(packed.attention_mask.sum()),
    }
    if gold:
        stats["rollout/gold_accuracy"] = sum(gold) / len(gold)
    rollout = {"packed": packed, "logprobs": logprobs, "values": values, "advantages": advantages, "returns": returns}
    return rollout, stats


def _optimise(cfg, rollout, *, engine: PPOEngine, generator, rollouts: int) -> dict[str, float]:
    """``ppo_epochs`` passes over this rank's rollouts in mini-batches (``mini_batch_size`` over all ranks)."""
    engine.train()
    sums: dict[str, float] = {}
    n_updates = 0
    mini = cfg.mini_batch_size * rollouts // cfg.rollout_batch_size  # this rank's share of a mini-batch
    for _ in range(cfg.ppo_epochs):
        order = torch.randperm(rollouts, generator=generator)
        for start in range(0, rollouts, mini):
            index = order[start : start + mini]
            mb: Packed = select(rollout["packed"], index)
            new_logprobs, new_values = engine(mb, temperature=cfg.temperature)
            pg_loss, pg_stats = pm.policy_loss(new_logprobs, rollout["logprobs"][index], rollout["advantages"][index], mb.mask,
                                               clip_range=cfg.clip_range)
            vf_loss, vf_stats = pm.value_loss(new_values, rollout["values"][index], rollout["returns"][index], mb.mask,
                                              clip_range_value=cfg.clip_range_value)
            loss = pg_loss + cfg.value_loss_coef * vf_loss
            if not torch.isfinite(loss):
                raise NonFiniteLoss(f"ppo: the loss became {loss.item()} (policy {pg_loss.item()}, value {vf_loss.item()}) in "
                                    f"update {n_updates + 1} of this rollout; stopped before the optimizer step. The last "
                                    f"complete checkpoint in {checkpoints.TRAINER_DIR}/ is intact. Lower ppo.learning_rate")
            grad_norm = engine.step(loss)
            for name, value in {"loss/policy": pg_loss, "loss/value": vf_loss, "grad_norm": grad_norm, **pg_stats, **vf_stats}.items():
                sums[name] = sums.get(name, 0.0) + float(value.detach() if torch.is_tensor(value) else value)
            n_updates += 1
    return {name: total / n_updates for name, total in sums.items()}


def _value_model(cfg, ctx: StageContext, reward_path: str):
    if cfg.value_from == "reward":
        model, _ = load_reward_model(reward_path, ctx=ctx)
    else:
        with distributed.whole_loading():
            model = AutoModelForSequenceClassification.from_pretrained(ctx.start.path, num_labels=1)
        padding_free(model, ctx.cfg.model)  # load_reward_model's models have it already
    model.config.pad_token_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    return lora.unwrap(lora.attach(model, ctx.cfg, task=lora.SEQ_CLS, adapter=None))  # token_values reads .score


def _prompts(cfg, ctx: StageContext, tokenizer) -> tuple[list[list[int]], list, StageData]:
    """Tokenised training prompts (and their suite examples, for the verifier) plus held-out data."""
    data_cfg = stage_data(ctx.cfg.data, cfg)
    path = stage_source(data_cfg, cfg.data_path)
    if path is None:
        suite = load_suite(ctx.cfg.data.suite)
        examples = list(suite.train[: cfg.n_prompts])
        messages = [user_turn(e.prompt) for e in examples]
        held = suite_held_out(suite)
        source = {"source": "suite", "prompts": len(examples)}
    else:
        messages = prompt_file_rows(data_cfg, path=path, seed=ctx.cfg.seed)[: cfg.n_prompts]
        examples = [None] * len(messages)
        held = HeldOut(prompts=messages[: ctx.cfg.data.max_eval_rows])
        source = {"source": path, "prompts": len(messages)}
    if len(messages) < cfg.rollout_batch_size:
        raise StageError(f"ppo: {len(messages)} prompts, fewer than ppo.rollout_batch_size={cfg.rollout_batch_size}")
    data = StageData(train=None, held_out=held, fingerprint=f"prompts:{fingerprint_rows(messages)}", counts=source)  # type: ignore[arg-type]
    return render_prompts(tokenizer, messages), examples, data
