"""Reward functions in TRL's signature, built from ``<stage>.rewards``.

Every reward is a plain function ``f(prompts, completions, completion_ids, **columns) ->
list[float]``, as TRL's GRPOTrainer and RLOOTrainer call them, one value per reply. ``columns``
are the prompt dataset's other columns repeated per reply: ``answer`` (the reference answer,
where the data has one) and ``example_index`` (the suite example, for the verifier).

- ``verifier``: the task suite's exact check, 1.0 for a correct reply and 0.0 otherwise.
- ``reward_model``: a reward model's score of the reply's sampled token ids (never a
  decode-and-encode of its text), read where its head was trained: a reply that ended gets the
  chat template's tail after EOS first, as the reward trainer rendered it.
- ``package.module:function``: the user's own function, imported by name.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

from alignment.config import RewardFunctionConfig
from alignment.data.suite.build import Example, verify
from alignment.errors import StageError
from alignment.modeling.generation import render_prompts, turn_tail
from alignment.modeling.scoring import score_responses

RewardFn = Callable[..., list]
BUILT_IN = ("verifier", "reward_model")


@dataclass(frozen=True)
class Reward:
    name: str  # as TRL logs it: rewards/<name>/mean
    weight: float
    fn: RewardFn


def reply_text(completion: Any) -> str:
    """A completion's text: TRL passes conversational completions as a one-message list."""
    return completion[-1]["content"] if isinstance(completion, list) else completion


def verifier_reward(examples: Sequence[Example]) -> RewardFn:
    def verifier(prompts, completions, example_index, **_) -> list[float]:
        return [float(verify(examples[i], reply_text(c))) for c, i in zip(completions, example_index)]
    return verifier


def reward_model_reward(model, tokenizer, *, batch_size: int) -> RewardFn:
    """Scores on the ids that were sampled; ``tokenizer`` must be the policy's (checked by the caller)."""
    tail, eos = turn_tail(tokenizer), tokenizer.eos_token_id

    def reward_model(prompts, completions, completion_ids, **_) -> list[float]:
        prompt_ids = render_prompts(tokenizer, prompts)
        replies = [list(ids) + (tail if ids and ids[-1] == eos else []) for ids in completion_ids]
        return score_responses(model, prompt_ids, replies, pad_token_id=tokenizer.pad_token_id, batch_size=batch_size).tolist()
    return reward_model


def import_reward(name: str, *, key: str) -> RewardFn:
    """``package.module:function``, imported; every way it can fail names ``key`` and the fix."""
    module_name, _, attribute = name.partition(":")
    if not module_name or not attribute:
        raise StageError(f"{key}: {name!r} is not a reward; use verifier, reward_model, or package.module:function")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise StageError(f"{key}: cannot import {module_name!r} for reward {name!r} ({err}); put its package on PYTHONPATH "
                         f"or pip install it") from err
    fn = getattr(module, attribute, None)
    if not callable(fn):
        raise StageError(f"{key}: {module_name} has no function {attribute!r} (reward {name!r})")
    return fn


def check_reward_specs(specs: Sequence[RewardFunctionConfig], *, stage: str, has_verifier: bool, has_reward_model: bool) -> None:
    """Config-time checks (before any model loads): names resolve, weights are finite, built-ins have what they need."""
    if not specs:
        raise StageError(f"{stage}.rewards is empty: name at least one reward (verifier, reward_model or package.module:function)")
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise StageError(f"{stage}.rewards names a reward twice: {names}")
    for index, spec in enumerate(specs):
        key = f"{stage}.rewards[{index}]"
        if spec.weight != spec.weight or abs(spec.weight) == float("inf"):
            raise StageError(f"{key}.weight={spec.weight} must be a finite number")
        if spec.name == "verifier" and not has_verifier:
            raise StageError(f"{key}: the verifier checks the built-in task suite's answers only; with a prompt file use "
                             f"reward_model or your own package.module:function")
        elif spec.name == "reward_model" and not has_reward_model:
            raise StageError(f"{key}: reward_model needs a reward model: put a reward stage before {stage} or set "
                             f"{stage}.reward_from=<reward stage or HF dir>")
        elif spec.name not in BUILT_IN:
            import_reward(spec.name, key=key)


def build_rewards(specs: Sequence[RewardFunctionConfig], *, stage: str, examples: Sequence[Optional[Example]],
                  reward_model: Optional[RewardFn]) -> list[Reward]:
    rewards = []
    for index, spec in enumerate(specs):
        if spec.name == "verifier":
            fn = verifier_reward(examples)  # type: ignore[arg-type]  # suite examples: checked at config time
        elif spec.name == "reward_model":
            assert reward_model is not None, "checked at config time"
            fn = reward_model
        else:
            fn = import_reward(spec.name, key=f"{stage}.rewards[{index}]")
        rewards.append(Reward(name=spec.name.rpartition(":")[2], weight=spec.weight, fn=fn))
    return rewards
