"""Batched sampling from a policy, shared by evaluation, pair sampling and PPO rollouts.

Prompts are chats (a list of messages ending with a user turn) rendered with the tokenizer's chat
template and ``add_generation_prompt=True``, exactly as SFT and DPO see them. Scoring what was
sampled lives in alignment/modeling/scoring.py.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from alignment.scale import preemption

log = logging.getLogger(__name__)

Messages = list[dict[str, str]]


@dataclass(frozen=True)
class Generation:
    text: str  # the reply decoded without its end-of-sequence token, for verifiers and people
    token_ids: tuple[int, ...]  # the sampled tokens themselves, EOS included when emitted: what is scored
    ended: bool  # emitted end-of-sequence before max_new_tokens

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


def render_prompts(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[Messages]) -> list[list[int]]:
    return [
        tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
        for p in prompts
    ]


def render_reply(tokenizer: PreTrainedTokenizerBase, prompt: Messages, reply: str) -> tuple[list[int], list[int]]:
    """(prompt ids, reply ids) of a text reply as TRL's trainers tokenize it: the chat template's
    rendering of prompt + assistant turn, split where it leaves the prompt's own rendering (so the
    reply's ids include its EOS and whatever the template writes after it)."""
    prompt_ids = render_prompts(tokenizer, [prompt])[0]
    whole = tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": reply}], tokenize=True, return_dict=True)["input_ids"]
    shared = 0
    while shared < min(len(prompt_ids), len(whole)) and prompt_ids[shared] == whole[shared]:
        shared += 1
    return prompt_ids[:shared], whole[shared:]


def turn_tail(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The tokens the chat template writes after an assistant reply's EOS (ChatML: a newline).
    Generation stops at EOS and never samples them; appended to a sampled reply that ended, they
    make it the sequence the template (and so every trainer) renders for that reply."""
    _, reply = render_reply(tokenizer, [{"role": "user", "content": "x"}], "y")
    eos = tokenizer.eos_token_id
    return reply[len(reply) - reply[::-1].index(eos):] if eos in reply else []


def as_rendered(generation: Generation, tail: Sequence[int]) -> list[int]:
    """A sampled reply's token ids as the chat template renders a finished turn (``tail`` from
    :func:`turn_tail` after the EOS); a reply cut at max_new_tokens stays as sampled."""
    return list(generation.token_ids) + (list(tail) if generation.ended else [])


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
    journal: Optional[Path] = None,
) -> list[list[Generation]]:
    """``num_samples`` responses per prompt; ``temperature == 0`` means greedy decoding.

    A stop request (SIGTERM, SIGUSR1) is honoured between batches: :class:`Preempted` is raised
    within one batch's time. With ``journal`` (a directory) every finished batch is written there
    with the random state after it, and a later call with the same arguments and journal takes
    those batches as they are and samples only the rest: the same samples as an uninterrupted
    call, bit for bit, because it continues the same random stream.
    """
    prompt_ids = render_prompts(tokenizer, prompts)
    flat = [ids for ids in prompt_ids for _ in range(num_samples)]
    # Sorting by length keeps left padding short; results are put back in order at the end.
    order = sorted(range(len(flat)), key=lambda i: len(flat[i]))
    texts: list[Generation | None] = [None] * len(flat)
    device = next(model.parameters()).device
    batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    saved_state = _rng_state(device)
    torch.manual_seed(seed)
    try:
        done = _replay(journal, texts, len(batches), device) if journal is not None else 0
        with eval_mode(model):
            for number, index in enumerate(batches[done:], start=done):
                if preemption.stop_requested():
                    kept = f"; {number} of {len(batches)} batches kept in {journal} for the rerun" if journal is not None else ""
                    raise preemption.Preempted(f"stopped while sampling on {preemption.signal_name()}{kept}; rerun the same command to resume")
                generated = _generate_batch(model, tokenizer, [flat[i] for i in index], temperature, max_new_tokens, device)
                for i, gen in zip(index, generated):
                    texts[i] = gen
                if journal is not None:
                    _record(journal, number, dict(zip(index, generated)), device)
    finally:
        _set_rng_state(saved_state, device)
    return [texts[i * num_samples : (i + 1) * num_samples] for i in range(len(prompts))]  # type: ignore[misc]


def _rng_state(device: torch.device) -> dict:
    state = {"cpu": torch.random.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.random.set_rng_state(state["cpu"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def _record(journal: Path, number: int, generated: dict[int, Generation], device: torch.device) -> None:
    """Batch ``number``'s samples and the random state after it, written whole or not at all."""
    journal.mkdir(parents=True, exist_ok=True)
    path = journal / f"batch-{number:06d}.pt"
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save({"samples": {i: (g.text, g.token_ids, g.ended) for i, g in generated.items()}, "rng": _rng_state(device)}, tmp)
    os.replace(tmp, path)


def _replay(journal: Path, texts: list, n_batches: int, device: torch.device) -> int:
    """Fill ``texts`` from the journal's consecutive finished batches; return how many there were."""
    done = 0
    while done < n_batches and (journal / f"batch-{done:06d}.pt").is_file():
        entry = torch.load(journal / f"batch-{done:06d}.pt", weights_only=False)
        for i, (text, token_ids, ended) in entry["samples"].items():
            texts[i] = Generation(text, tuple(token_ids), ended)
        _set_rng_state(entry["rng"], device)
        done += 1
    if done:
        log.info("resuming sampling: %d of %d batches taken from %s", done, n_batches, journal)
    return done


def _generate_batch(model, tokenizer, batch: list[list[int]], temperature: float, max_new_tokens: int, device) -> list[Generation]:
    results = []
    for tokens in generate_ids(model, tokenizer, batch, temperature=temperature, max_new_tokens=max_new_tokens, device=device):
        ended = bool(tokens) and tokens[-1] == tokenizer.eos_token_id
        text_tokens = tokens[:-1] if ended else tokens
        results.append(Generation(tokenizer.decode(text_tokens, skip_special_tokens=True), tuple(tokens), ended))
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
        # transformers turns synced_gpus on whenever ZeRO-3 is configured: an all-reduce per token
        # that would hang sampling done on rank 0 alone (on_rank_zero). The models sampled here
        # hold whole weights (loaded whole, or gathered for PPO's rollouts), so no rank waits on another.
        synced_gpus=False,
        **sampling,
    )
    return [cut_after_eos(row, tokenizer.eos_token_id) for row in out[:, width:].tolist()]


def cut_after_eos(ids: Sequence[int], eos: int) -> list[int]:
    """A sampled reply up to and including its first end-of-sequence token (all of it without one)."""
    ids = list(ids)
    return ids[: ids.index(eos) + 1] if eos in ids else ids
