"""DPO sanity: with the policy equal to its reference every pair costs exactly ln 2.

r(y) = beta * (log pi(y|x) - log pi_ref(y|x)) = 0 for both responses, so
L = -log sigmoid(0) = ln 2, whatever the pairs and whatever beta. The policy and reference
forward passes run separately (one with autograd), so float32 rounding leaves ~1e-5.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from datasets import Dataset
from trl import DPOConfig, DPOTrainer

from alignment.config import ModelConfig
from alignment.embedded import build_model, build_tokenizer


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


def _pipeline_dpo_trainer(tmp_path, model, tok, rows, *overrides):
    from alignment.dpo import build_dpo_trainer, reference_model
    from alignment.run import compose_config
    from alignment.stage import StageContext, StartPoint

    cfg = compose_config(["+recipe=sft_then_dpo", "logger=none", "dpo.sft_loss_weight=0", "dpo.per_device_batch_size=8", *overrides])
    ctx = StageContext(cfg=cfg, run_dir=tmp_path, stage_dir=tmp_path / "dpo", stage="dpo", start=StartPoint(None, None), is_first=False)
    return build_dpo_trainer(cfg.dpo, ctx, model, reference_model(cfg.dpo, model), tok, Dataset.from_list(rows),
                             max_steps=1, save_strategy="no", use_cpu=True)


def test_precomputed_reference_gives_the_in_step_loss_without_a_reference_model(tmp_path):
    """dpo.precompute_ref_log_probs=true: TRL reads the (padding-free, prompt-sharing) policy
    once before training and keeps no reference; the first batch still costs ln 2, like the
    in-step reference, and the precomputed log-probs are the in-step ones."""
    tok = build_tokenizer()
    model = build_model(ModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64), tok)
    rows = [
        {"prompt": [{"role": "user", "content": f"Reverse the letters of {'abcdefgh'[: 3 + i % 5]}."}],
         "chosen": [{"role": "assistant", "content": "abcdefgh"[: 3 + i % 5][::-1]}],
         "rejected": [{"role": "assistant", "content": "xy" * (1 + i % 3)}]}
        for i in range(8)
    ]
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
    from alignment.dpo import precompute_reference

    assert not precompute_reference(OurDPOConfig())  # one epoch: each reference pass runs once either way
    assert precompute_reference(OurDPOConfig(num_epochs=2))
    assert not precompute_reference(OurDPOConfig(num_epochs=2, precompute_ref_log_probs=False))
