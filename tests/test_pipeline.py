"""Integration tier: the recipes run end to end on a tiny model, hand off checkpoints, skip
finished stages, rerun changed ones, and leave loadable Hugging Face checkpoints."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from alignment import pipeline
from alignment.records import read_result
from conftest import is_share_of, TINY

pytestmark = pytest.mark.integration


def _weights(path):
    return AutoModelForCausalLM.from_pretrained(path).state_dict()


def test_sft_then_dpo_hands_off_and_records_lineage(run_recipe, tmp_path):
    cfg, results = run_recipe("sft_then_dpo")
    sft, dpo = results
    assert [r.stage for r in results] == ["sft", "dpo"] and all(r.status == "complete" for r in results)
    run_dir = tmp_path / "out" / "sft_then_dpo"
    assert dpo.parent_stage == "sft" and dpo.parent_checkpoint == sft.checkpoint
    assert dpo.parent_checkpoint_hash == sft.checkpoint_hash
    for r in results:
        on_disk = read_result(run_dir / r.stage)
        assert on_disk.checkpoint_hash == r.checkpoint_hash and on_disk.data_fingerprint
        assert on_disk.config["learning_rate"] > 0 and on_disk.versions["torch"] and on_disk.wall_seconds > 0
        assert math.isfinite(on_disk.metrics["train_loss_mean"])
        # every held-out prompt (14), each sampled eval.samples_per_prompt (2) times
        assert on_disk.metrics["eval_prompts"] == 14 and is_share_of(on_disk.metrics["gold_accuracy_sampled"], 28)
        tok = AutoTokenizer.from_pretrained(r.checkpoint)
        assert tok.chat_template and tok.eos_token == "<|end|>"
    assert "reward_accuracy" in dpo.metrics and "kl_to_parent" in dpo.metrics
    start = sft.start_metrics  # the first stage evaluates its starting model, greedy: one answer per prompt
    assert start["eval_prompts"] == 14 and is_share_of(start["gold_accuracy_greedy"], 14)
    assert dpo.start_metrics == {}, "later stages start from a checkpoint already evaluated"
    before, after = _weights(sft.checkpoint), _weights(dpo.checkpoint)
    assert any(not torch.equal(before[k], after[k]) for k in before), "DPO changed no weight"
    listing = json.loads((run_dir / "pipeline.json").read_text())
    assert [s["stage"] for s in listing["results"]] == ["sft", "dpo"] and listing["recipe"] == "sft_then_dpo"


def test_rerun_skips_complete_stages_and_reruns_changed_ones(run_recipe):
    _, first = run_recipe("sft_then_dpo")
    _, again = run_recipe("sft_then_dpo")
    assert [r.checkpoint_hash for r in again] == [r.checkpoint_hash for r in first]
    assert [r.wall_seconds for r in again] == [r.wall_seconds for r in first], "skipped stages keep their record"
    _, changed = run_recipe("sft_then_dpo", "dpo.beta=0.3")
    assert changed[0].wall_seconds == first[0].wall_seconds, "sft unchanged, skipped"
    assert changed[1].inputs_hash != first[1].inputs_hash and changed[1].config["beta"] == 0.3


def test_truncated_checkpoint_is_not_trusted(run_recipe):
    _, first = run_recipe("sft")
    weights = next(p for p in __import__("pathlib").Path(first[0].checkpoint).iterdir() if p.suffix == ".safetensors")
    weights.write_bytes(weights.read_bytes()[:100])
    _, again = run_recipe("sft")
    assert again[0].inputs_hash == first[0].inputs_hash
    AutoModelForCausalLM.from_pretrained(again[0].checkpoint)  # rewritten whole


def test_failed_stage_leaves_failed_record_and_no_stale_result(run_recipe, monkeypatch, tmp_path):
    run_recipe("sft_then_dpo")

    def boom(cfg, ctx):
        raise RuntimeError("simulated crash")

    real = pipeline.runner
    monkeypatch.setattr(pipeline, "runner", lambda stage: boom if stage == "dpo" else real(stage))
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_recipe("sft_then_dpo", "dpo.beta=0.4")
    record = read_result(tmp_path / "out" / "sft_then_dpo" / "dpo")
    assert record.status == "failed" and record.checkpoint is None and "simulated crash" in record.error


def test_single_stage_dpo_recipe_starts_from_config(run_recipe, tmp_path):
    _, (sft,) = run_recipe("sft")
    stage_dir = tmp_path / "out" / "sft" / "sft"
    _, (dpo,) = run_recipe("dpo", f"dpo.init_from={stage_dir}")
    assert dpo.parent_checkpoint == sft.checkpoint and dpo.parent_checkpoint_hash == sft.checkpoint_hash


def test_real_model_and_local_data_through_from_pretrained(tmp_path, run_recipe):
    from alignment.config import ModelConfig
    from alignment.modeling.embedded import build_model, build_tokenizer

    model_dir = tmp_path / "local_model"
    tok = build_tokenizer()
    build_model(ModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64), tok).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    sft_rows = [{"prompt": f"Say {w}.", "completion": w} for w in ["cat", "dog", "sun", "sky"] * 10]
    pair_rows = [{"prompt": f"Say {w}.", "chosen": w, "rejected": w[::-1]} for w in ["cat", "dog", "sun", "sky"] * 10]
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sft_rows))
    (tmp_path / "pairs.json").write_text(json.dumps(pair_rows))
    cfg, (sft, dpo) = run_recipe(
        "sft_then_dpo", "model=hf", f"model.name_or_path={model_dir}", f"data={tmp_path / 'sft.jsonl'}", f"dpo.data_path={tmp_path / 'pairs.json'}"
    )
    assert cfg.data.path == str(tmp_path / "sft.jsonl")
    assert sft.parent_checkpoint == str(model_dir.resolve()) and sft.parent_checkpoint_hash
    assert sft.data_fingerprint.startswith("file:") and dpo.data["eval_pairs"] == 2
    assert "gold_accuracy_sampled" not in sft.metrics and sft.metrics["response_tokens_mean"] > 0
    assert "reward_accuracy" in dpo.metrics
    AutoModelForCausalLM.from_pretrained(dpo.checkpoint)


def test_command_line_runs_recipe_and_prints_table(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "alignment.run", "+recipe=sft", f"output_dir={tmp_path}", *TINY],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "gold accuracy, sampled T=1" in out.stdout and f"results: {tmp_path}/sft/pipeline.json" in out.stdout
    assert (tmp_path / "sft" / "sft" / "checkpoint" / "model.safetensors").is_file()
    assert list((tmp_path / "sft" / "hydra").iterdir()), "hydra's own output lands inside the run directory"


def test_multirun_gives_each_job_its_own_run(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "alignment.run", "+recipe=sft", f"output_dir={tmp_path}", *TINY, "sft.learning_rate=1e-3,2e-3", "--multirun"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    runs = sorted(p.name for p in tmp_path.iterdir() if (p / "pipeline.json").is_file())
    assert runs == ["sft-sft.learning_rate=0.001", "sft-sft.learning_rate=0.002"]
    rates = [read_result(tmp_path / r / "sft").config["learning_rate"] for r in runs]
    assert rates == [0.001, 0.002]


RM = ["reward.max_steps=3", "reward.global_batch_size=8", "reward.pairs.n_prompts=32"]
PPO = ["ppo.num_rollouts=2", "ppo.rollout_batch_size=16", "ppo.mini_batch_size=8", "ppo.n_prompts=64"]


def test_sft_rm_ppo_runs_and_records_both_inputs(run_recipe):
    _, (sft, reward, ppo) = run_recipe("sft_rm_ppo", *RM, *PPO)
    assert reward.parent_checkpoint == sft.checkpoint and "pairwise_accuracy" in reward.metrics
    assert ppo.parent_stage == "sft" and ppo.parent_checkpoint_hash == sft.checkpoint_hash
    assert ppo.inputs["reward_model"]["hash"] == reward.checkpoint_hash
    assert len(ppo.metrics["history"]) == 2 and "kl_to_parent" in ppo.metrics and "reward_model_score" in ppo.metrics
    for key in ("reward/raw", "kl", "kl_coef", "entropy", "loss/policy", "loss/value", "clipfrac", "approx_kl", "ratio_mean",
                "response_tokens", "eos_rate", "rollout/gold_accuracy"):
        assert key in ppo.metrics["history"][0], key
    from transformers import AutoModelForSequenceClassification

    assert AutoModelForSequenceClassification.from_pretrained(reward.checkpoint).config.num_labels == 1
    AutoModelForCausalLM.from_pretrained(ppo.checkpoint)


def test_retrained_reward_model_reruns_ppo(run_recipe):
    _, first = run_recipe("sft_rm_ppo", *RM, *PPO)
    _, second = run_recipe("sft_rm_ppo", *RM, *PPO, "reward.learning_rate=1e-3")
    assert second[0].wall_seconds == first[0].wall_seconds, "sft skipped"
    assert second[1].checkpoint_hash != first[1].checkpoint_hash
    assert second[2].inputs_hash != first[2].inputs_hash


def test_sft_rm_dpo_labels_pairs_with_the_reward_model(run_recipe):
    _, (sft, reward, dpo) = run_recipe("sft_rm_dpo", *RM)
    assert dpo.parent_stage == "sft" and dpo.inputs["reward_model"]["hash"] == reward.checkpoint_hash
    assert dpo.data["labels"] == "reward_model" and "pair_label_agreement" in dpo.metrics


def test_dpo_with_precomputed_reference_evaluates_against_the_parent(run_recipe):
    # No reference model is held while training; the evaluation loads the parent again.
    cfg, (sft, dpo) = run_recipe("sft_then_dpo", "dpo.precompute_ref_log_probs=true")
    assert dpo.status == "complete" and dpo.config["precompute_ref_log_probs"] is True
    pairs = dpo.metrics["eval_pairs"]
    assert pairs > 0 and is_share_of(dpo.metrics["reward_accuracy"], pairs) and math.isfinite(dpo.metrics["kl_to_parent"])


def test_held_out_pairs_cover_the_evaluated_prompts_only(run_recipe):
    # eval.n_prompts bounds every held-out measurement, the pairs sampled for the implicit reward
    # included (sampling all 400 held-out prompts took 12 minutes of a real model's DPO stage).
    _, (sft, dpo) = run_recipe("sft_then_dpo", "eval.n_prompts=6")
    assert dpo.data["eval"]["prompts"] == 6 and dpo.metrics["eval_prompts"] == 6
    assert dpo.data["train"]["prompts"] == 32
