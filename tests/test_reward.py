"""Reward model: Bradley-Terry loss and accuracy on a hand-built batch, AUC, scoring."""

from __future__ import annotations

import math

import torch
from datasets import Dataset
from transformers import LlamaConfig, LlamaForSequenceClassification
from trl import RewardConfig, RewardTrainer

from alignment.modeling.embedded import build_tokenizer
from alignment.evaluate import pair_metrics, roc_auc
from alignment.modeling.scoring import render_replies, score_responses


def _tiny_reward_model(tok):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                      intermediate_size=64, num_labels=1, pad_token_id=tok.pad_token_id)
    return LlamaForSequenceClassification(cfg)


ROWS = [
    {"prompt": [{"role": "user", "content": f"Add: {i} 1"}], "chosen": [{"role": "assistant", "content": str(i + 1)}],
     "rejected": [{"role": "assistant", "content": f"Sure! {i + 1}"}]}
    for i in range(6)
]


def test_bradley_terry_loss_matches_hand_computation(tmp_path):
    """L = mean(-log sigmoid(r_c - r_r)), with r read at the last real token of each sequence."""
    tok = build_tokenizer()
    model = _tiny_reward_model(tok)
    args = RewardConfig(output_dir=str(tmp_path), per_device_train_batch_size=6, report_to="none", use_cpu=True, max_length=64)
    trainer = RewardTrainer(model=model, args=args, train_dataset=Dataset.from_list(ROWS), processing_class=tok)
    batch = next(iter(trainer.get_train_dataloader()))
    loss = trainer.compute_loss(model, batch).item()
    prompts = [r["prompt"] for r in ROWS]
    prompt_ids, chosen_ids = render_replies(tok, prompts, [r["chosen"][0]["content"] for r in ROWS])
    _, rejected_ids = render_replies(tok, prompts, [r["rejected"][0]["content"] for r in ROWS])
    r_c = score_responses(model, prompt_ids, chosen_ids, pad_token_id=tok.pad_token_id, batch_size=6)
    r_r = score_responses(model, prompt_ids, rejected_ids, pad_token_id=tok.pad_token_id, batch_size=6)
    by_hand = (-torch.nn.functional.logsigmoid(r_c - r_r)).mean().item()
    assert math.isclose(loss, by_hand, rel_tol=1e-4, abs_tol=1e-5)


def test_pair_metrics_by_hand(monkeypatch):
    """Scores fixed by hand (chosen 3, 1, 2; rejected 2, 0, 5): 2 of 3 pairs ranked right, means
    2 and 7/3, and an AUC over all 3 x 3 (chosen, rejected) comparisons of 4.5 / 9 (one tie)."""
    fixed = {"chosen": torch.tensor([3.0, 1.0, 2.0]), "rejected": torch.tensor([2.0, 0.0, 5.0])}
    rows = ROWS[:3]

    tok = build_tokenizer()
    _, chosen_ids = render_replies(tok, [r["prompt"] for r in rows], [r["chosen"][0]["content"] for r in rows])

    def scores(model, prompt_ids, reply_ids, *, pad_token_id, batch_size):
        return fixed["chosen" if list(reply_ids) == chosen_ids else "rejected"]

    monkeypatch.setattr("alignment.evaluate.score_responses", scores)
    metrics = pair_metrics(None, tok, Dataset.from_list(rows), batch_size=4)
    assert math.isclose(metrics["pairwise_accuracy"], 2 / 3, rel_tol=1e-6)
    assert math.isclose(metrics["reward_chosen_mean"], 2.0) and math.isclose(metrics["reward_rejected_mean"], 7 / 3, rel_tol=1e-6)
    assert math.isclose(metrics["correct_vs_incorrect_auc"], 4.5 / 9)
    assert metrics["eval_pairs"] == 3


def test_scores_do_not_depend_on_batching_or_padding():
    tok = build_tokenizer()
    model = _tiny_reward_model(tok)
    prompts = [r["prompt"] for r in ROWS]
    responses = ["1", "a much longer answer", "x"] * 2
    prompt_ids, reply_ids = render_replies(tok, prompts, responses)
    one = score_responses(model, prompt_ids, reply_ids, pad_token_id=tok.pad_token_id, batch_size=1)
    many = score_responses(model, prompt_ids, reply_ids, pad_token_id=tok.pad_token_id, batch_size=6)
    assert torch.allclose(one, many, atol=1e-5)


def test_roc_auc_by_hand():
    # positives 3, 1 against negatives 2, 0: pairs (3>2, 3>0, 1<2, 1>0) -> 3 of 4 ordered right.
    assert roc_auc(positives=torch.tensor([3.0, 1.0]), negatives=torch.tensor([2.0, 0.0])) == 0.75
    assert roc_auc(positives=torch.tensor([1.0]), negatives=torch.tensor([1.0])) == 0.5
