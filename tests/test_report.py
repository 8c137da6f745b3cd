"""The end-of-run table lines up base, SFT and DPO columns on the same metrics."""

from __future__ import annotations

from alignment.records import StageResult
from alignment.report.table import format_table


def _r(stage, metrics, start=None):
    return StageResult(stage=stage, status="complete", checkpoint="/c", checkpoint_hash="h", parent_stage=None,
                       parent_checkpoint=None, parent_checkpoint_hash=None, data_fingerprint=None, inputs_hash="",
                       config={}, metrics=metrics, start_metrics=start or {}, wall_seconds=12.5)


def test_table_columns_and_values():
    table = format_table([
        _r("sft", {"gold_accuracy_sampled": 0.5234}, start={"gold_accuracy_sampled": 0.0}),
        _r("dpo", {"gold_accuracy_sampled": 0.61, "reward_accuracy": 0.9}),
    ])
    lines = table.splitlines()
    assert lines[0].split() == ["metric", "base", "sft", "dpo"]
    sampled = next(line for line in lines if line.startswith("gold accuracy, sampled"))
    assert sampled.split()[-3:] == ["0.000", "0.523", "0.610"]
    reward = next(line for line in lines if line.startswith("implicit reward accuracy"))
    assert reward.split()[-3:] == ["-", "-", "0.900"]
