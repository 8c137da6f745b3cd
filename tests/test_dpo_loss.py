"""DPO's loss against numbers worked out by hand.

With the policy equal to its reference, r(y) = beta * (log pi(y|x) - log pi_ref(y|x)) = 0 for
both responses, so the preference term is -log sigmoid(0) = ln 2, whatever the pairs and beta.
The pipeline's default objective adds w * (mean over the batch's chosen tokens of -log pi(t)),
RPO's NLL term (``dpo.sft_loss_weight``, 1 by default); that mean is computed here from the
model's own logits. The policy and reference forward passes run separately (one with autograd),
so float32 rounding leaves ~1e-5.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from datasets import Dataset
from trl import DPOConfig, DPOTrainer

from alignment.config import ModelConfig
from alignment.modeling.embedded import build_model, build_tokenizer


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_equal_policy_and_reference_give_ln2(tmp_path, beta):
    tok = build_tokenizer()
    model = build_model(ModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64), tok)
    rows = [
        {"prompt": [{"role": "user", "content": f"What is {i} + 1?"}],
         "chosen": [{"role": "assistant", "content": str(i + 1)}],
         "rejected": [{"role": "assistant", "content": str(i + 7)}]}
        for i in range(8)
    ]
    args = DPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=8, beta=beta, report_to="none", use_cpu=True,
                     max_length=64, pad_token=tok.pad_token)
    trainer = DPOTrainer(model=model, ref_model=copy.deepcopy(model), args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=tok)
    batch = next(iter(trainer.get_train_dataloader()))
    loss = trainer.compute_loss(trainer.model, batch)
    assert math.isclose(loss.item(), math.log(2), abs_tol=1e-4)


def _pipeline_dpo_trainer(tmp_path, model, tok, rows, *overrides, sft_loss_weight=0.0):
    from alignment.data.stage_data import HeldOut, StageData
    from alignment.run import compose_config
    from alignment.stages import dpo
    from alignment.stages.common import StageContext, StartPoint
    from alignment.stages.trl_stage import Prepared

    cfg = compose_config(["+recipe=sft_then_dpo", "logger=none", f"dpo.sft_loss_weight={sft_loss_weight}", "dpo.global_batch_size=8",
                          *overrides])
    ctx = StageContext(cfg=cfg, run_dir=tmp_path, stage_dir=tmp_path / "dpo", stage="dpo", start=StartPoint(None, None), is_first=False)
    data = StageData(train=Dataset.from_list(rows), held_out=HeldOut(), fingerprint="test", counts={})
    prepared = Prepared(model, tok, data, extras={"reference": dpo.reference_model(cfg.dpo, ctx, model, tok)})
    return dpo.build_trainer(cfg.dpo, ctx, prepared, max_steps=1, save_strategy="no", use_cpu=True)


def _reverse_rows():
    return [
        {"prompt": [{"role": "user", "content": f"Reverse the letters of {'abcdefgh'[: 3 + i % 5]}."}],
         "chosen": [{"role": "assistant", "content": "abcdefgh"[: 3 + i % 5][::-1]}],
         "rejected": [{"role": "assistant", "content": "xy" * (1 + i % 3)}]}
        for i in range(8)
    ]


@torch.no_grad()
def _mean_chosen_nll(model, tok, rows) -> float:
    """Mean -log pi(t) over every token of every chosen response (its closing <|end|> included)."""
    total, count = 0.0, 0
    for row in rows:
        prompt = tok.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
        whole = tok.apply_chat_template(row["prompt"] + row["chosen"], tokenize=True, return_dict=True)["input_ids"]
        assert whole[: len(prompt)] == prompt
        logp = torch.log_softmax(model(input_ids=torch.tensor([whole])).logits[0].float(), dim=-1)
        for position in range(len(prompt), len(whole)):
            total -= float(logp[position - 1, whole[position]])
            count += 1
    return total / count


@pytest.mark.parametrize("weight", [1.0, 0.5])
def test_default_objective_is_dpo_plus_the_chosen_nll(tmp_path, weight):
    """The pipeline's default DPO objective (``dpo.sft_loss_weight=1``): ln 2 + w * mean NLL."""
    tok = build_tokenizer()
    model = build_model(ModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64), tok).eval()
    rows = _reverse_rows()
    expected_nll = _mean_chosen_nll(model, tok, rows)
    assert expected_nll > 1.0, "an untrained model: the NLL term is far from 0, so the check has teeth"
    trainer = _pipeline_dpo_trainer(tmp_path, copy.deepcopy(model), tok, rows, "dpo.beta=0.3", sft_loss_weight=weight)
    trainer.model.eval()
    batch = next(iter(trainer.get_train_dataloader()))
    loss = trainer.compute_loss(trainer.model, batch)
    assert math.isclose(loss.item(), math.log(2) + weight * expected_nll, abs_tol=2e-4), (loss.item(), expected_nll)


def test_precomputed_reference_gives_the_in_step_loss_without_a_reference_model(tmp_path):
    """dpo.precompute_ref_log_probs=true: TRL reads the (padding-free, prompt-sharing) policy
    once before training and keeps no reference; the first batch still costs ln 2, like the
    in-step reference, and the precomputed log-probs are the in-step ones."""
    tok = build_tokenizer()
    model = build_model(ModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64), tok)
    rows = _reverse_rows()
    in_step = _pipeline_dpo_trainer(tmp_path / "a", copy.deepcopy(model), tok, rows, "dpo.precompute_ref_log_probs=false")
    precomputed = _pipeline_dpo_trainer(tmp_path / "b", copy.deepcopy(model), tok, rows, "dpo.precompute_ref_log_probs=true")
    assert in_step.ref_model is not None and precomputed.ref_model is None
    batch = next(iter(precomputed.get_train_dataloader()))
    assert {"ref_chosen_logps", "ref_rejected_logps"} <= set(batch)
    loss = precomputed.compute_loss(precomputed.model, batch)
    assert math.isclose(loss.item(), math.log(2), abs_tol=1e-4)
    chosen, rejected = in_step.compute_ref_log_probs(in_step.ref_model, batch)  # the same rows, in-step reference
    torch.testing.assert_close(batch["ref_chosen_logps"], chosen, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(batch["ref_rejected_logps"], rejected, atol=1e-4, rtol=1e-5)


def test_precompute_is_on_when_it_saves_work():
    from alignment.config import DPOConfig as OurDPOConfig
    from alignment.stages.dpo import precompute_reference

    assert not precompute_reference(OurDPOConfig())  # one epoch: each reference pass runs once either way
    assert precompute_reference(OurDPOConfig(num_epochs=2))
    assert not precompute_reference(OurDPOConfig(num_epochs=2, precompute_ref_log_probs=False))
