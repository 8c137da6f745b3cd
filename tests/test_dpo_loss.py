"""DPO sanity: with the policy equal to its reference every pair costs exactly ln 2.

r(y) = beta * (log pi(y|x) - log pi_ref(y|x)) = 0 for both responses, so
L = -log sigmoid(0) = ln 2, whatever the pairs and whatever beta. The policy and reference
forward passes run separately (one with autograd), so float32 rounding leaves ~1e-5.
"""

from __future__ import annotations

import copy
import math

import pytest
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
