"""Plain text against forgetting: the loss masks of a mixed SFT set (plain text: every token;
conversations: responses only), sources and their errors, perplexity by hand, and SFT on the
suite mixed with text as a user runs it."""

from __future__ import annotations

import json
import math

import pytest
import torch

from alignment.config import EvalConfig, ModelConfig
from alignment.data.checks import assistant_token_mask
from alignment.data.plain_text import token_windows, tokenized_sft_rows
from alignment.data.sources import text_source_documents
from alignment.errors import DataError, StageError
from alignment.evaluate import lm_text_perplexity
from alignment.modeling.embedded import build_model, build_tokenizer
from alignment.run import compose_config

CHAT = [{"role": "user", "content": "Add: 2 3"}, {"role": "assistant", "content": "5"}]


def test_loss_mask_every_plain_text_token_and_only_the_responses_of_conversations():
    tok = build_tokenizer()
    rows, shares = tokenized_sft_rows([{"messages": CHAT, "text": None}, {"messages": None, "text": "once upon a time"}], tok,
                                      max_seq_tokens=64)
    chat, text = rows
    mask = assistant_token_mask(tok, CHAT)
    assert [t for t, m in zip(chat["input_ids"], mask) if m] == [t for t in chat["labels"] if t != -100]
    assert chat["labels"] == [t if m else -100 for t, m in zip(chat["input_ids"], mask)] and 0 < sum(mask) < len(mask)
    expected = tok("once upon a time", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert text["input_ids"] == expected and text["labels"] == expected  # every token, EOS included
    assert shares["plain_text_windows"] == 1 and shares["plain_text_share_rows"] == 0.5
    assert shares["plain_text_share_trained_tokens"] == pytest.approx((len(expected) - 1) / (len(expected) - 1 + sum(mask)))
    all_tokens, _ = tokenized_sft_rows([{"messages": CHAT, "text": None}], tok, max_seq_tokens=64, responses_only=False)
    assert all_tokens[0]["labels"] == all_tokens[0]["input_ids"]


def test_a_long_document_becomes_windows_and_keeps_every_token():
    tok = build_tokenizer()
    text = "abcdefghij" * 5  # 50 characters + EOS = 51 tokens with the character tokenizer
    windows = token_windows(text, tok, max_tokens=20)
    assert [len(w) for w in windows] == [20, 20, 11] and sum(windows, []) == tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]


def test_text_sources_txt_and_json_rows_and_their_errors(tmp_path):
    txt = tmp_path / "notes.txt"
    txt.write_text("first document\nstill first\n\n\nsecond one\n")
    assert text_source_documents(str(txt)) == ["first document\nstill first", "second one"]
    rows = tmp_path / "lm.jsonl"
    rows.write_text(json.dumps({"text": "a"}) + "\n" + json.dumps({"txt": "b"}) + "\n")
    with pytest.raises(DataError, match=r"lm\.jsonl, row 1: a plain-text row needs a non-empty string 'text' field \(no 'text' field\)"):
        text_source_documents(str(rows))
    with pytest.raises(DataError, match=r"missing\.txt does not exist"):
        text_source_documents(str(tmp_path / "missing.txt"))


def test_perplexity_is_exp_of_the_mean_token_nll_worked_by_hand(tmp_path):
    tok = build_tokenizer()
    model = build_model(ModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64), tok)
    source = tmp_path / "t.txt"
    source.write_text("hello world\n\nabc\n")
    metrics = lm_text_perplexity(model, tok, cfg=EvalConfig(lm_text=[str(source)], lm_text_window_tokens=8))
    nll, n = 0.0, 0
    with torch.no_grad():
        for doc in ("hello world", "abc"):
            for w in token_windows(doc, tok, max_tokens=8):
                logp = torch.log_softmax(model(input_ids=torch.tensor([w])).logits[0], -1)
                nll -= sum(float(logp[i, w[i + 1]]) for i in range(len(w) - 1))
                n += len(w) - 1
    assert metrics["lm_scored_tokens"] == n and metrics["lm_perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-4)
    assert metrics["lm_perplexity/t"] == metrics["lm_perplexity"]


def test_lm_text_and_suite_member_mistakes_stop_before_anything_loads(tmp_path):
    with pytest.raises(DataError, match=r"nope\.txt does not exist"):
        compose_config(["+recipe=sft", f"eval.lm_text=[{tmp_path / 'nope.txt'}]"])
    with pytest.raises(StageError, match=r"dpo: the mixture member 'suite' .* is for SFT only"):
        compose_config(["+recipe=sft_then_dpo", "data.sources=[{path: suite}]"])


@pytest.mark.integration
def test_sft_on_the_suite_mixed_with_plain_text(run_recipe, tmp_path):
    """The suite's demonstrations and a text file as mixture members: the realised share is
    recorded, the held-out evaluation stays the suite's, and perplexity is measured before and after."""
    text = tmp_path / "text.txt"
    text.write_text("\n\n".join(f"the cat number {i} sat on the mat and looked at {i + 1} birds" for i in range(40)))
    held = tmp_path / "held.txt"
    held.write_text("a dog ran in the park\n\nthe sun was warm")
    _, (sft,) = run_recipe("sft", f"sft.data_sources=[{{path: suite, weight: 3}}, {{path: {text}, weight: 1}}]",
                           "data.mixture_size=200", f"eval.lm_text=[{held}]")
    mixture = sft.data["mixture"]
    assert mixture[str(text)]["rows_taken"] == 50 and mixture["suite"]["rows_taken"] == 150
    assert sft.data["plain_text_rows"] == 50 and sft.data["loss_mask"] == "responses_and_plain_text"
    assert 0 < sft.data["plain_text_share_trained_tokens"] < 1
    assert "gold_accuracy_sampled" in sft.metrics and "unseen/gold_accuracy_sampled" in sft.metrics
    assert sft.metrics["lm_perplexity"] > 1 and sft.start_metrics["lm_perplexity"] > 1
    assert sft.metrics["lm_perplexity"] != sft.start_metrics["lm_perplexity"]


def _nll_by_hand(model, window: list[int]) -> float:
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([window])).logits[0], -1)
    return -sum(float(logp[i, window[i + 1]]) for i in range(len(window) - 1)) / (len(window) - 1)


def test_grpo_pretraining_term_adds_coef_times_the_mean_token_nll_and_draws_reproducibly():
    from collections import defaultdict
    from types import SimpleNamespace

    from alignment.stages.online_rl import with_pretraining_term

    tok = build_tokenizer()
    model = build_model(ModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64), tok).eval()
    windows = [token_windows(t, tok, max_tokens=16)[0] for t in ("the cat sat", "a dog ran far away")]

    class Base:  # what TRL's trainer gives the subclass: its loss, its step, its device, its metrics
        def __init__(self, step):
            self.state, self.accelerator = SimpleNamespace(global_step=step), SimpleNamespace(device=torch.device("cpu"))
            self._metrics = defaultdict(lambda: defaultdict(list))

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            return torch.tensor(2.0)

    trainer_class = with_pretraining_term(Base, windows, coef=0.5, batch_size=1, pad_token_id=tok.pad_token_id, seed=0)
    first = trainer_class(step=3)
    loss = first.compute_loss(model, None)
    (drawn,) = [w for w in windows if _nll_by_hand(model, w) == pytest.approx(first._metrics["eval"]["ptx_loss"][0], rel=1e-5)]
    assert float(loss.detach()) == pytest.approx(2.0 + 0.5 * _nll_by_hand(model, drawn), rel=1e-5)
    draws = [trainer_class(step=3).compute_loss(model, None) for _ in range(2)]  # a resumed run at the same step
    assert float(draws[0]) == float(draws[1]) == float(loss)


@pytest.mark.integration
def test_ppo_and_grpo_train_with_the_pretraining_term(run_recipe, tmp_path):
    from test_online_rl import ONLINE
    from test_pipeline import PPO, RM

    text = tmp_path / "pretrain.txt"
    text.write_text("\n\n".join(f"the cat number {i} sat on the mat" for i in range(20)))
    ptx = ["ptx_coef=0.5", f"ptx_text=[{text}]", "ptx_batch_size=2", "ptx_window_tokens=32"]
    _, (_, _, ppo) = run_recipe("sft_rm_ppo", *RM, *PPO, *(f"ppo.{o}" for o in ptx))
    assert all(h["loss/ptx"] > 0 for h in ppo.metrics["history"])
    _, (_, grpo) = run_recipe("sft_then_grpo", *ONLINE, "grpo.max_steps=2", *(f"grpo.{o}" for o in ptx), "eval.enabled=false",
                              "grpo.rewards=[{name: reward_fns:brevity}]",
                              output_dir=tmp_path / "grpo")
    assert grpo.status == "complete" and grpo.config["ptx_coef"] == 0.5
    with pytest.raises(StageError, match=r"ppo\.ptx_coef=0\.5 needs plain text to train on"):
        compose_config(["+recipe=sft_rm_ppo", "ppo.ptx_coef=0.5"])
