"""The run report: report.md's table and the PNG plots, from hand-written run directories and a tiny real run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

from alignment.report import markdown as report_md
from alignment.report.markdown import main, write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PLOT_FILES = ("training_loss.png", "eval_metrics.png", "ppo_reward_vs_kl.png", "ppo_rollouts.png")

EVAL = {"gold_accuracy_greedy": 0.5, "gold_accuracy_sampled": 0.4, "seen/gold_accuracy_sampled": 0.45,
        "unseen/gold_accuracy_sampled": 0.35, "response_tokens_mean": 6.0, "eos_rate": 0.9}
SFT = {**EVAL, "train_loss_final": 1.2, "train_loss_history": [[1, 2.0], [2, 1.5], [3, 1.2]]}
DPO = {**EVAL, "gold_accuracy_sampled": 0.6, "reward_accuracy": 0.7, "kl_to_parent": 0.3, "train_loss_history": [[1, 0.69], [2, 0.6]]}
PPO = {**EVAL, "kl_to_parent": 0.1, "reward_model_score": 0.8, "final/rollout/gold_accuracy": 0.5,
       "history": [{"step": s, "reward/raw": 0.1 * s, "reward/normalised": 0.2 * s - 0.3, "kl": 0.01 * s, "kl_coef": 0.05,
                    "entropy": 3.0 - 0.1 * s, "rollout/gold_accuracy": 0.1 * s, "loss/policy": -0.01 * s, "loss/value": 0.3 / s}
                   for s in (1, 2, 3)]}


def _record(stage: str, status: str, metrics: dict, *, start: dict | None = None, parent: str | None = None, error: str | None = None) -> dict:
    return {"stage": stage, "status": status, "checkpoint": f"/ckpt/{stage}" if status == "complete" else None,
            "checkpoint_hash": f"hash-{stage}" if status == "complete" else None, "parent_stage": parent,
            "parent_checkpoint": None, "parent_checkpoint_hash": None, "data_fingerprint": None, "inputs_hash": "k",
            "config": {}, "metrics": metrics, "start_metrics": start or {}, "wall_seconds": 10.0, "error": error}


def _fake_run(root: Path, name: str, records: list[dict], *, planned: list[str] | None = None) -> Path:
    """A run directory as the pipeline leaves it: pipeline.json lists the stages that finished."""
    run_dir = root / name
    for record in records:
        (run_dir / record["stage"]).mkdir(parents=True)
        (run_dir / record["stage"] / "result.json").write_text(json.dumps(record))
    finished = [r["status"] == "complete" for r in records] + [False]
    listed = records[: finished.index(False)]
    pipeline = {"run_name": name, "recipe": name, "stages": planned or [r["stage"] for r in records],
                "results": [{"stage": r["stage"], "status": r["status"], "skipped": False, "checkpoint": r["checkpoint"],
                             "checkpoint_hash": r["checkpoint_hash"], "parent_stage": r["parent_stage"],
                             "wall_seconds": r["wall_seconds"], "metrics": r["metrics"]} for r in listed]}
    (run_dir / "pipeline.json").write_text(json.dumps(pipeline))
    return run_dir


def _assert_real_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_SIGNATURE, path
    image = imread(path)
    assert image.size > 0 and len(np.unique(image)) > 1, f"{path} is blank"


def _table(markdown: str) -> list[list[str]]:
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in markdown.splitlines() if line.startswith("|")]


def test_one_run_table_and_plots(tmp_path):
    run_dir = _fake_run(tmp_path, "sft_then_dpo", [_record("sft", "complete", SFT, start={**EVAL, "gold_accuracy_sampled": 0.0}),
                                                   _record("dpo", "complete", DPO, parent="sft")])
    path = write_report([run_dir])
    assert path == run_dir / "report" / "report.md"
    text = path.read_text()
    table = _table(text)
    assert table[0] == ["metric", "base", "sft", "dpo"]
    assert next(row for row in table if row[0] == "gold accuracy, sampled T=1")[1:] == ["0.000", "0.400", "0.600"]
    assert next(row for row in table if row[0] == "implicit reward accuracy")[1:] == ["-", "-", "0.700"]
    for name in ("training_loss.png", "eval_metrics.png"):
        assert f"({name})" in text
        _assert_real_png(path.parent / name)
    # No PPO stage: its plots are skipped with a line that says so, and no stale file is left.
    assert text.count("Not drawn: no PPO stage") == 2
    assert not (path.parent / "ppo_reward_vs_kl.png").exists() and "ppo_rollouts.png" not in text


def test_two_runs_side_by_side_with_ppo(tmp_path, capsys):
    dpo_run = _fake_run(tmp_path, "run_a", [_record("sft", "complete", SFT, start=EVAL), _record("dpo", "complete", DPO, parent="sft")])
    ppo_run = _fake_run(tmp_path, "run_b", [_record("sft", "complete", SFT, start=EVAL), _record("ppo", "complete", PPO, parent="sft")])
    out = tmp_path / "cmp"
    assert main([str(dpo_run), str(ppo_run), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == f"report: {out / 'report.md'}"
    text = (out / "report.md").read_text()
    table = _table(text)
    assert table[0] == ["metric", "run_a/base", "run_a/sft", "run_a/dpo", "run_b/base", "run_b/sft", "run_b/ppo"]
    assert next(row for row in table if row[0] == "KL to parent (nats/response)")[1:] == ["-", "-", "0.300", "-", "-", "0.100"]
    for name in PLOT_FILES:
        assert f"({name})" in text
        _assert_real_png(out / name)


def test_failed_stage_is_named_and_later_stages_not_run(tmp_path):
    # sft finished, dpo failed in this command, and ppo's record is left from an older command.
    run_dir = _fake_run(tmp_path, "r", [_record("sft", "complete", SFT, start=EVAL),
                                        _record("dpo", "failed", {}, parent="sft", error="RuntimeError: out of memory | oops"),
                                        _record("ppo", "complete", PPO, parent="dpo")])
    text = write_report([run_dir]).read_text()
    table = _table(text)
    assert table[0] == ["metric", "base", "sft", "dpo (failed)", "ppo (not run)"]
    assert next(row for row in table if row[0] == "wall seconds")[1:] == ["-", "10.0", "10.0", "-"]
    assert "- `dpo`: failed: RuntimeError: out of memory \\| oops" in text and "- `ppo`: not run" in text
    _assert_real_png(run_dir / "report" / "training_loss.png")
    assert text.count("Not drawn: no PPO stage with logged rollouts") == 2


def test_preempted_first_stage_renders_without_plots(tmp_path):
    run_dir = _fake_run(tmp_path, "r", [_record("sft", "preempted", {})], planned=["sft", "dpo"])
    text = write_report([run_dir]).read_text()
    assert _table(text)[0] == ["metric", "sft (preempted)", "dpo (not run)"]
    assert "Not drawn: no stage logged a training loss" in text and "Not drawn: no stage has held-out evaluation metrics" in text


def test_a_broken_plot_leaves_the_rest(tmp_path, monkeypatch):
    def broken(runs, path):
        raise ValueError("bad data")

    monkeypatch.setattr(report_md, "PLOTS", ((("training_loss.png", "Training loss", broken, "")),) + report_md.PLOTS[1:])
    run_dir = _fake_run(tmp_path, "r", [_record("sft", "complete", SFT, start=EVAL)])
    text = write_report([run_dir]).read_text()
    assert "Not drawn: drawing it failed (ValueError: bad data)." in text
    _assert_real_png(run_dir / "report" / "eval_metrics.png")


def test_directory_without_pipeline_json_exits_1(tmp_path):
    out = subprocess.run([sys.executable, "-m", "alignment.report", str(tmp_path)], capture_output=True, text=True)
    assert out.returncode == 1
    assert f"{tmp_path / 'pipeline.json'}: no such file" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.integration
def test_report_from_a_finished_ppo_run(run_recipe, tmp_path, capsys):
    cfg, _ = run_recipe("sft_rm_ppo", "ppo.num_rollouts=3", "ppo.rollout_batch_size=16", "ppo.mini_batch_size=8", "ppo.n_prompts=64",
                        "reward.max_steps=3", "reward.global_batch_size=8", "reward.pairs.n_prompts=32", "sft.logging_every_n_steps=1")
    report = Path(cfg.output_dir).resolve() / cfg.run_name / "report" / "report.md"
    assert f"report: {report}" in capsys.readouterr().out
    text = report.read_text()
    assert _table(text)[0] == ["metric", "base", "sft", "reward", "ppo"]
    for name in PLOT_FILES:
        assert f"({name})" in text
        _assert_real_png(report.parent / name)


@pytest.mark.integration
def test_a_failing_report_does_not_fail_the_run(run_recipe, monkeypatch, caplog):
    def broken(run_dirs):
        raise OSError("disk full")

    monkeypatch.setattr("alignment.pipeline.write_report", broken)
    _, results = run_recipe("sft")
    assert [r.status for r in results] == ["complete"]
    assert "report not written: OSError: disk full" in caplog.text
