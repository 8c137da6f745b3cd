"""The private TRL/transformers internals we rely on: present in the tested versions, and a missing
one is reported at start-up with what it costs, instead of a silently lost speed-up."""

from __future__ import annotations

import trl.trainer.utils

from alignment import compat
from alignment.run import compose_config


def test_every_internal_is_present_in_the_tested_versions():
    cfg = compose_config(["+recipe=sft_rm_ppo", "deepspeed=zero3"])
    assert compat.missing(cfg) == []


def test_a_missing_switch_is_reported_with_what_is_lost(monkeypatch):
    monkeypatch.delattr(trl.trainer.utils, "_use_triton")
    problems = compat.missing(compose_config(["+recipe=sft_then_dpo"]))
    assert len(problems) == 1 and "trl.trainer.utils._use_triton" in problems[0] and "scores every prompt" in problems[0]
    assert compat.missing(compose_config(["+recipe=reward", "reward.init_from=/x"])) == [], "no SFT or DPO stage: not needed"


def test_a_renamed_fused_forward_is_reported(monkeypatch):
    monkeypatch.setattr(compat, "FUSED_FORWARD_NAME", "_renamed_forward")
    assert any("fused forward" in p and "compact LM head" in p for p in compat.missing(compose_config(["+recipe=sft"])))
