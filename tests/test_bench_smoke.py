"""A smoke of the benchmark (``python -m alignment.bench``): one repetition of every stage at
tiny sizes, each run in its own process, and a short PPO run. It checks the report's shape, that
ours and TRL's default agree on the first step's loss (DPO at TRL's objective, the benchmark's
default), and that PPO's phases add up, not any speed: timings of a few tiny steps on a busy
machine mean nothing.

Loss tolerance: alignment.bench.LOSS_RTOL (2% of max(1, |loss|)), because TRL's default trains
under bf16 autocast and ours in float32; seen apart by ~1e-4 on the tiny model.
"""

from __future__ import annotations

import json
import math

import pytest

from alignment.bench.__main__ import LOSS_RTOL, main


@pytest.mark.integration
def test_bench_smoke_writes_comparable_numbers(tmp_path):
    out = tmp_path / "bench.json"
    assert main(["--tiny", "--reps", "1", "--steps", "2", "--warmup", "1", "--threads", "1", "--parts", "steps", "ppo",
                 "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [s["stage"] for s in report["stages"]] == ["sft", "reward", "dpo"]
    assert len(report["runs"]) == 6 and {r["side"] for r in report["runs"]} == {"ours", "trl"}
    for stage in report["stages"]:
        for key in ("min", "median", "max"):
            ratio = stage["ratio_ours_over_trl"][key]
            assert math.isfinite(ratio) and ratio > 0, (stage["stage"], key, ratio)
            for side in ("ours", "trl"):
                assert stage["tokens_per_second"][side][key] > 0
                assert math.isfinite(stage["peak_memory_mb"][side][key])
    by_stage = {s["stage"]: s for s in report["stages"]}
    for name in ("sft", "reward", "dpo"):
        loss = by_stage[name]["first_loss"]
        assert abs(loss["ours"] - loss["trl"]) <= LOSS_RTOL * max(1.0, abs(loss["trl"])), (name, loss)
        assert by_stage[name]["loss_match"] == "yes"
    assert abs(by_stage["dpo"]["first_loss"]["ours"] - math.log(2)) < 1e-3  # policy == reference at step 0
    ppo = report["ppo"]
    assert ppo["rollouts"] == 2
    assert sum(p["share_of_step"] for p in ppo["phases"].values()) == pytest.approx(1.0)
    for phase in ("generation", "scoring", "training"):
        assert ppo["phases"][phase]["seconds_median"] > 0 and ppo["phases"][phase]["tokens_per_second"] > 0


def test_dpo_with_the_rpo_term_is_not_compared_on_loss():
    from alignment.bench.trainers import bench_config, same_objective

    def cfg(weight):
        return bench_config(tiny=True, dpo_sft_weight=weight, rows_for_steps=1, overrides=[])

    assert same_objective("dpo", cfg(0.0)) and not same_objective("dpo", cfg(0.2))
