"""Row checks before any model loads: every drop reason and over-length policy, the drop-share limit, and
the assistant loss mask (from {% generation %} or from prefix differences).

Lengths are worked by hand on the embedded char-level tokenizer: ``[U(p), A(r)]`` renders as
``<|user|>p<|end|><|assistant|>r<|end|>``, i.e. len(p) + len(r) + 4 tokens, and the prompt with its
generation prompt ``<|user|>p<|end|><|assistant|>`` is len(p) + 3 tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from alignment.data.checks import (
    CheckReport,
    DataCheckError,
    assistant_token_mask,
    check_preference_rows,
    check_prompt_rows,
    check_sft_rows,
    percentiles,
)
from alignment.errors import DataError
from alignment.modeling.embedded import build_tokenizer
from conftest import shared

MAX = 30


def U(text):
    return {"role": "user", "content": text}


def A(text):
    return {"role": "assistant", "content": text}


def S(text):
    return {"role": "system", "content": text}


def pair(prompt, chosen, rejected):
    return {"prompt": [U(prompt)], "chosen": [A(chosen)], "rejected": [A(rejected)]}


def sft(prompt, reply):
    return {"messages": [U(prompt), A(reply)]}


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def prefs(rows, tok, *, over_length="drop", max_drop_share=1.0):
    return check_preference_rows(rows, tokenizer=tok, max_seq_tokens=MAX, over_length=over_length,
                                 max_drop_share=max_drop_share, source="pairs.jsonl")


def sfts(rows, tok, *, over_length="drop", max_drop_share=1.0):
    return check_sft_rows(rows, tokenizer=tok, max_seq_tokens=MAX, over_length=over_length,
                          max_drop_share=max_drop_share, source="sft.jsonl")


# --- preference rows ---------------------------------------------------------------------------------

def test_preference_drop_reasons(tok):
    good = pair("hi", "yes", "no")
    rows = [
        good,
        pair("hi", "same", "same"),                                           # chosen_equals_rejected
        pair("hi", "  ", "no"),                                               # empty_chosen
        pair("hi", "yes", "\n"),                                              # empty_rejected
        {"prompt": [U("hi")], "chosen": [U("hi"), A("a")], "rejected": [U("ho"), A("b")]},  # prompt_mismatch
        {"prompt": [U("hi")], "chosen": [A("a")], "rejected": [S("be rude"), A("b")]},      # prompt_mismatch
    ]
    kept, report = prefs(rows, tok)
    assert kept == [good]
    assert report.dropped == {"chosen_equals_rejected": 1, "empty_chosen": 1, "empty_rejected": 1,
                              "prompt_mismatch": 2}
    assert (report.rows_read, report.rows_kept, report.truncated) == (6, 1, 0)
    assert report.token_lengths["max"] == 2 + 3 + 4  # the longer side: prompt "hi" + "yes"


def test_preference_over_length_policies(tok):
    fits = pair("q" * 10, "a" * 16, "b")               # 10 + 16 + 4 = 30 tokens: at the limit, kept
    long = pair("q" * 10, "a" * 20, "b")               # 34 tokens
    long_prompt = pair("q" * 27, "a", "b")             # prompt + generation prompt = 30 tokens: no reply left
    same_start = pair("q" * 10, "x" * 20 + "a", "x" * 20 + "b")  # differ only past token 30

    kept, report = prefs([fits, long], tok, over_length="drop")
    assert kept == [fits] and report.dropped == {"too_long": 1} and report.truncated == 0

    rows = [fits, long, long_prompt, same_start]
    kept, report = prefs(rows, tok, over_length="truncate")
    assert kept == [fits, long] and kept[1] is long  # kept unchanged: TRL truncates at tokenization
    assert report.truncated == 1
    assert report.dropped == {"prompt_too_long": 1, "identical_after_truncation": 1}

    with pytest.raises(DataCheckError, match=r"pairs.jsonl, row 1: 34 tokens, more than max_seq_tokens=30") as err:
        prefs(rows, tok, over_length="error")
    assert "Raise max_seq_tokens" in str(err.value) and "'truncate'" in str(err.value)


def test_drop_share_limit_names_counts_and_key(tok):
    rows = [pair("hi", f"yes {i}", "no") for i in range(18)] + [pair("hi", "x", "x"), pair("hi", "", "no")]
    with pytest.raises(DataCheckError) as err:
        prefs(rows, tok, max_drop_share=0.05)
    message = str(err.value)
    assert isinstance(err.value, DataError) and isinstance(err.value, ValueError)
    assert "dropped 2 of 20 rows (10.0%)" in message
    assert "chosen_equals_rejected=1 (first at row 18)" in message and "empty_chosen=1 (first at row 19)" in message
    assert "data.max_drop_share" in message
    kept, report = prefs(rows, tok, max_drop_share=0.1)  # at the limit is allowed
    assert len(kept) == 18 and report.drop_share() == pytest.approx(0.1)


def test_no_rows_left_is_an_error(tok):
    with pytest.raises(DataCheckError, match="no rows left"):
        prefs([pair("hi", "x", "x")], tok, max_drop_share=1.0)


def test_rows_not_converted_are_named(tok):
    with pytest.raises(DataCheckError, match=r"row 0: key 'chosen' must be a list.*convert_rows"):
        prefs([{"prompt": [U("hi")], "chosen": "yes", "rejected": [A("no")]}], tok)
    with pytest.raises(ValueError, match="over_length"):
        prefs([pair("hi", "a", "b")], tok, over_length="clip")


# --- SFT rows ----------------------------------------------------------------------------------------

def test_sft_drops_and_policies(tok):
    good, blank = sft("hi", "hello"), sft("hi", "   ")
    long = sft("q" * 10, "a" * 20)                    # 34 tokens, reply starts at token 13
    long_prompt = sft("q" * 30, "a")                  # the reply starts past token 30
    kept, report = sfts([good, blank, long, long_prompt], tok, over_length="truncate")
    assert kept == [good, long]
    assert report.dropped == {"empty_response": 1, "prompt_too_long": 1} and report.truncated == 1
    assert report.token_lengths == {"p50": 11.0, "p90": 34.0, "p99": 34.0, "max": 34.0}

    kept, report = sfts([good, long], tok, over_length="drop")
    assert kept == [good] and report.dropped == {"too_long": 1}
    with pytest.raises(DataCheckError, match=r"sft.jsonl, row 1: 34 tokens"):
        sfts([good, long], tok, over_length="error")


def test_sft_template_marking_everything_is_an_error():
    tok = build_tokenizer()
    tok.chat_template = ("{% generation %}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>"
                         "{% endfor %}{% endgeneration %}")
    with pytest.raises(DataCheckError, match=r"sft.jsonl, row 0: .*marks all 9 tokens.*model.chat_template"):
        sfts([sft("hi", "yes")], tok)


# --- assistant loss mask -----------------------------------------------------------------------------

CONVERSATIONS = [
    [U("hi"), A("hello")],
    [S("be brief"), U("2+2?"), A("4"), U("and 3+3?"), A("6")],
    [U("empty reply"), A("")],
]


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_generation_mask_equals_prefix_diff_mask(tok, messages):
    plain = build_tokenizer()
    plain.chat_template = tok.chat_template.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    assert "{% generation %}" in tok.chat_template and "{% generation %}" not in plain.chat_template
    assert assistant_token_mask(tok, messages) == assistant_token_mask(plain, messages)


def test_generation_mask_by_hand(tok):
    # <|user|> h i <|end|> <|assistant|> y o <|end|>: the reply and its end token carry the loss
    assert assistant_token_mask(tok, [U("hi"), A("yo")]) == [0, 0, 0, 0, 0, 1, 1, 1]


def test_prefix_diff_inconsistent_template_is_an_error():
    tok = build_tokenizer()
    # The generation prompt ends in a newline the rendered assistant turn does not have.
    tok.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
    with pytest.raises(DataCheckError, match=r"does not mark assistant turns.*\{% generation %\}"):
        assistant_token_mask(tok, [U("hi"), A("yo")])


def test_prefix_diff_mask_on_gpt2_bpe():
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    gpt2 = shared("tokenizers", "gpt2")
    core = ByteLevelBPETokenizer(str(gpt2 / "vocab.json"), str(gpt2 / "merges.txt"))
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}<|endoftext|>{% endfor %}"
                         "{% if add_generation_prompt %}assistant:{% endif %}")
    messages = [U("Hi there"), A("Hello friend"), U("More"), A("Sure thing")]
    ids = tok.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    mask = assistant_token_mask(tok, messages)
    assert len(mask) == len(ids)
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == " Hello friend<|endoftext|> Sure thing<|endoftext|>"
    assert tok.decode([i for i, m in zip(ids, mask) if not m]).startswith("user: Hi there<|endoftext|>assistant:")


# --- prompt rows -------------------------------------------------------------------------------------

def test_prompt_rows(tok):
    short, long, blank = {"prompt": [U("hi")]}, {"prompt": [U("q" * 30)]}, {"prompt": [U(" ")]}
    kw = dict(tokenizer=tok, max_prompt_tokens=MAX, source="prompts.jsonl")
    kept, report = check_prompt_rows([short, long, blank], over_length="drop", **kw)
    assert kept == [short] and report.dropped == {"empty_prompt": 1, "too_long": 1}
    kept, report = check_prompt_rows([short, long, blank], over_length="truncate", **kw)
    assert kept == [short, long] and report.truncated == 1 and report.token_lengths["max"] == 33
    with pytest.raises(DataCheckError, match=r"prompts.jsonl, row 1: 33 tokens, more than max_prompt_tokens=30"):
        check_prompt_rows([short, long], over_length="error", **kw)


# --- report ------------------------------------------------------------------------------------------

def test_percentiles_nearest_rank():
    assert percentiles(list(range(100, 0, -1))) == {"p50": 50.0, "p90": 90.0, "p99": 99.0, "max": 100.0}
    assert percentiles([7]) == {"p50": 7.0, "p90": 7.0, "p99": 7.0, "max": 7.0}
    assert percentiles([1, 2, 3, 10]) == {"p50": 2.0, "p90": 10.0, "p99": 10.0, "max": 10.0}
    assert percentiles([]) == {}


def test_report_dict_and_text():
    report = CheckReport(rows_read=40, rows_kept=37, dropped={"too_long": 2, "empty_chosen": 1}, truncated=4,
                         token_lengths={"p50": 12.0, "p90": 20.0, "p99": 29.0, "max": 30.0})
    assert report.drop_share() == pytest.approx(3 / 40)
    assert json.loads(json.dumps(report.to_dict()))["dropped"] == {"too_long": 2, "empty_chosen": 1}
    text = report.format()
    for needle in ("rows read    40", "rows kept    37", "dropped      3 (7.5%)", "too_long", "empty_chosen",
                   "truncated    4", "p50 12", "max 30"):
        assert needle in text
