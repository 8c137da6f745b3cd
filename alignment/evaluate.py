"""Evaluation of a policy on held-out prompts, run after every stage.

On the built-in suite each response is scored by the family's exact verifier:

- ``gold_accuracy_greedy``: share of prompts whose greedy response is correct;
- ``gold_accuracy_sampled``: share of correct responses among ``samples_per_prompt`` samples
  per prompt at ``temperature`` (1.0 by default), the number preference tuning should raise;
- the same two split into ``seen``/``unseen`` phrasings and per family;
- ``response_tokens_mean`` and ``eos_rate`` of the sampled responses.

On a dataset without a verifier only the response statistics are reported.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Sequence

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from alignment.config import EvalConfig
from alignment.inference import Generation, Messages, generate, response_logps
from alignment.suite import Example, verify


def user_turn(prompt: str) -> Messages:
    return [{"role": "user", "content": prompt}]


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


def kl_to_reference(policy, reference, tokenizer, held, *, cfg: EvalConfig, seed: int) -> float:
    """Monte-Carlo KL(pi || pi_ref) per response: mean of log pi(y) - log pi_ref(y), y ~ pi, on
    the held-out prompts (``held`` is an ``alignment.data.HeldOut``)."""
    prompts = [user_turn(e.prompt) for e in held.examples] or list(held.prompts)
    prompts = prompts[: cfg.n_prompts] if cfg.n_prompts else prompts
    if not prompts:
        return float("nan")
    samples = generate(policy, tokenizer, prompts, num_samples=1, temperature=1.0, max_new_tokens=cfg.max_new_tokens,
                       batch_size=cfg.batch_size, seed=seed)
    responses = [group[0].text for group in samples]
    diff = response_logps(policy, tokenizer, prompts, responses, batch_size=cfg.batch_size) - response_logps(
        reference, tokenizer, prompts, responses, batch_size=cfg.batch_size
    )
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


def example_split(seen: Sequence[Example], unseen: Sequence[Example]) -> list[Example]:
    """Interleave seen and unseen held-out examples so a prefix (n_prompts) keeps both."""
    out: list[Example] = []
    for i in range(max(len(seen), len(unseen))):
        out.extend(x[i] for x in (seen, unseen) if i < len(x))
    return out
