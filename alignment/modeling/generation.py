"""Batched sampling from a policy, shared by evaluation, pair sampling and PPO rollouts.

Prompts are chats (a list of messages ending with a user turn) rendered with the tokenizer's chat
template and ``add_generation_prompt=True``, exactly as SFT and DPO see them. Scoring what was
sampled lives in alignment/modeling/scoring.py.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

Messages = list[dict[str, str]]


@dataclass(frozen=True)
class Generation:
    text: str
    num_tokens: int  # generated tokens, the end-of-sequence token included when emitted
    ended: bool  # emitted end-of-sequence before max_new_tokens


def render_prompts(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[Messages]) -> list[list[int]]:
    return [
        tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
        for p in prompts
    ]


@contextmanager
def eval_mode(model: PreTrainedModel) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Messages],
    *,
    num_samples: int,
    temperature: float,
    max_new_tokens: int,
    batch_size: int,
    seed: int,
) -> list[list[Generation]]:
    """``num_samples`` responses per prompt; ``temperature == 0`` means greedy decoding."""
    prompt_ids = render_prompts(tokenizer, prompts)
    flat = [ids for ids in prompt_ids for _ in range(num_samples)]
    # Sorting by length keeps left padding short; results are put back in order at the end.
    order = sorted(range(len(flat)), key=lambda i: len(flat[i]))
    texts: list[Generation | None] = [None] * len(flat)
    device = next(model.parameters()).device
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        with eval_mode(model):
            for start in range(0, len(order), batch_size):
                index = order[start : start + batch_size]
                for i, gen in zip(index, _generate_batch(model, tokenizer, [flat[i] for i in index], temperature, max_new_tokens, device)):
                    texts[i] = gen
    finally:
        torch.random.set_rng_state(generator_state)
    return [texts[i * num_samples : (i + 1) * num_samples] for i in range(len(prompts))]  # type: ignore[misc]


def _generate_batch(model, tokenizer, batch: list[list[int]], temperature: float, max_new_tokens: int, device) -> list[Generation]:
    results = []
    for tokens in generate_ids(model, tokenizer, batch, temperature=temperature, max_new_tokens=max_new_tokens, device=device):
        ended = bool(tokens) and tokens[-1] == tokenizer.eos_token_id
        text_tokens = tokens[:-1] if ended else tokens
        results.append(Generation(tokenizer.decode(text_tokens, skip_special_tokens=True), len(tokens), ended))
    return results


def generate_ids(model, tokenizer, batch: list[list[int]], *, temperature: float, max_new_tokens: int, device) -> list[list[int]]:
    """Response token ids for one batch of prompt ids, cut after the first end-of-sequence."""
    width = max(len(ids) for ids in batch)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in batch], device=device)
    attention_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in batch], device=device)
    sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0} if temperature > 0 else {"do_sample": False}
    out = model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        max_new_tokens=max_new_tokens,
        pad_token_id=pad,
        eos_token_id=tokenizer.eos_token_id,
        **sampling,
    )
    responses = []
    for row in out[:, width:].tolist():
        responses.append(row[: row.index(tokenizer.eos_token_id) + 1] if tokenizer.eos_token_id in row else row)
    return responses
