"""Plain text: rows without a prompt, for language-modelling loss and perplexity.

Fine-tuning on instructions erodes what pre-training taught (InstructGPT's "alignment tax"). Two
counters use plain text: mixing it into SFT with a loss on every token, and PPO's pre-training
term (``ppo.ptx_coef``). ``eval.lm_text`` measures the erosion as perplexity per token.

A plain-text source is a ``.txt`` file (documents separated by blank lines) or ``.json``/``.jsonl``
rows with a ``text`` field (TRL's language-modelling format). A document longer than the window
is cut into consecutive windows, every token of it kept; nothing is dropped.

In an SFT mixture, ``path: suite`` stands for the built-in task suite's demonstrations, so plain
text can be mixed with them:

    sft.data_sources='[{path: suite, weight: 0.9}, {path: notes.txt, weight: 0.1}]'
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from alignment.data.checks import ids_and_mask
from alignment.errors import DataError

SUITE_SOURCE = "suite"  # a mixture member that is the task suite's SFT demonstrations
TEXT_FORMAT = "text"
_CONVERSATIONAL = ("messages", "prompt", "completion", "conversations", "instruction", "chosen", "rejected")


def is_text_source(path: str, *, fmt: Optional[str], first_row: Optional[dict[str, Any]] = None) -> bool:
    """A ``.txt`` file, ``format: text``, or rows whose first has ``text`` and no conversational key."""
    if Path(path).suffix.lower() == ".txt" or fmt == TEXT_FORMAT:
        return True
    return fmt is None and first_row is not None and "text" in first_row and not any(k in first_row for k in _CONVERSATIONAL)


def txt_documents(path: str) -> list[str]:
    """The documents of a ``.txt`` file, in order: blocks separated by blank lines."""
    local = Path(path).expanduser()
    if not local.is_file():
        raise DataError(f"plain-text file {local} does not exist (or is a directory): point at a .txt, .json or .jsonl file")
    try:
        text = local.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataError(f"plain-text file {local}: byte {err.start} is not UTF-8; save the file as UTF-8") from None
    documents = [block.strip() for block in text.replace("\r\n", "\n").split("\n\n")]
    documents = [d for d in documents if d]
    if not documents:
        raise DataError(f"plain-text file {local} holds no text")
    return documents


def text_documents(rows: list[dict[str, Any]], *, source: str) -> list[str]:
    """The ``text`` field of every row; a row without one (or with an empty one) is an error naming it."""
    documents = []
    for index, row in enumerate(rows):
        value = row.get("text")
        if not isinstance(value, str) or not value.strip():
            got = "no 'text' field" if "text" not in row else f"'text' is {type(value).__name__} {str(value)[:40]!r}"
            raise DataError(f"{source}, row {index}: a plain-text row needs a non-empty string 'text' field ({got}); "
                            f"fix the row, or give the source its format if it is not plain text")
        documents.append(value)
    return documents


def token_windows(document: str, tokenizer, *, max_tokens: int) -> list[list[int]]:
    """The document's tokens (EOS appended, as pre-training sees a document end) in consecutive
    windows of at most ``max_tokens``; a last window of one token is merged away (nothing to predict)."""
    ids = tokenizer(document, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        ids = ids + [tokenizer.eos_token_id]
    windows = [ids[start : start + max_tokens] for start in range(0, len(ids), max_tokens)]
    return [w for w in windows if len(w) >= 2]


def lm_rows(documents: list[str], tokenizer, *, max_tokens: int) -> list[dict[str, list[int]]]:
    """Training rows for plain text: ``input_ids`` and ``labels`` equal (the loss covers every token)."""
    return [{"input_ids": w, "labels": list(w)} for d in documents for w in token_windows(d, tokenizer, max_tokens=max_tokens)]


def tokenized_sft_rows(rows, tokenizer, *, max_seq_tokens: int, responses_only: bool = True) -> tuple[list[dict[str, list[int]]], dict[str, Any]]:
    """Conversations and plain text as one tokenized training set: a conversation's ``labels``
    are its assistant tokens (the rest -100: SFT trains responses only, unless not
    ``responses_only``), a plain-text window's
    are all its tokens. Conversations longer than ``max_seq_tokens`` keep their start (the data
    checks already dropped those whose response would not survive). Returns the rows and the
    realised plain-text share, in rows and in trained tokens."""
    out, text_windows, text_tokens, chat_tokens = [], 0, 0, 0
    for row in rows:
        if row.get("messages") is None:
            windows = lm_rows([row["text"]], tokenizer, max_tokens=max_seq_tokens)
            out.extend(windows)
            text_windows += len(windows)
            text_tokens += sum(len(w["labels"]) - 1 for w in windows)  # the first token of a window is not predicted
            continue
        ids, mask = ids_and_mask(tokenizer, row["messages"], where="sft row")
        ids, mask = ids[:max_seq_tokens], mask[:max_seq_tokens]
        out.append({"input_ids": ids, "labels": [t if m or not responses_only else -100 for t, m in zip(ids, mask)]})
        chat_tokens += sum(mask)
    counts = {"plain_text_windows": text_windows, "plain_text_share_rows": text_windows / max(1, len(out)),
              "plain_text_share_trained_tokens": text_tokens / max(1, text_tokens + chat_tokens)}
    return out, counts
