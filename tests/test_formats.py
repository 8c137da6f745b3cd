"""Every dataset format converts row by row to TRL's conversational form; bad rows name the row and key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from alignment.data.formats import (
    PREFERENCE_FORMATS,
    PROMPT_FORMATS,
    SFT_FORMATS,
    FormatError,
    convert_row,
    convert_rows,
    detect_format,
)
from conftest import shared



def S(text):
    return {"role": "system", "content": text}


def U(text):
    return {"role": "user", "content": text}


def A(text):
    return {"role": "assistant", "content": text}


def G(who, text):
    return {"from": who, "value": text}


HH_CHOSEN = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Tell me a joke\n\nAssistant: Knock knock."
HH_REJECTED = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Tell me a joke\n\nAssistant: No."

SFT_CASES = [
    ("messages", {"messages": [S("Be brief"), U("Hi"), A("Hello")]}, [S("Be brief"), U("Hi"), A("Hello")]),
    ("prompt_completion", {"prompt": "2+2?", "completion": "4"}, [U("2+2?"), A("4")]),
    ("prompt_completion", {"prompt": [S("Math"), U("2+2?")], "completion": [A("4")]}, [S("Math"), U("2+2?"), A("4")]),
    ("alpaca", {"instruction": "Translate", "input": "chat", "output": "cat", "system": "Be brief"},
     [S("Be brief"), U("Translate\n\nchat"), A("cat")]),
    ("alpaca", {"instruction": "Name a color", "input": "", "output": "Red"}, [U("Name a color"), A("Red")]),
    ("sharegpt", {"conversations": [G("system", "Be kind"), G("human", "Hi"), G("gpt", "Hello"), G("user", "Bye"),
                                    G("assistant", "Bye!")]},
     [S("Be kind"), U("Hi"), A("Hello"), U("Bye"), A("Bye!")]),
    ("preference", {"prompt": "Hi", "chosen": "Hello", "rejected": "Go away"}, [U("Hi"), A("Hello")]),
    ("preference", {"chosen": HH_CHOSEN, "rejected": HH_REJECTED},
     [U("Hi"), A("Hello!"), U("Tell me a joke"), A("Knock knock.")]),
]


@pytest.mark.parametrize(("fmt", "row", "expected"), SFT_CASES)
def test_sft_formats_convert_exactly(fmt, row, expected):
    assert detect_format(row, kind="sft") == fmt
    assert convert_row(row, kind="sft") == {"messages": expected}
    assert convert_row(row, kind="sft", format=fmt) == {"messages": expected}


PREFERENCE_CASES = [
    ("explicit", {"prompt": "Hi", "chosen": "Hello", "rejected": "Go away"},
     {"prompt": [U("Hi")], "chosen": [A("Hello")], "rejected": [A("Go away")]}),
    ("explicit", {"prompt": [S("Be kind"), U("Hi")], "chosen": [A("Hello")], "rejected": [A("")]},
     {"prompt": [S("Be kind"), U("Hi")], "chosen": [A("Hello")], "rejected": [A("")]}),
    # implicit: the shared prefix (up to its last user turn) is the prompt, the differing tails the replies
    ("implicit", {"chosen": [U("Hi"), A("Hello!"), U("Joke?"), A("Knock knock.")],
                  "rejected": [U("Hi"), A("Hello!"), U("Joke?"), A("No.")]},
     {"prompt": [U("Hi"), A("Hello!"), U("Joke?")], "chosen": [A("Knock knock.")], "rejected": [A("No.")]}),
    ("implicit", {"chosen": [U("Hi"), A("Hello!"), U("Joke?"), A("Knock.")], "rejected": [U("Hi"), A("Go away")]},
     {"prompt": [U("Hi")], "chosen": [A("Hello!"), U("Joke?"), A("Knock.")], "rejected": [A("Go away")]}),
    ("hh_rlhf", {"chosen": HH_CHOSEN, "rejected": HH_REJECTED},
     {"prompt": [U("Hi"), A("Hello!"), U("Tell me a joke")], "chosen": [A("Knock knock.")], "rejected": [A("No.")]}),
    ("hh_rlhf", {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!", "rejected": "\n\nHuman: Hi\n\nAssistant: Bye\n\nall"},
     {"prompt": [U("Hi")], "chosen": [A("Hello!")], "rejected": [A("Bye\n\nall")]}),
    ("ultrafeedback", {"prompt": "Hi", "chosen": [U("Hi"), A("Hello")], "rejected": [U("Hi"), A("Meh")],
                       "score_chosen": 9.0, "score_rejected": 2},
     {"prompt": [U("Hi")], "chosen": [A("Hello")], "rejected": [A("Meh")], "score_chosen": 9.0, "score_rejected": 2}),
    ("sharegpt_preference", {"conversations": [G("system", "Be kind"), G("human", "Hi"), G("gpt", "Hello"),
                                               G("human", "Joke?")],
                             "chosen": G("gpt", "Knock knock."), "rejected": G("gpt", "No.")},
     {"prompt": [S("Be kind"), U("Hi"), A("Hello"), U("Joke?")], "chosen": [A("Knock knock.")],
      "rejected": [A("No.")]}),
]


@pytest.mark.parametrize(("fmt", "row", "expected"), PREFERENCE_CASES)
def test_preference_formats_convert_exactly(fmt, row, expected):
    assert detect_format(row, kind="preference") == fmt
    assert convert_row(row, kind="preference") == expected
    assert convert_row(row, kind="preference", format=fmt) == expected


def test_identical_implicit_pair_keeps_its_reply():
    row = {"chosen": [U("Hi"), A("Same")], "rejected": [U("Hi"), A("Same")]}
    assert convert_row(row, kind="preference") == {"prompt": [U("Hi")], "chosen": [A("Same")], "rejected": [A("Same")]}


PROMPT_CASES = [
    ("prompt", {"prompt": "Hi"}, [U("Hi")]),
    ("prompt", {"prompt": [S("Be kind"), U("Hi")], "completion": "Hello"}, [S("Be kind"), U("Hi")]),
    ("messages", {"messages": [U("Hi"), A("Hello"), U("Joke?"), A("Knock.")]}, [U("Hi"), A("Hello"), U("Joke?")]),
    ("messages", {"messages": [U("Hi")]}, [U("Hi")]),
    ("sharegpt", {"conversations": [G("human", "Hi"), G("gpt", "Hello")]}, [U("Hi")]),
    ("alpaca", {"instruction": "Translate", "input": "chat"}, [U("Translate\n\nchat")]),
    ("alpaca", {"instruction": "Translate", "output": "ignored", "system": "Be brief"},
     [S("Be brief"), U("Translate")]),
    ("preference", {"chosen": HH_CHOSEN, "rejected": HH_REJECTED}, [U("Hi"), A("Hello!"), U("Tell me a joke")]),
    ("preference", {"conversations": [G("human", "Hi")], "chosen": G("gpt", "a"), "rejected": G("gpt", "b")},
     [U("Hi")]),
]


@pytest.mark.parametrize(("fmt", "row", "expected"), PROMPT_CASES)
def test_prompt_formats_convert_exactly(fmt, row, expected):
    assert detect_format(row, kind="prompt") == fmt
    assert convert_row(row, kind="prompt") == {"prompt": expected}


@pytest.mark.parametrize(
    ("kind", "columns", "row", "expected"),
    [
        ("sft", {"prompt": "question", "completion": "answer"}, {"question": "2+2?", "answer": "4", "id": 7},
         {"messages": [U("2+2?"), A("4")]}),
        ("preference", {"prompt": "q", "chosen": "good", "rejected": "bad"}, {"q": "Hi", "good": "Hello", "bad": "No"},
         {"prompt": [U("Hi")], "chosen": [A("Hello")], "rejected": [A("No")]}),
        ("prompt", {"prompt": "question"}, {"question": "Hi"}, {"prompt": [U("Hi")]}),
    ],
)
def test_columns_mapping_renames_then_converts(kind, columns, row, expected):
    assert convert_row(row, kind=kind, columns=columns) == expected
    assert convert_row(row, kind=kind, format="columns", columns=columns) == expected
    rows, counts = convert_rows([row, row], kind=kind, columns=columns)
    assert rows == [expected, expected] and counts == {"rows": 2, "format:columns": 2}


def test_none_values_count_as_absent_keys():
    # load_dataset fills a row's missing columns with None
    row = {"messages": None, "instruction": "Hi", "input": None, "output": "Hello", "system": None, "chosen": None}
    assert detect_format(row, kind="sft") == "alpaca"
    assert convert_row(row, kind="sft") == {"messages": [U("Hi"), A("Hello")]}
    pair = {"prompt": "Hi", "chosen": "a", "rejected": "b", "score_chosen": None, "conversations": None}
    assert convert_row(pair, kind="preference") == {"prompt": [U("Hi")], "chosen": [A("a")], "rejected": [A("b")]}


def test_convert_rows_detects_once_and_counts():
    rows = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(3)]
    out, counts = convert_rows(rows, kind="sft")
    assert out[2] == {"messages": [U("q2"), A("a2")]}
    assert counts == {"rows": 3, "format:prompt_completion": 3}
    pairs = [{"prompt": "Hi", "chosen": "a", "rejected": "b"}]
    assert convert_rows(pairs, kind="sft")[1] == {"rows": 1, "format:preference": 1}
    assert convert_rows([], kind="sft") == ([], {"rows": 0})


def test_format_names_are_exported():
    assert SFT_FORMATS == ("messages", "prompt_completion", "alpaca", "sharegpt", "preference", "columns")
    assert PREFERENCE_FORMATS == ("explicit", "implicit", "hh_rlhf", "ultrafeedback", "sharegpt_preference", "columns")
    assert PROMPT_FORMATS == ("prompt", "messages", "sharegpt", "alpaca", "preference", "columns")


ERROR_CASES = [
    # (kind, bad row, substrings the message must hold)
    ("sft", {"instruction": 3, "output": "x"}, ["'instruction' must be a string, got int"]),
    ("preference", {"prompt": "Hi", "chosen": 5, "rejected": "b"}, ["'chosen' must be a string or a list", "got int"]),
    ("preference", {"prompt": "Hi", "chosen": [{"role": "assistant"}], "rejected": "b"},
     ["'chosen[0]' has no string 'content'"]),
    ("sft", {"messages": [U("Hi"), {"role": "bot", "content": "x"}]}, ["'messages[1]' has unknown role 'bot'"]),
    ("sft", {"conversations": [G("human", "Hi"), G("robot", "x")]}, ["'conversations[1]'", "ShareGPT role 'robot'"]),
    ("sft", {"conversations": [G("human", "Hi"), {"from": "gpt"}]}, ["'conversations[1]' has no string 'value'"]),
    ("preference", {"conversations": [G("human", "Hi")], "chosen": "x", "rejected": G("gpt", "b")},
     ["'chosen' must be a {from, value} turn, got str"]),
    ("preference", {"chosen": "Human: Hi\n\nAssistant: a", "rejected": "Hi\n\nAssistant: b"},
     ["'rejected' has text before its first"]),
    ("preference", {"prompt": "Hi", "chosen": [U("Hello?"), A("a")], "rejected": [U("Hello?"), A("b")]},
     ["'prompt' differs"]),
    ("preference", {"chosen": [U("Hi"), A("a")], "rejected": [U("Yo"), A("b")]}, ["share no opening user turn"]),
    ("preference", {"prompt": "Hi", "chosen": "a", "rejected": "b", "score_chosen": "high"},
     ["'score_chosen' must be a number"]),
    ("sft", {"messages": [U("Hi")]}, ["does not end with an assistant turn"]),
    ("prompt", {"messages": [A("Hello")]}, ["does not end with a user turn"]),
    ("sft", {"text": "Hi", "label": 1}, ["no sft format fits a row with keys ['label', 'text']", "prompt_completion",
                                         "alpaca", "columns="]),
    ("preference", {"chosen": "plain", "rejected": "text"}, ["no preference format fits", "hh_rlhf", "ultrafeedback"]),
    ("prompt", {"text": "Hi"}, ["no prompt format fits", "'text'", "sharegpt"]),
]


@pytest.mark.parametrize(("kind", "bad", "expected"), ERROR_CASES)
def test_bad_row_names_source_row_and_key(kind, bad, expected):
    with pytest.raises(FormatError) as err:
        convert_row(bad, kind=kind, source="train.jsonl", index=7)
    message = str(err.value)
    assert message.startswith("train.jsonl, row 7: "), message
    for part in expected:
        assert part in message, message


@pytest.mark.parametrize(
    ("kind", "fmt", "row", "key"),
    [
        ("sft", "alpaca", {"instruction": "Hi"}, "output"),
        ("sft", "messages", {"conversations": [G("human", "Hi")]}, "messages"),
        ("preference", "explicit", {"chosen": "a", "rejected": "b"}, "prompt"),
        ("preference", "sharegpt_preference", {"conversations": [G("human", "Hi")], "chosen": G("gpt", "a")},
         "rejected"),
        ("prompt", "prompt", {"messages": [U("Hi")]}, "prompt"),
    ],
)
def test_missing_key_of_given_format_is_named(kind, fmt, row, key):
    with pytest.raises(FormatError, match=rf"^<data>, row 5: key '{key}' is missing \(format '{fmt}' needs it"):
        convert_row(row, kind=kind, format=fmt, index=5)


def test_later_row_of_another_shape_fails_with_its_index_and_key():
    rows = [{"instruction": "a", "output": "b"}] * 4 + [{"prompt": "c", "completion": "d"}]
    with pytest.raises(FormatError, match=r"^data.json, row 4: key 'output' is missing \(format 'alpaca'"):
        convert_rows(rows, kind="sft", source="data.json")
    pairs = [{"prompt": "Hi", "chosen": "a", "rejected": "b"}, {"prompt": "Hi", "chosen": 1, "rejected": "b"}]
    with pytest.raises(FormatError, match=r"^<data>, row 1: key 'chosen' must be"):
        convert_rows(pairs, kind="preference")


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"kind": "dpo"}, "unknown kind 'dpo'"),
        ({"kind": "sft", "format": "hh_rlhf"}, "unknown sft format 'hh_rlhf'"),
        ({"kind": "sft", "format": "columns"}, "format 'columns' needs a mapping"),
        ({"kind": "sft", "columns": {"prompt": "question"}}, "name columns the row lacks"),
        ({"kind": "sft", "columns": {"promt": "q"}}, "unknown keys ['promt']"),
    ],
)
def test_bad_arguments_say_what_to_use(kwargs, expected):
    with pytest.raises(FormatError, match=r"^<data>, row 0: ") as err:
        convert_row({"q": "Hi", "a": "Hello"}, **kwargs)
    assert expected in str(err.value)


def _shared_rows(name):
    path = shared(name)
    with path.open() as handle:
        return json.load(handle), str(path)


def test_real_alpaca_file_converts_for_sft_and_prompts():
    raw, source = _shared_rows("alpaca_en_demo.json")
    rows, counts = convert_rows(raw, kind="sft", source=source)
    assert counts == {"rows": 999, "format:alpaca": 999}
    assert all(r["messages"][-1] == A(x["output"]) for r, x in zip(rows, raw))
    prompts, counts = convert_rows(raw, kind="prompt", source=source)
    assert counts == {"rows": 999, "format:alpaca": 999}
    assert [p["prompt"] for p in prompts] == [r["messages"][:-1] for r in rows]


def test_real_sharegpt_preference_file_converts_for_every_kind():
    raw, source = _shared_rows("dpo_en_demo.json")
    pairs, counts = convert_rows(raw, kind="preference", source=source)
    assert counts == {"rows": 300, "format:sharegpt_preference": 300}
    first = raw[0]
    assert pairs[0] == {
        "prompt": [U(first["conversations"][0]["value"])],
        "chosen": [A(first["chosen"]["value"])],
        "rejected": [A(first["rejected"]["value"])],
    }
    # every conversation turn (system prompts included) lands in the prompt, which ends with the user
    assert all(len(p["prompt"]) == len(r["conversations"]) for p, r in zip(pairs, raw))
    assert all(p["prompt"][-1]["role"] == "user" for p in pairs)
    prompts, counts = convert_rows(raw, kind="prompt", source=source)
    assert counts == {"rows": 300, "format:preference": 300}
    assert [p["prompt"] for p in prompts] == [p["prompt"] for p in pairs]
    sft, counts = convert_rows(raw, kind="sft", source=source)
    assert counts == {"rows": 300, "format:preference": 300}
    assert sft[0] == {"messages": pairs[0]["prompt"] + pairs[0]["chosen"]}


def test_unpaired_preference_file_keeps_only_desirable_rows_for_sft_and_is_refused_as_pairs():
    rows = json.loads(shared("kto_en_demo.json").read_text())
    out, counts = convert_rows(rows, kind="sft", source="kto_en_demo.json")
    n_true = sum(r["label"] for r in rows)
    assert len(out) == n_true and counts["dropped:unpaired_undesirable"] == len(rows) - n_true
    with pytest.raises(FormatError, match="unpaired preference row"):
        convert_rows(rows, kind="preference", source="kto_en_demo.json")
