"""One PPO rollout: sample a response per prompt, score it token by token, turn scores into advantages.

1. sample one response per prompt (temperature ``ppo.temperature``) through the rollout engine
   (alignment/modeling/rollout_engine.py): HF generate, or with ``ppo.use_vllm`` vLLM through
   the class TRL's GRPO and RLOO use;
2. score, in micro-batches of ``ppo.micro_batch_size`` rows: log-probs under policy and
   reference, values, the reward model's sequence score (minus ``missing_eos_penalty`` for
   responses that never end), normalised by running moments and clipped;
3. per-token rewards -kl_coef * KL_t (k1 or k3) plus the score on the last token; GAE; whitening.

On the task suite the verifier also scores every rollout (``rollout/gold_accuracy``): training
never sees it, the health check does.
"""

from __future__ import annotations

import time
from typing import Any, Optional, Sequence

import torch

from alignment.config import PPOConfig
from alignment.data.suite import Example, verify
from alignment.modeling.generation import turn_tail
from alignment.modeling.rollout_engine import RolloutEngine
from alignment.modeling.scoring import Packed, pack, policy_forward, select, sequence_scores, token_values
from alignment.scale import distributed
from alignment.stages.ppo import maths as pm
from alignment.stages.ppo.engine import PPOEngine


def rollout(cfg: PPOConfig, *, engine: PPOEngine, sampler: RolloutEngine, reference, reward_model, tokenizer, prompt_ids: list[list[int]],
            examples: Sequence[Optional[Example]], moments: pm.RunningMoments, kl_coef: float) -> tuple[dict[str, Any], dict[str, float]]:
    """This rank's rollout tensors (packed sequences, old log-probs, values, advantages, returns)
    and its statistics."""
    device = next(engine.policy.parameters()).device
    started = clock(device)
    with torch.no_grad():
        responses = sampler.sample(engine, prompt_ids)
        generated = clock(device)
        ended = [bool(r) and r[-1] == tokenizer.eos_token_id for r in responses]
        # Log-probs and values on exactly the sampled tokens; the reward model reads each reply as
        # it was trained to: rendered as a finished turn (the template's tail after an EOS).
        tail = turn_tail(tokenizer)
        packed = pack(prompt_ids, responses, pad_token_id=tokenizer.pad_token_id).to(device)
        rendered = pack(prompt_ids, [r + tail if e else r for r, e in zip(responses, ended)], pad_token_id=tokenizer.pad_token_id).to(device)
        logprobs, ref_logprobs, values, entropy = _score(cfg, packed, engine=engine, reference=reference)
        raw_scores = torch.cat([sequence_scores(reward_model, chunk) for chunk in _micro_batches(cfg, rendered)])
        scored = clock(device)
    ended = torch.tensor(ended, device=device)
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
        advantages = pm.masked_whiten(advantages, mask, sum_over_ranks=distributed.sum_over_ranks)  # over the whole batch
    texts = [tokenizer.decode(r[:-1] if ended_i else r, skip_special_tokens=True) for r, ended_i in zip(responses, ended.tolist())]
    gold = [float(verify(e, t)) for e, t in zip(examples, texts) if e is not None]
    stats = {
        "reward/raw": float(raw_scores.mean()),
        "reward/normalised": float(scores.mean()),
        "kl": float(kl.sum(-1).mean()),
        "entropy": entropy,
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


def _micro_batches(cfg: PPOConfig, packed: Packed) -> list[Packed]:
    """``packed`` in chunks of ``ppo.forward_batch_size`` rows (else ``ppo.micro_batch_size``;
    the whole of it when neither is set)."""
    rows = packed.input_ids.size(0)
    micro = cfg.forward_batch_size or cfg.micro_batch_size or rows
    if micro >= rows:
        return [packed]
    return [select(packed, torch.arange(start, min(rows, start + micro), device=packed.input_ids.device)) for start in range(0, rows, micro)]


def _score(cfg: PPOConfig, packed: Packed, *, engine: PPOEngine, reference):
    """Per-token log-probs (policy, reference), values and the policy's mean entropy, computed
    ``ppo.forward_batch_size`` rows at a time (the [rows, T, vocab] logits of one micro-batch are all
    that is held at once)."""
    chunks = _micro_batches(cfg, packed)
    parts: list[tuple[torch.Tensor, ...]] = []
    entropy_sum, tokens = 0.0, 0.0
    for chunk in chunks:
        logprobs, logits = policy_forward(engine.policy, chunk, temperature=cfg.temperature)
        ref_logprobs, _ = policy_forward(reference, chunk, temperature=cfg.temperature)
        parts.append((logprobs, ref_logprobs, token_values(engine.value_model, chunk)))
        entropy = float(pm.entropy_from_logits(logits, chunk.mask))
        if len(chunks) == 1:
            entropy_sum, tokens = entropy, 1.0  # one chunk: its own masked mean
        else:
            n = float(chunk.mask.sum())
            entropy_sum, tokens = entropy_sum + entropy * n, tokens + n
    logprobs, ref_logprobs, values = (torch.cat(column) for column in zip(*parts))
    return logprobs, ref_logprobs, values, entropy_sum / max(tokens, 1e-9)


def clock(device: torch.device) -> float:
    """Seconds, after the device's queued work is done (phase timings on a GPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()
