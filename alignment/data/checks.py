"""Checks on converted rows (alignment/data/formats.py output) that run before any model loads.

Each check tokenizes every row with the stage's chat template and returns the rows to train on plus a
``CheckReport`` (rows read and kept, drops by reason, truncations, token-length percentiles) for
``result.json`` and the console. Degenerate rows are dropped and counted; if more than
``max_drop_share`` of the rows go, the check stops the run instead, because a silent 30% loss usually
means a wrong column or template rather than noisy data.

Over-length rows follow ``over_length``: "drop" (reason ``too_long``), "truncate" (kept unchanged and
counted: TRL truncates at tokenization, so here we only make sure some response survives, else reason
``prompt_too_long``) or "error". SFT rows also get their loss mask checked: a row with no response token
is dropped (``empty_response``); a template that marks every token is an error, since the loss would then
train on prompts.

    rows, report = check_preference_rows(rows, tokenizer=tok, max_seq_tokens=512, over_length="drop",
                                         max_drop_share=0.05, source="data/pairs.jsonl")
    print(report.format())
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional

from alignment.errors import DataError

OVER_LENGTH_POLICIES = ("drop", "truncate", "error")
GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")
_PERCENTILES = (50, 90, 99)

Row = dict[str, Any]
Messages = list[dict[str, str]]


class DataCheckError(DataError):
    """Rows that cannot be trained on: ``"<source>[, row <i>]: <problem>. <how to fix>"``.

    A DataError (so a ValueError), which the entry point prints without a traceback."""


@dataclass
class CheckReport:
    """What a check did, for result.json and for printing."""

    rows_read: int
    rows_kept: int
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> rows dropped for it
    truncated: int = 0  # rows kept that TRL will truncate to the length limit
    token_lengths: dict[str, float] = field(default_factory=dict)  # p50/p90/p99/max tokens per kept row

    def drop_share(self) -> float:
        return sum(self.dropped.values()) / self.rows_read if self.rows_read else 0.0

    def to_dict(self) -> dict:
        return asdict(self)

    def format(self) -> str:
        lines = [f"rows read    {self.rows_read}", f"rows kept    {self.rows_kept}",
                 f"dropped      {sum(self.dropped.values())} ({self.drop_share():.1%})"]
        lines += [f"  {reason:<26}{count}" for reason, count in sorted(self.dropped.items())]
        lines.append(f"truncated    {self.truncated}")
        if self.token_lengths:
            lines.append("tokens/row   " + "  ".join(f"{k} {v:g}" for k, v in self.token_lengths.items()))
        return "\n".join(lines)


def check_preference_rows(rows: list[Row], *, tokenizer, max_seq_tokens: int, over_length: str,
                          max_drop_share: float, source: str) -> tuple[list[Row], CheckReport]:
    """Drop degenerate pairs (reasons ``chosen_equals_rejected``, ``empty_chosen``, ``empty_rejected``,
    ``prompt_mismatch``, ``identical_after_truncation``) and apply ``over_length`` to pairs whose longer
    side, prompt included, exceeds ``max_seq_tokens``."""
    _check_policy(over_length)

    def check(row: Row, where: str) -> tuple[Optional[str], int, bool]:
        prompt, chosen, rejected = (_messages(row, key, where=where) for key in ("prompt", "chosen", "rejected"))
        if chosen == rejected:
            return "chosen_equals_rejected", 0, False
        for key, reply in (("chosen", chosen), ("rejected", rejected)):
            if not reply or reply[-1]["role"] != "assistant" or not reply[-1]["content"].strip():
                return f"empty_{key}", 0, False
        # DPO scores every completion token as the policy's own: a user or system turn inside chosen or
        # rejected would be scored as if the model wrote it, and differing ones mean two different prompts.
        if any(m["role"] != "assistant" for m in chosen + rejected):
            return "prompt_mismatch", 0, False
        chosen_ids, rejected_ids = _ids(tokenizer, prompt + chosen), _ids(tokenizer, prompt + rejected)
        length = max(len(chosen_ids), len(rejected_ids))
        truncated = length > max_seq_tokens
        if truncated:
            prompt_tokens = len(_ids(tokenizer, prompt, add_generation_prompt=True))
            reason = _over_length(over_length, where=where, length=length, max_seq_tokens=max_seq_tokens,
                                  response_survives=prompt_tokens < max_seq_tokens)
            if reason:
                return reason, length, False
        if chosen_ids[:max_seq_tokens] == rejected_ids[:max_seq_tokens]:
            return "identical_after_truncation", length, False
        return None, length, truncated

    return _run(rows, check, source=source, max_drop_share=max_drop_share)


def check_sft_rows(rows: list[Row], *, tokenizer, max_seq_tokens: int, over_length: str,
                   max_drop_share: float, source: str) -> tuple[list[Row], CheckReport]:
    """Drop rows with nothing to learn (``empty_response``), apply ``over_length`` to rows longer than
    ``max_seq_tokens``, and fail if the chat template puts the loss on every token of a row."""
    _check_policy(over_length)

    def check(row: Row, where: str) -> tuple[Optional[str], int, bool]:
        if row.get("text") is not None and row.get("messages") is None:
            # Plain text: every token is trained; a long document becomes windows, none dropped.
            return None, len(tokenizer(row["text"], add_special_tokens=False)["input_ids"]), False
        messages = _messages(row, "messages", where=where)
        if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
            return "empty_response", 0, False
        ids, mask = ids_and_mask(tokenizer, messages, where=where)
        if not any(mask):
            return "empty_response", len(ids), False
        if all(mask):
            raise DataCheckError(
                f"{where}: the chat template marks all {len(ids)} tokens as assistant tokens, so the SFT loss "
                "would train on the prompts too. Set model.chat_template to one whose {% generation %} block "
                "wraps only the assistant replies")
        truncated = len(ids) > max_seq_tokens
        if truncated:
            reason = _over_length(over_length, where=where, length=len(ids), max_seq_tokens=max_seq_tokens,
                                  response_survives=any(mask[:max_seq_tokens]))
            if reason:
                return reason, len(ids), False
        return None, len(ids), truncated

    return _run(rows, check, source=source, max_drop_share=max_drop_share)


def check_prompt_rows(rows: list[Row], *, tokenizer, max_prompt_tokens: int, over_length: str,
                      source: str) -> tuple[list[Row], CheckReport]:
    """Drop prompts whose last user turn is blank (``empty_prompt``) and apply ``over_length`` to prompts
    longer than ``max_prompt_tokens`` (generation prompt included). Any drop share is accepted: prompts
    are sampled from, not trained on row by row."""
    _check_policy(over_length)

    def check(row: Row, where: str) -> tuple[Optional[str], int, bool]:
        prompt = _messages(row, "prompt", where=where)
        if not prompt or prompt[-1]["role"] != "user" or not prompt[-1]["content"].strip():
            return "empty_prompt", 0, False
        length = len(_ids(tokenizer, prompt, add_generation_prompt=True))
        truncated = length > max_prompt_tokens
        if truncated:
            reason = _over_length(over_length, where=where, length=length, max_seq_tokens=max_prompt_tokens,
                                  response_survives=True, key="max_prompt_tokens")
            if reason:
                return reason, length, False
        return None, length, truncated

    return _run(rows, check, source=source, max_drop_share=1.0)


def assistant_token_mask(tokenizer, messages: Messages) -> list[int]:
    """1 for each token of ``messages``' rendering that the model should learn (assistant replies), else 0.

    Templates with ``{% generation %}`` say so themselves. For others the mask is the prefix difference:
    the tokens between "conversation so far + generation prompt" and "conversation including the reply",
    valid only when each such rendering is a token prefix of the whole conversation."""
    return ids_and_mask(tokenizer, messages, where="assistant_token_mask")[1]


def percentiles(lengths: list[int]) -> dict[str, float]:
    """Nearest-rank p50/p90/p99 and max: the smallest value with at least p% of values at or below it."""
    if not lengths:
        return {}
    ordered = sorted(lengths)
    out = {f"p{p}": float(ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]) for p in _PERCENTILES}
    out["max"] = float(ordered[-1])
    return out


def _run(rows: list[Row], check: Callable[[Row, str], tuple[Optional[str], int, bool]], *, source: str,
         max_drop_share: float) -> tuple[list[Row], CheckReport]:
    """Apply ``check`` (-> drop reason or None, tokens, truncated) to each row and enforce the drop share."""
    kept, lengths, dropped, first_row = [], [], Counter(), {}
    truncated = 0
    for index, row in enumerate(rows):
        reason, length, was_truncated = check(row, f"{source}, row {index}")
        if reason:
            dropped[reason] += 1
            first_row.setdefault(reason, index)
            continue
        kept.append(row)
        lengths.append(length)
        truncated += was_truncated
    report = CheckReport(rows_read=len(rows), rows_kept=len(kept), dropped=dict(dropped), truncated=truncated,
                         token_lengths=percentiles(lengths))
    reasons = ", ".join(f"{r}={n} (first at row {first_row[r]})" for r, n in sorted(dropped.items()))
    if report.drop_share() > max_drop_share:
        raise DataCheckError(
            f"{source}: dropped {sum(dropped.values())} of {len(rows)} rows ({report.drop_share():.1%}), more than "
            f"data.max_drop_share={max_drop_share:g}: {reasons}. Clean the data (or fix the format/columns or the "
            "length limit behind it), or raise data.max_drop_share")
    if not kept:
        raise DataCheckError(f"{source}: no rows left to train on (read {len(rows)}; dropped: {reasons or 'none'}). "
                             "Point data.path at a file with usable rows")
    return kept, report


def _over_length(policy: str, *, where: str, length: int, max_seq_tokens: int, response_survives: bool,
                 key: str = "max_seq_tokens") -> Optional[str]:
    """Drop reason for a row over the limit, or None to keep it for truncation; raises under "error"."""
    if policy == "error":
        raise DataCheckError(
            f"{where}: {length} tokens, more than {key}={max_seq_tokens}. Raise {key}, or set over_length to "
            "'drop' or 'truncate'")
    if policy == "drop":
        return "too_long"
    return None if response_survives else "prompt_too_long"


def ids_and_mask(tokenizer, messages: Messages, *, where: str) -> tuple[list[int], list[int]]:
    template = tokenizer.chat_template or ""
    if GENERATION_TAG.search(template):
        out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
        return list(out["input_ids"]), list(out["assistant_masks"])
    ids = _ids(tokenizer, messages)
    mask = [0] * len(ids)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = _ids(tokenizer, messages[:i], add_generation_prompt=True)
        end = _ids(tokenizer, messages[: i + 1])
        if ids[: len(start)] != start or ids[: len(end)] != end or len(start) > len(end):
            raise DataCheckError(
                f"{where}: the chat template does not mark assistant turns with {{% generation %}}, and the mask "
                f"cannot be derived from prefixes (the rendering up to assistant turn {i} is not a token prefix "
                "of the whole conversation). Set model.chat_template to a template that wraps assistant "
                "replies in {% generation %} ... {% endgeneration %}")
        mask[len(start): len(end)] = [1] * (len(end) - len(start))
    return ids, mask


def _ids(tokenizer, messages: Messages, *, add_generation_prompt: bool = False) -> list[int]:
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                        add_generation_prompt=add_generation_prompt)
    return list(out["input_ids"])


def _messages(row: Row, key: str, *, where: str) -> Messages:
    value = row.get(key) if isinstance(row, dict) else None
    if not isinstance(value, list) or not all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                              and isinstance(m.get("content"), str) for m in value):
        raise DataCheckError(f"{where}: key {key!r} must be a list of {{role, content}} messages. Convert the rows "
                             "with alignment.data.formats.convert_rows first")
    return value


def _check_policy(over_length: str) -> None:
    if over_length not in OVER_LENGTH_POLICIES:
        raise ValueError(f"over_length={over_length!r}: use one of {OVER_LENGTH_POLICIES}")
