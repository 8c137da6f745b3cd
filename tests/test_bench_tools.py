"""The benchmark's tools beside the step table: FLOPs counting per stage (by hand), the rollout
comparison, the per-step profile and the TRL-tuned side's configuration, on the toy model. Shape
and consistency only, never speed."""

from __future__ import annotations

import math

import pytest

from alignment.bench.flops import flops_per_token, model_shape


def _tiny_model():
    from alignment.bench.trainers import TINY_MODEL
    from alignment.modeling import embedded
    from alignment.run import compose_config

    cfg = compose_config(["+recipe=sft_then_dpo", *TINY_MODEL])
    tokenizer = embedded.build_tokenizer()
    return embedded.build_model(cfg.model, tokenizer)


def test_reward_flops_leave_out_the_embedding_lookup():
    """Reward: 6N + 12·L·d·T with N = every weight but the input embedding (a lookup; no LM head).
    N = 1000, embedding 200, L = 2, d = 8, T = 10: 6·800 + 12·2·8·10 = 4800 + 1920 = 6720."""
    assert flops_per_token("reward", n_params=800, n_layers=2, d_model=8, mean_seq_tokens=10) == 6720
    model = _tiny_model()
    total = sum(p.numel() for p in model.parameters())
    embedding = model.get_input_embeddings().weight.numel()
    assert model_shape(model, "sft")["parameters"] == total  # tied: the embedding counted once, as the LM head
    assert model_shape(model, "reward")["parameters"] == total - embedding
    assert model_shape(model, "dpo") == {"parameters": total, "n_layers": 1, "d_model": 32}


def test_rollouts_compare_both_paths_batch_by_batch(tmp_path):
    import json

    from alignment.bench.rollouts import main

    out = tmp_path / "rollouts.json"
    assert main(["--tiny", "--batches", "2", "--batch-size", "4", "--max-new-tokens", "6", "--reps", "1", "--threads", "1",
                 "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert len(result["runs"]) == 4 and {(r["batch"], r["side"]) for r in result["runs"]} == {
        (b, s) for b in (0, 1) for s in ("ours", "plain")}
    for run in result["runs"]:
        assert 1 <= run["decode_steps"] <= 6 and run["kept_tokens"] <= 4 * run["decode_steps"]
        assert math.isclose(run["ms_per_step"], 1e3 * run["seconds"] / run["decode_steps"])
    for side in ("ours", "plain"):
        assert result["summary"][side]["tokens_per_second"]["median"] > 0


@pytest.mark.integration
def test_profile_of_one_step_lists_ops(tmp_path):
    from alignment.bench.torch_profile import main

    assert main(["--tiny", "--stages", "sft", "--sides", "ours", "--rows", "5", "--threads", "1", "--out-dir", str(tmp_path)]) == 0
    text = (tmp_path / "profile_sft_ours_tiny.txt").read_text()
    assert text.startswith("# sft, ours: optimiser step 1") and "Self CPU" in text and "aten::" in text


@pytest.mark.integration
def test_trl_tuned_side_is_configured_as_claimed(tmp_path):
    from alignment.bench.trainers import bench_config, build_trainer, build_workload

    cfg = bench_config(tiny=True, dpo_sft_weight=0.0, rows_for_steps=2, overrides=[])
    workload = build_workload(cfg, work_dir=tmp_path)
    sft = build_trainer("sft", "trl_tuned", workload, max_steps=2, run_dir=tmp_path / "sft", device="cpu").args
    assert not sft.bf16 and not sft.gradient_checkpointing and sft.padding_free and sft.max_length is None
    assert sft.lr_scheduler_type.value == cfg.sft.lr_scheduler and sft.warmup_steps == cfg.sft.warmup_ratio
    assert (sft.per_device_train_batch_size, sft.gradient_accumulation_steps) == cfg.sft.split_batch(1)
    default = build_trainer("sft", "trl_default", workload, max_steps=2, run_dir=tmp_path / "d", device="cpu").args
    assert default.gradient_checkpointing and not default.padding_free  # TRL's own defaults, left alone
