"""LoRA for every stage (alignment/modeling/lora.py): only adapters train, the stage boundary leaves an
adapter and a merged model that agree, DPO needs no reference copy, an adapter can be continued,
and QLoRA refuses to start where it cannot run.

The stage runs share one LoRA SFT run (a module fixture) on the tiny model of conftest.TINY.
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from alignment.modeling import lora
from alignment.stages import dpo
from alignment.config import AlignmentConfig, LoraConfig, ModelConfig
from alignment.errors import ConfigError
from alignment.modeling.embedded import build_model, build_tokenizer
from conftest import is_share_of, TINY

LORA = ["model.peft=lora", "model.lora.r=4", "model.lora.alpha=8", "model.lora.dropout=0.0"]
RM = ["reward.max_steps=3", "reward.global_batch_size=8", "reward.pairs.n_prompts=32"]
TINY_MODEL = ModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)


def _run(recipe: str, out: Path, *overrides: str):
    from alignment.pipeline import run_pipeline
    from alignment.run import compose_config

    cfg = compose_config([f"+recipe={recipe}", f"output_dir={out}", *TINY, *LORA, *overrides])
    return cfg, run_pipeline(cfg)


@contextlib.contextmanager
def _captured():
    """The model and trainer a TRL-backed stage hands to save_checkpoint, kept for the test to inspect."""
    from alignment.stages import trl_stage

    seen: dict = {}
    original = trl_stage.save_checkpoint

    def spy(model, tokenizer, ctx, *, trainer=None):
        seen.update(model=model, trainer=trainer)
        return original(model, tokenizer, ctx, trainer=trainer)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(trl_stage, "save_checkpoint", spy)
        yield seen


def _batch():
    tok = build_tokenizer()
    texts = [[{"role": "user", "content": "Add: 2 3"}, {"role": "assistant", "content": "5"}],
             [{"role": "user", "content": "Reverse: abc"}, {"role": "assistant", "content": "cba"}]]
    ids = [tok.apply_chat_template(t, tokenize=True, return_dict=True)["input_ids"] for t in texts]
    width = min(len(i) for i in ids)
    return torch.tensor([i[:width] for i in ids])


def _logits(model, batch):
    model.eval()
    with torch.no_grad():
        return model(input_ids=batch).logits


# Fast tier: the pieces, on a model built in the test.


def test_peft_config_comes_from_ours():
    ours = LoraConfig(r=4, alpha=8, dropout=0.1, target_modules=["q_proj", "v_proj"])
    causal = lora.peft_config(ours, task=lora.CAUSAL_LM)
    assert (causal.r, causal.lora_alpha, causal.lora_dropout) == (4, 8, 0.1)
    assert set(causal.target_modules) == {"q_proj", "v_proj"} and not causal.modules_to_save
    seq_cls = lora.peft_config(LoraConfig(), task=lora.SEQ_CLS)
    assert seq_cls.target_modules == "all-linear" and seq_cls.modules_to_save == ["score"], "the new score head trains too"


def test_fresh_adapter_starts_at_the_base_and_reference_disables_it():
    tok = build_tokenizer()
    base_logits = _logits(build_model(TINY_MODEL, tok), _batch())
    cfg = AlignmentConfig(model=replace(TINY_MODEL, peft="lora"))
    model = lora.attach(build_model(TINY_MODEL, tok), cfg, task=lora.CAUSAL_LM, adapter=None)
    assert torch.equal(_logits(model, _batch()), base_logits), "B = 0: a fresh adapter changes nothing"
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.add_(0.1)  # as if trained
    assert not torch.allclose(_logits(model, _batch()), base_logits)
    with lora.reference_disabled(model):
        assert torch.equal(_logits(model, _batch()), base_logits)
    assert torch.equal(_logits(lora.ReferenceView(model), _batch()), base_logits)
    lora.add_reference_adapter(model)  # a continued adapter: the reference is its frozen copy
    trained_logits = _logits(model, _batch())
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B.default" in name:
                param.add_(0.1)
    with lora.reference_disabled(model):
        assert torch.allclose(_logits(model, _batch()), trained_logits, atol=1e-6)
    assert all(p.requires_grad == (".default." in n) for n, p in model.named_parameters() if "lora_" in n)


def test_qlora_problems_are_named(monkeypatch):
    cfg = AlignmentConfig(stages=["sft"], model=ModelConfig(peft="qlora"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(lora, "_bitsandbytes_installed", lambda: False)
    message = lora.qlora_problem(cfg)
    assert "CUDA GPU" in message and "bitsandbytes" in message and "alignment[qlora]" in message
    assert "embedded default model" in message and "model.peft=lora" in message
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cfg.model.name_or_path = "/models/llama"
    assert "CUDA" not in lora.qlora_problem(cfg) and "bitsandbytes" in lora.qlora_problem(cfg)
    monkeypatch.setattr(lora, "_bitsandbytes_installed", lambda: True)
    assert lora.qlora_problem(cfg) is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_qlora_on_cpu_fails_before_anything_loads(monkeypatch, tmp_path):
    from alignment.run import compose_config

    monkeypatch.setattr("alignment.modeling.embedded.build_model", lambda *a, **k: pytest.fail("a model was built"))
    with pytest.raises(ConfigError, match="needs a CUDA GPU") as err:
        compose_config(["+recipe=sft", f"output_dir={tmp_path}", *TINY, "model.peft=qlora"])
    assert "model.peft=lora on CPU" in str(err.value) and "cannot be loaded in 4 bits" in str(err.value)


# Integration tier: stages on the tiny model.


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("lora")
    with _captured() as seen:
        cfg, (result,) = _run("sft", out)
    return SimpleNamespace(cfg=cfg, result=result, model=seen["model"], stage_dir=out / "sft" / "sft", out=out)


@pytest.mark.integration
def test_lora_sft_trains_only_the_adapter(sft_run):
    model = sft_run.model
    assert isinstance(model, PeftModel)
    before = build_model(sft_run.cfg.model, build_tokenizer()).state_dict()
    after = lora.unwrap(model).state_dict()
    base = {k.replace(".base_layer", ""): v for k, v in after.items() if "lora_" not in k}
    assert base.keys() == before.keys()
    assert all(torch.equal(base[k], before[k]) for k in before), "a base weight changed"
    lora_b = [v for k, v in after.items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b), "every B started at zero and moved"
    record = sft_run.result.inputs["peft"]
    n_adapter = sum(v.numel() for k, v in after.items() if "lora_" in k)
    assert record["trainable_params"] == n_adapter and record["total_params"] == sum(p.numel() for p in model.parameters())
    assert 0 < record["trainable_share"] < 0.5 and record["r"] == 4
    assert math.isfinite(sft_run.result.metrics["train_loss_mean"])


@pytest.mark.integration
def test_adapter_and_merged_checkpoint_load_back_and_agree(sft_run):
    adapter = Path(sft_run.result.inputs["peft"]["adapter"])
    assert adapter == sft_run.stage_dir / "adapter"
    base = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert base == str(adapter / "base") and Path(base).is_absolute(), "the embedded base is written next to the adapter"
    with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter)
    merged = AutoModelForCausalLM.from_pretrained(sft_run.result.checkpoint)
    batch = _batch()
    expected = _logits(sft_run.model, batch)  # the trained model in memory
    assert torch.allclose(_logits(with_adapter, batch), expected, atol=1e-5)
    assert torch.allclose(_logits(merged, batch), expected, atol=1e-5)
    assert not torch.allclose(_logits(AutoModelForCausalLM.from_pretrained(base), batch), expected, atol=1e-5)


@pytest.mark.integration
def test_lora_dpo_uses_the_disabled_adapters_as_reference(sft_run, monkeypatch):
    monkeypatch.setattr(dpo, "copy", SimpleNamespace(deepcopy=lambda *a: pytest.fail("DPO copied the model")))
    with _captured() as seen:
        _, (result,) = _run("dpo", sft_run.out, f"dpo.init_from={sft_run.stage_dir}")
    trainer = seen["trainer"]
    assert trainer.ref_model is None and isinstance(trainer.model, PeftModel)
    parent = _logits(AutoModelForCausalLM.from_pretrained(sft_run.result.checkpoint), _batch())
    with lora.reference_disabled(trainer.model):
        reference = _logits(trainer.model, _batch())
    assert torch.allclose(reference, parent, atol=1e-5), "the reference is the parent policy"
    assert not torch.allclose(_logits(trainer.model, _batch()), parent, atol=1e-5), "DPO moved the policy"
    assert result.inputs["peft"]["base"] == sft_run.result.checkpoint
    assert "reward_accuracy" in result.metrics and result.metrics["kl_to_parent"] >= -1e-3
    AutoModelForCausalLM.from_pretrained(result.checkpoint)


@pytest.mark.integration
def test_adapter_init_from_keeps_training_that_adapter(sft_run):
    adapter = sft_run.stage_dir / "adapter"
    with _captured() as seen:
        _, (result,) = _run("dpo", sft_run.out / "continued", f"dpo.init_from={adapter}")
    base = str(adapter / "base")
    assert result.parent_checkpoint == base and result.parent_stage == "sft"
    assert result.inputs["start_adapter"]["adapter"] == str(adapter)
    assert json.loads(Path(result.inputs["peft"]["adapter"], "adapter_config.json").read_text())["base_model_name_or_path"] == base
    model = seen["trainer"].model
    with lora.reference_disabled(model):  # the frozen copy of the SFT adapter, not the bare base
        reference = _logits(model, _batch())
    assert torch.allclose(reference, _logits(sft_run.model, _batch()), atol=1e-5)
    continued = _logits(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), result.inputs["peft"]["adapter"]),
                        _batch())
    assert torch.allclose(continued, _logits(AutoModelForCausalLM.from_pretrained(result.checkpoint), _batch()), atol=1e-5)


@pytest.mark.integration
def test_lora_reward_trains_adapter_and_score_head(sft_run):
    with _captured() as seen:
        _, (result,) = _run("reward", sft_run.out, f"reward.init_from={sft_run.stage_dir}", *RM)
    record = result.inputs["peft"]
    assert record["task"] == lora.SEQ_CLS and record["base"] == sft_run.result.checkpoint
    trained = lora.unwrap(seen["model"])
    head = trained.score.modules_to_save["default"].weight
    assert not torch.equal(head, trained.score.original_module.weight), "the score head trained"
    merged = AutoModelForSequenceClassification.from_pretrained(result.checkpoint)
    assert merged.config.num_labels == 1 and torch.equal(merged.score.weight, head)
    base = AutoModelForSequenceClassification.from_pretrained(record["base"], num_labels=1)
    with_adapter = PeftModel.from_pretrained(base, record["adapter"])
    assert merged.config.pad_token_id == build_tokenizer().pad_token_id, "the score is read at the last non-pad token"
    assert torch.allclose(_logits(with_adapter, _batch()), _logits(merged, _batch()), atol=1e-5)
    assert result.metrics["eval_pairs"] > 0 and is_share_of(result.metrics["pairwise_accuracy"], result.metrics["eval_pairs"])


@pytest.mark.integration
def test_lora_ppo_references_the_disabled_adapters_and_saves_both(sft_run, monkeypatch):
    from alignment.stages.ppo import stage as ppo

    monkeypatch.setattr(ppo, "copy", SimpleNamespace(deepcopy=lambda *a: pytest.fail("PPO copied the policy")))
    ppo_overrides = ["ppo.num_rollouts=2", "ppo.rollout_batch_size=16", "ppo.mini_batch_size=8", "ppo.n_prompts=64"]
    _, results = _run("sft_rm_ppo", sft_run.out / "ppo", *RM, *ppo_overrides, f"sft.init_from={sft_run.result.checkpoint}")
    result = results[-1]
    record = result.inputs["peft"]
    assert result.stage == "ppo" and record["task"] == lora.CAUSAL_LM and record["trainable_share"] < 0.5
    assert record["base"] == results[0].checkpoint  # PPO adapts the SFT policy it starts from
    with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(record["base"]), record["adapter"])
    merged = AutoModelForCausalLM.from_pretrained(result.checkpoint)
    assert torch.allclose(_logits(with_adapter, _batch()), _logits(merged, _batch()), atol=1e-5)
    assert len(result.metrics["history"]) == 2 and result.metrics["kl_to_parent"] >= -1e-3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="QLoRA needs a CUDA GPU")
def test_qlora_sft_runs_on_a_4bit_base(tmp_path):
    pytest.importorskip("bitsandbytes")
    tok = build_tokenizer()
    build_model(TINY_MODEL, tok).save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    _, (result,) = _run("sft", tmp_path / "out", "model=hf", "model.peft=qlora", f"model.name_or_path={tmp_path / 'base'}", "model.dtype=bfloat16")
    assert result.inputs["peft"]["method"] == "qlora"
    AutoModelForCausalLM.from_pretrained(result.checkpoint)
