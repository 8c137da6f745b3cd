"""Evaluation of a policy on held-out prompts, run after every stage.

On the built-in suite each response is scored by the family's exact verifier:

- ``gold_accuracy_greedy``: share of prompts whose greedy response is correct;
- ``gold_accuracy_sampled``: share of correct responses among ``samples_per_prompt`` samples
  per prompt at ``temperature`` (1.0 by default), the number preference tuning should raise;
- the same two split into ``seen``/``unseen`` phrasings and per family;
- ``response_tokens_mean`` and ``eos_rate`` of the sampled responses.

On a dataset without a verifier only the response statistics are reported. Beside these, the
stage-specific held-out metrics live here too: KL to a reference policy, a reward model's score
of a policy's samples, a reward model's pair accuracy and AUC, and DPO's implicit rewards.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from datasets import Dataset
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from alignment.config import EvalConfig
from alignment.data.sources import text_windows
from alignment.data.stage_data import HeldOut, user_turn
from alignment.data.suite import Example, verify
from alignment.errors import DataError
from alignment.modeling.generation import Generation, Messages, as_rendered, generate, render_prompts, turn_tail
from alignment.modeling.scoring import render_replies, response_logps, score_responses


def evaluate_policy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    *,
    cfg: EvalConfig,
    examples: Sequence[Example] = (),
    unseen: frozenset[Example] = frozenset(),
    prompts: Sequence[Messages] = (),
    seed: int,
) -> dict[str, Any]:
    """Metrics for ``examples`` (suite, verified; ``unseen`` marks held-out phrasings) or else
    plain ``prompts`` (no verifier)."""
    if examples:
        examples = list(examples)[: cfg.n_prompts] if cfg.n_prompts else list(examples)
        prompts = [user_turn(e.prompt) for e in examples]
    else:
        prompts = list(prompts)[: cfg.n_prompts] if cfg.n_prompts else list(prompts)
    if not prompts:
        return {}
    common = {"max_new_tokens": cfg.max_new_tokens, "batch_size": cfg.batch_size, "seed": seed}
    sampled = generate(model, tokenizer, prompts, num_samples=cfg.samples_per_prompt, temperature=cfg.temperature, **common)
    flat = [g for group in sampled for g in group]
    metrics: dict[str, Any] = {
        "eval_prompts": len(prompts),
        "response_tokens_mean": sum(g.num_tokens for g in flat) / len(flat),
        "eos_rate": sum(g.ended for g in flat) / len(flat),
    }
    if examples:
        greedy = [group[0] for group in generate(model, tokenizer, prompts, num_samples=1, temperature=0.0, **common)]
        metrics.update(_gold_metrics(examples, unseen, greedy, sampled))
    return metrics


def evaluate_held_out(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, held: HeldOut, *, cfg: EvalConfig,
                      seed: int) -> dict[str, Any]:
    """:func:`evaluate_policy` on a stage's held-out set, and perplexity on ``eval.lm_text``."""
    metrics = evaluate_policy(model, tokenizer, cfg=cfg, examples=held.examples, unseen=held.unseen, prompts=held.prompts, seed=seed)
    return {**metrics, **lm_text_perplexity(model, tokenizer, cfg=cfg)} if cfg.lm_text else metrics


def lm_text_perplexity(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, *, cfg: EvalConfig) -> dict[str, float]:
    """exp(mean negative log-likelihood per scored token) on each ``eval.lm_text`` source
    (``lm_perplexity/<file stem>``) and over all of them (``lm_perplexity``): the language ability
    instruction tuning can erode. Each window's first token is context; every later one is scored."""
    out, total_nll, total_tokens = {}, 0.0, 0
    for path in cfg.lm_text:
        windows = text_windows([path], tokenizer, max_tokens=cfg.lm_text_window_tokens, max_total=cfg.lm_text_max_tokens)
        rows_per_forward = max(1, 4096 // cfg.lm_text_window_tokens)  # bounds the [rows, tokens, vocab] logits
        logps = response_logps(model, [w[:1] for w in windows], [w[1:] for w in windows],
                               pad_token_id=tokenizer.pad_token_id, batch_size=rows_per_forward)
        nll, tokens = -float(logps.sum()), sum(len(w) - 1 for w in windows)
        if tokens == 0:
            raise DataError(f"eval.lm_text: {path} has no document of two tokens or more: nothing to score")
        out[f"lm_perplexity/{Path(path).stem}"] = math.exp(nll / tokens)
        total_nll, total_tokens = total_nll + nll, total_tokens + tokens
    out["lm_perplexity"] = math.exp(total_nll / total_tokens)
    out["lm_scored_tokens"] = float(total_tokens)
    return out


def kl_to_reference(policy, reference, tokenizer, held: HeldOut, *, cfg: EvalConfig, seed: int) -> float:
    """Monte-Carlo KL(pi || pi_ref) per response: mean of log pi(y) - log pi_ref(y), y ~ pi, on
    the held-out prompts, each y scored on exactly the tokens that were sampled (a reply cut at
    max_new_tokens is scored without the EOS it never produced)."""
    prompts = held_out_prompts(held, cfg)
    if not prompts:
        return float("nan")
    samples = generate(policy, tokenizer, prompts, num_samples=1, temperature=1.0, max_new_tokens=cfg.max_new_tokens,
                       batch_size=cfg.batch_size, seed=seed)
    prompt_ids, replies = render_prompts(tokenizer, prompts), [list(group[0].token_ids) for group in samples]
    common = {"pad_token_id": tokenizer.pad_token_id, "batch_size": cfg.batch_size}
    diff = response_logps(policy, prompt_ids, replies, **common) - response_logps(reference, prompt_ids, replies, **common)
    return float(diff.mean())


def _gold_metrics(
    examples: Sequence[Example], unseen: frozenset[Example], greedy: Sequence[Generation], sampled: Sequence[Sequence[Generation]]
) -> dict[str, Any]:
    buckets: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for example, g, samples in zip(examples, greedy, sampled):
        scores = (float(verify(example, g.text)), sum(verify(example, s.text) for s in samples) / len(samples))
        buckets["all"].append(scores)
        buckets["unseen" if example in unseen else "seen"].append(scores)
        buckets[f"family/{example.family}"].append(scores)
    out: dict[str, Any] = {}
    for name, scores in sorted(buckets.items()):
        prefix = "" if name == "all" else f"{name}/"
        out[f"{prefix}gold_accuracy_greedy"] = sum(s[0] for s in scores) / len(scores)
        out[f"{prefix}gold_accuracy_sampled"] = sum(s[1] for s in scores) / len(scores)
    return out


def held_out_prompts(held: HeldOut, cfg: EvalConfig) -> list[Messages]:
    prompts = [user_turn(e.prompt) for e in held.examples] or list(held.prompts)
    return prompts[: cfg.n_prompts] if cfg.n_prompts else prompts


def policy_reward_score(policy, tokenizer, reward_model, held: HeldOut, *, cfg: EvalConfig, seed: int) -> float:
    """Mean reward-model score of a policy's sampled responses on the held-out prompts."""
    prompts = held_out_prompts(held, cfg)
    samples = generate(policy, tokenizer, prompts, num_samples=1, temperature=cfg.temperature,
                       max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size, seed=seed)
    tail = turn_tail(tokenizer)
    replies = [as_rendered(group[0], tail) for group in samples]  # as the reward model was trained to read them
    scores = score_responses(reward_model, render_prompts(tokenizer, prompts), replies, pad_token_id=tokenizer.pad_token_id,
                             batch_size=cfg.batch_size)
    return float(scores.mean()) if len(scores) else float("nan")


def pair_metrics(model, tokenizer, pairs: Dataset, *, batch_size: int) -> dict[str, Any]:
    """A reward model on held-out pairs: pairwise accuracy, mean rewards of chosen and rejected,
    and the AUC with which its scores separate chosen from rejected responses (over every
    scored response, each pair contributing one of each)."""
    prompt_ids, chosen_ids, rejected_ids = pair_ids(tokenizer, pairs)
    common = {"pad_token_id": tokenizer.pad_token_id, "batch_size": batch_size}
    chosen = score_responses(model, prompt_ids, chosen_ids, **common)
    rejected = score_responses(model, prompt_ids, rejected_ids, **common)
    return {
        "pairwise_accuracy": float((chosen > rejected).float().mean()),
        "reward_chosen_mean": float(chosen.mean()),
        "reward_rejected_mean": float(rejected.mean()),
        "correct_vs_incorrect_auc": roc_auc(positives=chosen, negatives=rejected),
        "eval_pairs": len(pairs),
    }


def pair_ids(tokenizer, pairs: Dataset) -> tuple[list[list[int]], list[list[int]], list[list[int]]]:
    """(prompt, chosen, rejected) token ids of preference pairs as the trainers see them: the ids a
    sampled pair carries, or the chat template's rendering of a text pair (as TRL renders it)."""
    if {"prompt_ids", "chosen_ids", "rejected_ids"} <= set(pairs.column_names):
        return pairs["prompt_ids"], pairs["chosen_ids"], pairs["rejected_ids"]
    prompts = pairs["prompt"]
    prompt_ids, chosen = render_replies(tokenizer, prompts, [c[-1]["content"] for c in pairs["chosen"]])
    _, rejected = render_replies(tokenizer, prompts, [r[-1]["content"] for r in pairs["rejected"]])
    return prompt_ids, chosen, rejected


def roc_auc(*, positives: torch.Tensor, negatives: torch.Tensor) -> float:
    """P(score of a random positive > score of a random negative), ties counting half."""
    if len(positives) == 0 or len(negatives) == 0:
        return float("nan")
    diff = positives[:, None] - negatives[None, :]
    return float(((diff > 0).float() + 0.5 * (diff == 0).float()).mean())


def preference_metrics(policy, reference, tokenizer, pairs: Optional[Dataset], *, beta: float, batch_size: int) -> dict[str, Any]:
    """DPO's implicit reward beta * (log pi - log pi_ref) on held-out pairs: the share of pairs
    it ranks right and its mean margin."""
    if pairs is None or len(pairs) == 0:
        return {}
    prompts, chosen, rejected = pair_ids(tokenizer, pairs)
    logp = {
        name: response_logps(model, prompts, responses, pad_token_id=tokenizer.pad_token_id, batch_size=batch_size)
        for name, model, responses in (
            ("pc", policy, chosen), ("pr", policy, rejected), ("rc", reference, chosen), ("rr", reference, rejected)
        )
    }
    margin = beta * ((logp["pc"] - logp["rc"]) - (logp["pr"] - logp["rr"]))
    return {
        "reward_accuracy": float((margin > 0).float().mean()),
        "reward_margin": float(margin.mean()),
        "eval_pairs": len(pairs),
    }
