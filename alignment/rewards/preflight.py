"""The reward pre-flight: every reward run before the first update, and stopped on when it cannot teach.

Online RL learns only from differences between the replies to one prompt. A reward that is NaN,
that gives every reply of every group the same value, or that scores the data's reference
answers below the starting policy's own samples wastes the whole run, and the trainers find out
(if ever) hours later as a flat curve. So before training each reward is run on

- ``num_generations`` samples of the starting policy for each of ``preflight_prompts`` prompts, and
- the reference answers of the same prompts, where the data has them,

its distribution is logged, and the stage stops with the numbers when a reward is NaN anywhere,
constant within every group, or lower on the reference answers than on the samples on average.
``python -m alignment.validate --preflight`` runs the same check without training.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from alignment.errors import StageError
from alignment.modeling.generation import Messages, generate, render_reply, turn_tail
from alignment.rewards.functions import Reward

log = logging.getLogger(__name__)


class PreflightFailed(StageError):
    """A reward cannot teach this policy anything; the message has the numbers."""


@dataclass(frozen=True)
class RewardStats:
    name: str
    samples: list[float]
    group_spread: list[float]  # max - min within each prompt's group of samples
    references: Optional[list[float]]  # None: the data has no reference answers

    def summary(self) -> dict[str, Any]:
        finite = [v for v in self.samples if math.isfinite(v)]
        out = {"samples_mean": _mean(finite), "samples_std": _std(finite), "samples_min": min(finite, default=math.nan),
               "samples_max": max(finite, default=math.nan), "samples_nan": len(self.samples) - len(finite),
               "groups_with_spread": sum(s > 0 for s in self.group_spread), "groups": len(self.group_spread)}
        if self.references is not None:
            ref = [v for v in self.references if math.isfinite(v)]
            out.update(references_mean=_mean(ref), references_nan=len(self.references) - len(ref))
        return out

    def problems(self) -> list[str]:
        s = self.summary()
        found = []
        if s["samples_nan"] or s.get("references_nan"):
            found.append(f"{self.name} is NaN (or inf) on {s['samples_nan']} of {len(self.samples)} samples"
                         + (f" and {s['references_nan']} reference answers" if s.get("references_nan") else ""))
        if s["groups_with_spread"] == 0:
            found.append(f"{self.name} is constant within every one of {s['groups']} groups (samples mean {s['samples_mean']:.4g}, "
                         f"std {s['samples_std']:.4g}): group baselines turn that into zero advantage, so nothing is learned")
        if self.references is not None and s["references_mean"] < s["samples_mean"]:
            found.append(f"{self.name} scores the reference answers lower than the policy's own samples on average "
                         f"({s['references_mean']:.4g} against {s['samples_mean']:.4g}): optimising it moves away from them")
        return found


def run_preflight(rewards: Sequence[Reward], *, policy, tokenizer, prompts: Sequence[Messages], columns: dict[str, list],
                  references: Optional[Sequence[str]], num_generations: int, temperature: float, max_new_tokens: int,
                  batch_size: int, seed: int, stage: str) -> dict[str, Any]:
    """Run every reward on samples and references; log the distributions; raise
    :class:`PreflightFailed` on a reward that cannot teach. Returns the summaries (for result.json)."""
    generations = generate(policy, tokenizer, prompts, num_samples=num_generations, temperature=temperature,
                           max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed)
    flat = [g for group in generations for g in group]
    repeated = {key: [v for v in values for _ in range(num_generations)] for key, values in columns.items()}
    stats = []
    for reward in rewards:
        samples = _call(reward, prompts=[p for p in prompts for _ in range(num_generations)],
                        texts=[g.text for g in flat], ids=[list(g.token_ids) for g in flat], columns=repeated)
        spread = [max(samples[i:i + num_generations]) - min(samples[i:i + num_generations])
                  for i in range(0, len(samples), num_generations)]
        refs = None
        if references is not None:
            refs = _call(reward, prompts=list(prompts), texts=list(references),
                         ids=[_reference_ids(tokenizer, p, r) for p, r in zip(prompts, references)], columns=columns)
        stats.append(RewardStats(reward.name, samples, [s if math.isfinite(s) else 0.0 for s in spread], refs))
    summaries = {s.name: s.summary() for s in stats}
    for name, s in summaries.items():
        log.info("[%s] pre-flight %s on %d samples of %d prompts: %s", stage, name, len(flat), len(prompts), describe(s))
    problems = [p for s in stats for p in s.problems()]
    if problems:
        raise PreflightFailed(f"{stage}: reward pre-flight failed: " + "; ".join(problems)
                              + f". Fix the reward(s) in {stage}.rewards, or set {stage}.preflight=false to train anyway")
    return summaries


def describe(summary: dict[str, Any]) -> str:
    """One reward's pre-flight distribution in one line (the log and ``alignment.validate --preflight``)."""
    s = summary
    ref = f", references mean {s['references_mean']:.4g}" if "references_mean" in s else ""
    return (f"mean {s['samples_mean']:.4g} std {s['samples_std']:.4g} min {s['samples_min']:.4g} max {s['samples_max']:.4g}, "
            f"NaN {s['samples_nan']}, {s['groups_with_spread']} of {s['groups']} groups with spread{ref}")


def _call(reward: Reward, *, prompts: list, texts: list[str], ids: list[list[int]], columns: dict[str, list]) -> list[float]:
    values = reward.fn(prompts=prompts, completions=[[{"role": "assistant", "content": t}] for t in texts], completion_ids=ids, **columns)
    if len(values) != len(texts):
        raise PreflightFailed(f"reward {reward.name} returned {len(values)} values for {len(texts)} replies; return one per reply")
    return [math.nan if v is None else float(v) for v in values]


def _reference_ids(tokenizer, prompt: Messages, answer: str) -> list[int]:
    """A reference answer's ids as a sampled reply that ended would have them: up to its EOS."""
    _, reply = render_reply(tokenizer, prompt, answer)
    tail = turn_tail(tokenizer)
    return reply[: len(reply) - len(tail)] if tail and reply[-len(tail):] == tail else reply


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def _std(values: list[float]) -> float:
    if len(values) < 2:
        return 0.0
    m = _mean(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / len(values))
