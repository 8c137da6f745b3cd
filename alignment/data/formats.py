"""Detect and convert the dataset formats users bring, row by row, into TRL's conversational forms.

Output, with messages ``{"role": "system"|"user"|"assistant", "content": str}``: ``kind="sft"`` gives
``{"messages": [...]}`` ending with an assistant turn; ``kind="preference"`` gives ``{"prompt", "chosen",
"rejected"}`` message lists (prompt ends with a user turn, chosen/rejected start and end with an assistant
turn; ``score_chosen``/``score_rejected`` kept when present); ``kind="prompt"`` gives ``{"prompt": [...]}``
ending with a user turn (PPO rollouts, held-out prompts).

Formats, by the name ``format=`` takes, each with a one-line example row:

SFT (``SFT_FORMATS``)
  messages            {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
  prompt_completion   {"prompt": "Hi", "completion": "Hello"}   (either side may be a message list)
  alpaca              {"instruction": "Translate", "input": "chat", "output": "cat", "system": "Be brief"}
  sharegpt            {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}
  preference          any preference row below; trains on prompt + chosen
  columns             {"question": "Hi", "answer": "Hello"} with columns={"prompt": "question", "completion": "answer"}
Preference (``PREFERENCE_FORMATS``)
  explicit            {"prompt": "Hi", "chosen": "Hello", "rejected": "Go away"}   (strings or message lists)
  implicit            {"chosen": [user "Hi", assistant "Hello"], "rejected": [user "Hi", assistant "Go away"]}
  hh_rlhf             {"chosen": "\\n\\nHuman: Hi\\n\\nAssistant: Hello", "rejected": "...Assistant: No"}
  ultrafeedback       {"prompt": "Hi", "chosen": [user "Hi", assistant "Hello"], "rejected": [...], "score_chosen": 8.0}
  sharegpt_preference {"conversations": [{"from": "human", "value": "Hi"}], "chosen": {"from": "gpt", "value": "Hello"},
                       "rejected": {"from": "gpt", "value": "Go away"}}
  columns             as for SFT, e.g. columns={"prompt": "q", "chosen": "good", "rejected": "bad"}
Prompt (``PROMPT_FORMATS``)
  prompt              {"prompt": "Hi"} or {"prompt": [...messages]}   (a completion beside it is ignored)
  messages, sharegpt  as for SFT, with a final assistant turn dropped
  alpaca              {"instruction": "Translate", "input": "chat"}   (an output is ignored)
  preference, columns as above; a preference row gives its prompt

Usage::

    rows, counts = convert_rows(json.load(open(path)), kind="preference", source=path)
    # counts == {"rows": 300, "format:sharegpt_preference": 300}

``None`` values count as absent keys (``datasets.load_dataset`` fills a row's missing columns with None).
Errors read ``"<source>, row <i>: <problem>. <how to fix>"``. Empty strings are kept: dropping degenerate
pairs is a later step.
"""

from __future__ import annotations

import re
from typing import Any, Optional

Message = dict[str, str]
Row = dict[str, Any]

KINDS = ("sft", "preference", "prompt")
SFT_FORMATS = ("messages", "prompt_completion", "alpaca", "sharegpt", "preference", "columns")
PREFERENCE_FORMATS = ("explicit", "implicit", "hh_rlhf", "ultrafeedback", "sharegpt_preference", "columns")
PROMPT_FORMATS = ("prompt", "messages", "sharegpt", "alpaca", "preference", "columns")
_FORMATS = {"sft": SFT_FORMATS, "preference": PREFERENCE_FORMATS, "prompt": PROMPT_FORMATS}

# What each format needs, quoted when no format fits a row.
_NEEDS = {
    "messages": "messages", "prompt_completion": "prompt+completion", "alpaca": "instruction[+input]+output",
    "sharegpt": "conversations", "preference": "a preference row", "columns": "columns={...} naming your keys",
    "explicit": "prompt+chosen+rejected", "implicit": "chosen+rejected message lists",
    "hh_rlhf": "chosen+rejected '\\n\\nHuman: ...' strings", "ultrafeedback": "prompt+chosen+rejected, prompt in both",
    "sharegpt_preference": "conversations+chosen+rejected", "prompt": "prompt",
}
_ROLES = ("system", "user", "assistant")
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
_HH_START = re.compile(r"(?:\n\n)?Human:")
_HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant): ?")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}
_SCORES = ("score_chosen", "score_rejected")
# Keys that pick a format, in the order tried (preference rows are tried before these).
_SFT_KEYS = {"sharegpt": ["conversations"], "alpaca": ["instruction", "output"],
             "prompt_completion": ["prompt", "completion"]}
_PROMPT_KEYS = {"prompt": ["prompt"], "messages": ["messages"], "sharegpt": ["conversations"],
                "alpaca": ["instruction"]}
_TARGETS = ("messages", "prompt", "completion", "instruction", "input", "output", "system", "conversations", "chosen",
            "rejected") + _SCORES
_FIX_ROW = "Fix the row"


class FormatError(ValueError):
    """A row no format fits, or one that breaks its format: ``"<source>, row <i>: <problem>. <how to fix>"``."""


def detect_format(row: Row, *, kind: str, source: str = "<data>", index: int = 0) -> str:
    """Name of the ``kind`` format ``row`` is in (never "columns": that needs a mapping); raises FormatError
    listing the row's keys and the formats accepted for ``kind``."""
    where = f"{source}, row {index}"
    _formats_for(kind, where=where)
    row = _present(row, where=where)
    found = _detect_pair(row) if kind == "preference" else _detect(row, kind)
    if found is None:
        raise _no_format(row, kind=kind, where=where)
    return found


def convert_row(row: Row, *, kind: str, format: Optional[str] = None, columns: Optional[dict[str, str]] = None,
                source: str = "<data>", index: int = 0) -> Row:
    """One row in TRL's conversational form for ``kind`` ("sft", "preference" or "prompt").

    ``format=None`` detects it. ``columns={"prompt": "question", ...}`` (format key: your column) renames the
    row's columns first, then uses ``format`` or detects on the renamed row.
    """
    where = f"{source}, row {index}"
    formats = _formats_for(kind, where=where)
    if format is not None and format not in formats:
        raise _fail(where, f"unknown {kind} format {format!r}", f"Use one of {formats}, or None to detect it")
    if columns is not None:
        row = _rename(row, columns=columns, where=where)
    elif format == "columns":
        raise _fail(where, "format 'columns' needs a mapping", "Pass columns={'prompt': '<your column>', ...}")
    row = _present(row, where=where)
    if format in (None, "columns"):
        format = detect_format(row, kind=kind, source=source, index=index)
    if kind == "sft":
        return {"messages": _sft_messages(row, fmt=format, where=where)}
    if kind == "preference":
        return _pair(row, fmt=format, where=where)
    return {"prompt": _prompt_messages(row, fmt=format, where=where)}


def convert_rows(rows: list[Row], *, kind: str, format: Optional[str] = None,
                 columns: Optional[dict[str, str]] = None, source: str = "<data>") -> tuple[list[Row], dict[str, int]]:
    """Convert every row, detecting the format once from the first row unless ``format`` is given.

    Returns the rows and counts ``{"rows": n, "format:<name>": n}``. A row that does not fit the
    chosen format raises FormatError naming its index and key.
    """
    if not rows:
        return [], {"rows": 0}
    dropped = {}
    if kind == "sft" and isinstance(rows[0].get("label"), bool):
        # Unpaired preference (KTO-style messages + label): only desirable examples are
        # demonstrations; the others are dropped and counted, never trained on.
        kept = [row for row in rows if row.get("label") is True]
        dropped = {"dropped:unpaired_undesirable": len(rows) - len(kept)}
        rows = kept
        if not rows:
            raise FormatError(f"{source}: every row has label false (unpaired preference); there is nothing to imitate")
    name = format or ("columns" if columns is not None else None)
    if format is None or (format == "columns" and columns is not None):
        first = _rename(rows[0], columns=columns, where=f"{source}, row 0") if columns is not None else rows[0]
        format = detect_format(first, kind=kind, source=source, index=0)
    out = [convert_row(row, kind=kind, format=format, columns=columns, source=source, index=i)
           for i, row in enumerate(rows)]
    return out, {"rows": len(out), f"format:{name or format}": len(out), **dropped}


def _detect(row: Row, kind: str) -> Optional[str]:
    if kind == "sft" and "messages" in row:
        return "messages"  # wins over chosen/rejected: such a row is an SFT row carrying extra columns
    if _detect_pair(row):
        return "preference"
    for name, keys in (_SFT_KEYS if kind == "sft" else _PROMPT_KEYS).items():
        if all(key in row for key in keys):
            return name
    return None


def _detect_pair(row: Row) -> Optional[str]:
    if "chosen" not in row or "rejected" not in row:
        return None
    if "conversations" in row:
        return "sharegpt_preference"
    chosen = row["chosen"]
    if "prompt" in row:
        # UltraFeedback repeats the prompt inside chosen/rejected; explicit rows hold only the reply.
        first = chosen[0] if isinstance(chosen, list) and chosen else None
        return "ultrafeedback" if isinstance(first, dict) and first.get("role") in ("system", "user") else "explicit"
    if isinstance(chosen, list):
        return "implicit"
    return "hh_rlhf" if isinstance(chosen, str) and _HH_START.match(chosen) else None


def _no_format(row: Row, *, kind: str, where: str) -> FormatError:
    if kind == "preference" and isinstance(row.get("label"), bool):
        return _fail(where, "this is an unpaired preference row (a conversation with a true/false label): it holds no "
                     "chosen/rejected pair", "Use such data for SFT (rows labelled true are kept) or pair a good and a bad "
                     "answer to the same prompt into prompt/chosen/rejected rows")
    accepted = ", ".join(f"{name} ({_NEEDS[name]})" for name in _FORMATS[kind])
    return _fail(where, f"no {kind} format fits a row with keys {sorted(row)}",
                 f"Accepted: {accepted}. Rename your columns or pass columns={{'<format key>': '<your column>'}}")


def _sft_messages(row: Row, *, fmt: str, where: str) -> list[Message]:
    if fmt in ("messages", "sharegpt"):
        messages = _conversation(row, fmt=fmt, where=where)
    elif fmt == "prompt_completion":
        messages = _messages(_need(row, "prompt", fmt=fmt, where=where), key="prompt", where=where, role="user")
        completion = _need(row, "completion", fmt=fmt, where=where)
        messages += _messages(completion, key="completion", where=where, role="assistant")
    elif fmt == "alpaca":
        output = _need(row, "output", fmt=fmt, where=where, text=True)
        messages = _alpaca_prompt(row, where=where) + [{"role": "assistant", "content": output}]
    else:
        pair = _pair(row, fmt=fmt, where=where)
        messages = pair["prompt"] + pair["chosen"]
    if not messages or messages[-1]["role"] != "assistant":
        raise _fail(where, f"the {fmt} conversation does not end with an assistant turn, so there is nothing to "
                    "train on", "Add the reply, or load the file with kind='prompt'")
    return messages


def _prompt_messages(row: Row, *, fmt: str, where: str) -> list[Message]:
    if fmt == "prompt":
        messages = _messages(_need(row, "prompt", fmt=fmt, where=where), key="prompt", where=where, role="user")
    elif fmt in ("messages", "sharegpt"):
        messages = _conversation(row, fmt=fmt, where=where)
        if messages and messages[-1]["role"] == "assistant":
            messages = messages[:-1]  # the reference reply: the policy writes its own
    elif fmt == "alpaca":
        messages = _alpaca_prompt(row, where=where)
    else:
        messages = _pair(row, fmt=fmt, where=where)["prompt"]
    if not messages or messages[-1]["role"] != "user":
        raise _fail(where, f"the {fmt} prompt does not end with a user turn", "End each prompt with the user's message")
    return messages


def _pair(row: Row, *, fmt: str, where: str) -> Row:
    chosen, rejected = (_need(row, key, fmt=fmt, where=where) for key in ("chosen", "rejected"))
    if fmt == "preference":  # a pair used for SFT or prompts: which kind of pair, row by row
        found = _detect_pair(row)
        if found is None:
            raise _no_format(row, kind="preference", where=where)
        fmt = found
    if fmt == "explicit":
        prompt = _messages(_need(row, "prompt", fmt=fmt, where=where), key="prompt", where=where, role="user")
        chosen = _messages(chosen, key="chosen", where=where, role="assistant")
        rejected = _messages(rejected, key="rejected", where=where, role="assistant")
    elif fmt in ("implicit", "ultrafeedback"):
        prompt, chosen, rejected = _split_shared(_messages(chosen, key="chosen", where=where),
                                                 _messages(rejected, key="rejected", where=where), where=where)
        if fmt == "ultrafeedback":
            _check_prompt_matches(_need(row, "prompt", fmt=fmt, where=where), prompt, where=where)
    elif fmt == "hh_rlhf":
        prompt, chosen, rejected = _split_shared(_hh_turns(chosen, key="chosen", where=where),
                                                 _hh_turns(rejected, key="rejected", where=where), where=where)
    else:  # sharegpt_preference
        prompt = _sharegpt_conversation(row, where=where)
        chosen = [_sharegpt_turn(chosen, key="chosen", where=where)]
        rejected = [_sharegpt_turn(rejected, key="rejected", where=where)]
    if not prompt or prompt[-1]["role"] != "user":
        raise _fail(where, f"the {fmt} prompt does not end with a user turn", "End the prompt with the user's message")
    for key, reply in (("chosen", chosen), ("rejected", rejected)):
        if not reply or reply[0]["role"] != "assistant" or reply[-1]["role"] != "assistant":
            roles = [m["role"] for m in reply]
            raise _fail(where, f"key {key!r} must start and end with an assistant turn after the prompt, has {roles}",
                        "Fix the conversation")
    out: Row = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    for key in _SCORES:
        if key in row:
            if isinstance(row[key], bool) or not isinstance(row[key], (int, float)):
                raise _fail(where, f"key {key!r} must be a number, got {type(row[key]).__name__}", _FIX_ROW)
            out[key] = row[key]
    return out


def _split_shared(chosen: list[Message], rejected: list[Message], *, where: str) -> tuple[list[Message], ...]:
    shared = 0
    for c, r in zip(chosen, rejected):
        if c != r:
            break
        shared += 1
    # The prompt ends at the last shared user turn, so both completions start with the model's reply
    # (and an identical pair keeps its reply rather than turning into two empty completions).
    cut = max((i + 1 for i in range(shared) if chosen[i]["role"] == "user"), default=0)
    if cut == 0:
        raise _fail(where, "'chosen' and 'rejected' share no opening user turn, so there is no common prompt",
                    "Start both with the same prompt turns, or give the prompt in a 'prompt' key")
    return chosen[:cut], chosen[cut:], rejected[cut:]


def _check_prompt_matches(given: Any, prompt: list[Message], *, where: str) -> None:
    # Dropping 'prompt' unchecked could lose content the chosen/rejected turns do not repeat.
    expected = [prompt[-1]] if isinstance(given, str) else prompt  # a string prompt is the last user turn
    if _messages(given, key="prompt", where=where, role="user") != expected:
        raise _fail(where, "key 'prompt' differs from the prompt turns that open 'chosen' and 'rejected'",
                    "Make them agree, drop 'prompt' (implicit format), or keep only replies in chosen/rejected")


def _conversation(row: Row, *, fmt: str, where: str) -> list[Message]:
    if fmt == "messages":
        return _messages(_need(row, "messages", fmt=fmt, where=where), key="messages", where=where)
    return _sharegpt_conversation(row, where=where)


def _alpaca_prompt(row: Row, *, where: str) -> list[Message]:
    instruction = _need(row, "instruction", fmt="alpaca", where=where, text=True)
    extra = _need(row, "input", fmt="alpaca", where=where, text=True) if "input" in row else ""
    user = f"{instruction}\n\n{extra}" if extra else instruction
    return _system(row, where=where) + [{"role": "user", "content": user}]


def _sharegpt_conversation(row: Row, *, where: str) -> list[Message]:
    turns = _need(row, "conversations", fmt="sharegpt", where=where)
    if not isinstance(turns, list):
        raise _fail(where, f"key 'conversations' must be a list of {{from, value}} turns, got {type(turns).__name__}",
                    _FIX_ROW)
    return _system(row, where=where) + [
        _sharegpt_turn(turn, key=f"conversations[{i}]", where=where) for i, turn in enumerate(turns)
    ]


def _sharegpt_turn(turn: Any, *, key: str, where: str) -> Message:
    if isinstance(turn, list) and len(turn) == 1:
        turn = turn[0]  # some exports wrap the single chosen/rejected turn in a list
    if not isinstance(turn, dict):
        raise _fail(where, f"key {key!r} must be a {{from, value}} turn, got {type(turn).__name__}", _FIX_ROW)
    for field in ("from", "value"):
        if not isinstance(turn.get(field), str):
            raise _fail(where, f"key {key!r} has no string {field!r}", "Give every turn string 'from' and 'value'")
    role = _SHAREGPT_ROLES.get(turn["from"])
    if role is None:
        raise _fail(where, f"key {key!r} has unknown ShareGPT role {turn['from']!r}",
                    f"Use one of {sorted(_SHAREGPT_ROLES)}")
    return {"role": role, "content": turn["value"]}


def _hh_turns(text: Any, *, key: str, where: str) -> list[Message]:
    if not isinstance(text, str):
        raise _fail(where, f"key {key!r} must be an HH-RLHF string, got {type(text).__name__}", _FIX_ROW)
    parts = _HH_TURN.split(text)
    if parts[0] or len(parts) < 3:
        raise _fail(where, f"key {key!r} has text before its first '\\n\\nHuman:' turn ({parts[0][:40]!r})",
                    "Start the string with '\\n\\nHuman: '")
    return [{"role": _HH_ROLES[who], "content": content} for who, content in zip(parts[1::2], parts[2::2])]


def _messages(value: Any, *, key: str, where: str, role: Optional[str] = None) -> list[Message]:
    """A list of {role, content} messages; a plain string becomes one ``role`` message where ``role`` is given."""
    if isinstance(value, str) and role is not None:
        return [{"role": role, "content": value}]
    if not isinstance(value, list):
        shape = "a string or a list" if role is not None else "a list"
        raise _fail(where, f"key {key!r} must be {shape} of {{role, content}} messages, got {type(value).__name__}",
                    _FIX_ROW)
    return [_message(item, key=f"{key}[{i}]", where=where) for i, item in enumerate(value)]


def _message(item: Any, *, key: str, where: str) -> Message:
    if not isinstance(item, dict):
        raise _fail(where, f"key {key!r} must be a {{role, content}} message, got {type(item).__name__}", _FIX_ROW)
    for field in ("role", "content"):
        if not isinstance(item.get(field), str):
            raise _fail(where, f"key {key!r} has no string {field!r}", "Give every message string 'role' and 'content'")
    if item["role"] not in _ROLES:
        raise _fail(where, f"key {key!r} has unknown role {item['role']!r}", f"Use one of {list(_ROLES)}")
    return {"role": item["role"], "content": item["content"]}


def _system(row: Row, *, where: str) -> list[Message]:
    system = _need(row, "system", fmt="system", where=where, text=True) if "system" in row else ""
    return [{"role": "system", "content": system}] if system else []  # an empty system column adds nothing


def _need(row: Row, key: str, *, fmt: str, where: str, text: bool = False) -> Any:
    """``row[key]``, which must be present (and a string where ``text``)."""
    if key not in row:
        raise _fail(where, f"key {key!r} is missing (format {fmt!r} needs it; the row has keys {sorted(row)})",
                    "Add it, or pass format=/columns= matching this row")
    if text and not isinstance(row[key], str):
        raise _fail(where, f"key {key!r} must be a string, got {type(row[key]).__name__}", _FIX_ROW)
    return row[key]


def _present(row: Any, *, where: str) -> Row:
    if not isinstance(row, dict):
        raise _fail(where, f"a row must be a dict of columns, got {type(row).__name__}", "Fix the file")
    # load_dataset unifies the columns of all rows, filling a row's missing keys with None.
    return {k: v for k, v in row.items() if v is not None}


def _rename(row: Any, *, columns: dict[str, str], where: str) -> Row:
    if not isinstance(row, dict):
        return _present(row, where=where)  # raises the not-a-dict error
    unknown = sorted(set(columns) - set(_TARGETS))
    if unknown:
        raise _fail(where, f"columns= maps onto unknown keys {unknown}", f"Map onto {list(_TARGETS)}")
    missing = {target: src for target, src in columns.items() if src not in row}
    if missing:
        raise _fail(where, f"columns {missing} name columns the row lacks (it has {sorted(row)})", "Fix columns=")
    renamed = {k: v for k, v in row.items() if k not in columns.values()}
    renamed.update({target: row[src] for target, src in columns.items()})
    return renamed


def _formats_for(kind: str, *, where: str) -> tuple[str, ...]:
    if kind not in _FORMATS:
        raise _fail(where, f"unknown kind {kind!r}", f"Use one of {KINDS}")
    return _FORMATS[kind]


def _fail(where: str, problem: str, fix: str) -> FormatError:
    return FormatError(f"{where}: {problem}. {fix}")
