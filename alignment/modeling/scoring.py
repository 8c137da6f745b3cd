"""Scoring (prompt, response) sequences: per-token log-probs, values, and reward-model scores.

Shared by PPO's rollouts, evaluation (KL, implicit rewards) and reward labelling. Everything is
scored on token ids: a sampled reply on exactly the ids that were sampled (never decoded and
encoded again, which with BPE gives other tokens), a text reply on the chat template's rendering
that TRL's trainers use (``render_replies``). ``pack`` lays prompts and replies out right-padded
as ``[prompt | reply | pad]`` rows and records where each reply starts, so that every per-token
quantity (log-probs, values) can be gathered into ``[batch, reply_len]`` tensors aligned with
``mask``. The logits at position t predict token t + 1, so the reply token j of row i is
predicted at position ``prompt_len_i - 1 + j``.

A reward model's score is read where the sequence-classification head pools it in training:
at the last token that is not the pad token (transformers' rule, which TRL's RewardTrainer
uses). With pad == EOS that is the token before EOS, or, for a ChatML reply, the newline the
template writes after it; sampled replies that ended get that same template tail
(generation.as_rendered) before they are scored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from alignment.modeling.generation import Messages, eval_mode, render_reply


@dataclass
class Packed:
    input_ids: torch.Tensor  # [batch, width]
    attention_mask: torch.Tensor  # [batch, width]
    positions: torch.Tensor  # [batch, response_len]: where each response token is predicted
    response_ids: torch.Tensor  # [batch, response_len], padded with 0
    mask: torch.Tensor  # [batch, response_len], 1 on real response tokens

    def to(self, device) -> "Packed":
        return Packed(*(getattr(self, f).to(device) for f in _FIELDS))


_FIELDS = ("input_ids", "attention_mask", "positions", "response_ids", "mask")


def pack(prompts: list[list[int]], responses: list[list[int]], *, pad_token_id: int) -> Packed:
    seqs = [p + r for p, r in zip(prompts, responses)]
    width = max(len(s) for s in seqs)
    resp_len = max(1, max(len(r) for r in responses))
    input_ids = torch.tensor([s + [pad_token_id] * (width - len(s)) for s in seqs])
    attention_mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
    positions = torch.tensor([[min(len(p) - 1 + j, width - 1) for j in range(resp_len)] for p in prompts])
    response_ids = torch.tensor([r + [0] * (resp_len - len(r)) for r in responses])
    mask = torch.tensor([[1.0] * len(r) + [0.0] * (resp_len - len(r)) for r in responses])
    return Packed(input_ids, attention_mask, positions, response_ids, mask)


def select(packed: Packed, index: torch.Tensor) -> Packed:
    """Rows ``index`` of a packed batch (a PPO mini-batch)."""
    return Packed(*(getattr(packed, f)[index] for f in _FIELDS))


def policy_forward(model: PreTrainedModel, packed: Packed, *, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-response-token log-probs ``[batch, len]`` and logits ``[batch, len, vocab]``.

    Logits are divided by the sampling temperature, so the log-probs are those of the
    distribution the responses were sampled from (as TRL does).
    """
    logits = model(input_ids=packed.input_ids, attention_mask=packed.attention_mask).logits
    index = packed.positions.unsqueeze(-1).expand(-1, -1, logits.size(-1))
    logits = torch.gather(logits, 1, index).float() / temperature
    logprobs = torch.log_softmax(logits, dim=-1).gather(-1, packed.response_ids.unsqueeze(-1)).squeeze(-1)
    return logprobs, logits


def _backbone_hidden(model: PreTrainedModel, packed: Packed) -> torch.Tensor:
    backbone = getattr(model, model.base_model_prefix)
    return backbone(input_ids=packed.input_ids, attention_mask=packed.attention_mask).last_hidden_state


def token_values(value_model: PreTrainedModel, packed: Packed) -> torch.Tensor:
    """V(s_t) for each reply token: the scalar head applied at every position ``[batch, len]``."""
    scores = value_model.score(_backbone_hidden(value_model, packed)).squeeze(-1).float()
    return torch.gather(scores, 1, packed.positions)


def sequence_scores(reward_model: PreTrainedModel, packed: Packed) -> torch.Tensor:
    """The reward model's score of each sequence ``[batch]``, pooled by the model's own head as in
    training: at the last token that is not ``config.pad_token_id``."""
    return reward_model(input_ids=packed.input_ids, attention_mask=packed.attention_mask).logits[:, 0].float()


def render_replies(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[Messages], replies: Sequence[str]) -> tuple[list[list[int]], list[list[int]]]:
    """Prompt and reply token ids of text replies as the trainers render them (chat template)."""
    pairs = [render_reply(tokenizer, prompt, reply) for prompt, reply in zip(prompts, replies)]
    return [p for p, _ in pairs], [r for _, r in pairs]


def response_logps(model: PreTrainedModel, prompt_ids: Sequence[list[int]], reply_ids: Sequence[list[int]], *, pad_token_id: int,
                   batch_size: int) -> torch.Tensor:
    """Sum of the log-probabilities of each reply's tokens given its prompt ``[batch]``."""
    device = next(model.parameters()).device
    totals = []
    with eval_mode(model):
        for start in range(0, len(prompt_ids), batch_size):
            packed = pack(list(prompt_ids[start : start + batch_size]), list(reply_ids[start : start + batch_size]),
                          pad_token_id=pad_token_id).to(device)
            logprobs, _ = policy_forward(model, packed, temperature=1.0)
            totals.append((logprobs * packed.mask).sum(-1).cpu())
    return torch.cat(totals) if totals else torch.zeros(0)


def score_responses(model: PreTrainedModel, prompt_ids: Sequence[list[int]], reply_ids: Sequence[list[int]], *, pad_token_id: int,
                    batch_size: int) -> torch.Tensor:
    """A reward model's score of each (prompt, reply) ``[batch]`` (see :func:`sequence_scores`)."""
    device = next(model.parameters()).device
    scores = []
    with eval_mode(model):
        for start in range(0, len(prompt_ids), batch_size):
            packed = pack(list(prompt_ids[start : start + batch_size]), list(reply_ids[start : start + batch_size]),
                          pad_token_id=pad_token_id).to(device)
            scores.append(sequence_scores(model, packed).cpu())
    return torch.cat(scores) if scores else torch.zeros(0)


def plain_text_nll(logprobs_of: Callable[[Packed], torch.Tensor], windows: Sequence[list[int]], *, pad_token_id: int,
                   device: torch.device) -> torch.Tensor:
    """Mean negative log-likelihood per token of plain-text windows (each window's first token is
    context), the language-modelling loss of PPO-ptx. ``logprobs_of`` maps a packed batch to its
    per-token log-probs at temperature 1 (the policy itself, or PPO's engine, which gathers
    ZeRO-3 weights as for the PPO loss)."""
    packed = pack([w[:1] for w in windows], [w[1:] for w in windows], pad_token_id=pad_token_id).to(device)
    return -(logprobs_of(packed) * packed.mask).sum() / packed.mask.sum()
