"""Tracking: metric names, the W&B mode decision, redaction, and (integration) offline W&B runs
read back from their ``.wandb`` files: group, job type, metrics, artifact lineage, resume, an
unreachable host, and a canary secret that must appear in no file of the run.

The ``.wandb`` file is W&B's transaction log: LevelDB's log format (32 KiB blocks of
checksummed chunks) after a 7-byte ``:W&B`` header, each record a ``wandb_internal_pb2.Record``.
wandb 0.31 moved its Python reader (``wandb.sdk.internal.datastore``) into its Go core, so the
framing is read here and the records are parsed with W&B's own protobuf schema.
"""

from __future__ import annotations

import dataclasses
import http.server
import importlib.util
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from alignment.config import WandbConfig
from alignment.errors import ConfigError
from alignment.records import StageResult
from alignment.scale.preemption import Preempted
from alignment.tracking import base as tracking
from alignment.tracking import metric_names
from alignment.tracking.redaction import REDACTED, is_secret_name, redact
from alignment.tracking import wandb_run
from alignment.tracking.wandb_run import wandb_mode
from conftest import TINY

OFFLINE = ["logger=wandb", "logger.wandb.mode=offline"]
EVERY_STEP = ["sft.logging_every_n_steps=1", "dpo.logging_every_n_steps=1", "reward.logging_every_n_steps=1"]


# ---------------------------------------------------------------------------------------------
# Reading offline runs back


def wandb_records(path: Path):
    """Every record of a ``.wandb`` file, parsed with W&B's protobuf schema."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block, pos, pending = path.read_bytes(), 32768, 7, b""
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        _checksum, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:
            pos += left
            continue
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST chunk: a whole record
            record = pb.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


@dataclasses.dataclass
class OfflineRun:
    path: Path
    run: object
    config: dict
    history: list
    summary: dict
    artifacts: list
    exit_code: int | None


def read_offline_run(run_dir: Path) -> OfflineRun:
    run, config, history, summary, artifacts, exit_code = None, {}, [], {}, [], None
    for record in wandb_records(next(run_dir.glob("run-*.wandb"))):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
            config.update({item.key: json.loads(item.value_json) for item in record.run.config.update})
        elif kind == "history":
            history.append({"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in record.history.item})
        elif kind == "summary":
            summary.update({"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in record.summary.update})
        elif kind == "artifact":
            artifacts.append(record.artifact)
        elif kind == "exit":
            exit_code = record.exit.exit_code
    return OfflineRun(run_dir, run, config, history, summary, artifacts, exit_code)


def offline_runs(run_dir: Path) -> dict[str, list[OfflineRun]]:
    """The run directory's offline W&B runs by job type (stage), oldest first."""
    runs: dict[str, list[OfflineRun]] = {}
    for path in sorted((run_dir / "wandb").glob("offline-run-*")):
        run = read_offline_run(path)
        runs.setdefault(run.run.job_type, []).append(run)
    return runs


# ---------------------------------------------------------------------------------------------
# Fast tier


def test_secret_names_are_matched_by_whole_words():
    for name in ("api_key", "WANDB_API_KEY", "hfToken", "logger.wandb.api_key", "db_password", "AWS_SECRET_ACCESS_KEY", "credentials"):
        assert is_secret_name(name), name
    for name in ("max_seq_tokens", "max_new_tokens", "tokenizer_name_or_path", "exclude_keys", "keep_checkpoints", "monkey"):
        assert not is_secret_name(name), name


def test_redact_removes_keys_overrides_and_environment_values(monkeypatch):
    monkeypatch.setenv("SOME_SERVICE_TOKEN", "envcanary-0123456789")
    raw = {"logger": {"wandb": {"api_key": "cfgcanary-0123456789", "project": "p"}}, "max_seq_tokens": 128,
           "overrides": ["logger.wandb.api_key=cfgcanary-0123456789", "sft.learning_rate=1e-3"],
           "note": "path/envcanary-0123456789/x", "empty_token": None}
    clean = redact(raw)
    assert clean["logger"]["wandb"] == {"api_key": REDACTED, "project": "p"} and clean["max_seq_tokens"] == 128
    assert clean["overrides"] == [f"logger.wandb.api_key={REDACTED}", "sft.learning_rate=1e-3"]
    assert clean["note"] == f"path/{REDACTED}/x" and clean["empty_token"] is None


def _result(stage: str, parent: str | None, metrics: dict, start_metrics: dict | None = None) -> StageResult:
    return StageResult(stage=stage, status="complete", checkpoint="/x", checkpoint_hash="h", parent_stage=parent, parent_checkpoint=None,
                       parent_checkpoint_hash=None, data_fingerprint=None, inputs_hash="k", config={}, metrics=metrics,
                       start_metrics=start_metrics or {}, wall_seconds=2.0)


def test_stages_share_metric_names():
    dpo = metric_names.result_metrics(_result("dpo", "sft", {
        "gold_accuracy_sampled": 0.5, "unseen/gold_accuracy_sampled": 0.25, "family/add/gold_accuracy_greedy": 1.0,
        "kl_to_parent": 0.3, "reward_model_score": 1.5, "reward_accuracy": 0.75, "train_steps": 3, "train_loss_mean": 0.7,
        "train_loss_history": [[1, 0.7]], "stopped_early": None}))
    assert dpo == {"eval/gold_accuracy_sampled": 0.5, "eval/unseen/gold_accuracy_sampled": 0.25,
                   "eval/family/add/gold_accuracy_greedy": 1.0, "eval/kl_to_sft": 0.3, "eval/reward_mean": 1.5,
                   "dpo/reward_accuracy": 0.75, "train/steps": 3.0, "train/loss_mean": 0.7, "stage/wall_seconds": 2.0,
                   "train/step": 3.0}
    sft = metric_names.result_metrics(_result("sft", None, {"gold_accuracy_sampled": 0.4}, start_metrics={"gold_accuracy_sampled": 0.1}))
    assert sft["eval/gold_accuracy_sampled"] == 0.4 and sft["start/eval/gold_accuracy_sampled"] == 0.1
    assert metric_names.result_metrics(_result("reward", "sft", {"pairwise_accuracy": 0.9}))["reward/pairwise_accuracy"] == 0.9
    logs = metric_names.train_log_metrics("dpo", {"loss": 0.69, "grad_norm": 1.0, "rewards/margins": 0.1, "num_tokens": 100.0}, step=7)
    assert logs == {"train/loss": 0.69, "train/grad_norm": 1.0, "dpo/rewards/margins": 0.1, "train/tokens": 100.0, "train/step": 7.0}
    ppo = metric_names.rollout_metrics({"step": 2, "kl": 0.1, "grad_norm": 0.5, "rollout/gold_accuracy": 0.5, "stopped_early": "why"})
    assert ppo == {"train/step": 2.0, "ppo/kl": 0.1, "train/grad_norm": 0.5, "ppo/rollout/gold_accuracy": 0.5}


def test_run_id_is_stable_per_stage_and_inputs(tmp_path):
    assert tracking.run_id(tmp_path, "sft", "k1") == tracking.run_id(tmp_path / "." , "sft", "k1")
    assert len({tracking.run_id(tmp_path, s, k) for s in ("sft", "dpo") for k in ("k1", "k2")}) == 4


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the block ends: connections are refused


def test_mode_decision_never_prompts_and_never_waits_long(monkeypatch, tmp_path):
    def no_probe(*args, **kwargs):
        raise AssertionError("probed W&B without an API key")

    monkeypatch.setattr(wandb_run, "reachable", no_probe)
    empty_netrc = {"NETRC": str(tmp_path / "no_netrc")}
    assert wandb_mode(WandbConfig(), empty_netrc)[0] == "offline"
    assert wandb_mode(WandbConfig(), {**empty_netrc, "WANDB_MODE": "disabled", "WANDB_API_KEY": "k" * 40})[0] == "disabled"
    assert wandb_mode(WandbConfig(mode="offline"), {"WANDB_API_KEY": "k" * 40})[0] == "offline"
    assert wandb_mode(WandbConfig(mode="online"), empty_netrc)[0] == "offline", "online without a key would prompt"
    monkeypatch.undo()
    started = time.monotonic()
    mode, why = wandb_mode(WandbConfig(probe_timeout_seconds=2.0),
                                    {"WANDB_API_KEY": "k" * 40, "WANDB_BASE_URL": f"http://127.0.0.1:{_closed_port()}"})
    assert mode == "offline" and "did not answer" in why and time.monotonic() - started < 3.0


def test_logger_options_compose_and_bad_ones_fail_early():
    from alignment.run import compose_config

    assert compose_config(["+recipe=sft"]).logger.name == "auto"
    assert compose_config(["+recipe=sft", "logger=none"]).logger.name == "none"
    cfg = compose_config(["+recipe=sft", "logger=wandb", "logger.wandb.project=x", "logger.tags=[a,b]"])
    assert (cfg.logger.name, cfg.logger.wandb.project, cfg.logger.tags) == ("wandb", "x", ["a", "b"])
    with pytest.raises(ConfigError, match="logger.wandb.mode"):
        compose_config(["+recipe=sft", "logger.wandb.mode=sometimes"])
    with pytest.raises(ConfigError, match="WANDB_API_KEY"):
        compose_config(["+recipe=sft", "launcher=slurm", "logger.wandb.api_key=abcdefgh12345"])
    if importlib.util.find_spec("tensorboard") is None:
        with pytest.raises(ConfigError, match=r"alignment\[tensorboard\]"):
            compose_config(["+recipe=sft", "logger=tensorboard"])


# ---------------------------------------------------------------------------------------------
# Integration tier: offline W&B runs on a tiny model


@pytest.mark.integration
def test_offline_runs_line_up_with_group_job_type_metrics_and_lineage(run_recipe, tmp_path):
    cfg, (sft, dpo) = run_recipe("sft_then_dpo", *OFFLINE, *EVERY_STEP, "logger.tags=[smoke]")
    runs = offline_runs(tmp_path / "out" / "sft_then_dpo")
    assert sorted(runs) == ["dpo", "sft"] and all(len(r) == 1 for r in runs.values())
    (s,), (d,) = runs["sft"], runs["dpo"]
    for run, stage in ((s, "sft"), (d, "dpo")):
        assert run.run.run_group == "sft_then_dpo" and run.run.display_name == f"sft_then_dpo/{stage}"
        assert set(run.run.tags) == {"recipe:sft_then_dpo", "model:embedded", "data:suite", "smoke"}
        assert run.config["stage"] == stage and run.config["dpo"]["beta"] == cfg.dpo.beta and run.exit_code == 0
        steps = [h["train/step"] for h in run.history if "train/loss" in h]
        assert steps and steps == sorted(steps), "training loss is logged against train/step"
        for name in ("train/loss", "train/tokens_per_second", "eval/gold_accuracy_sampled", "eval/gold_accuracy_greedy", "train/step"):
            assert name in run.summary, (stage, name)
    assert d.summary["eval/kl_to_sft"] == pytest.approx(dpo.metrics["kl_to_parent"])
    assert d.summary["eval/gold_accuracy_sampled"] == pytest.approx(dpo.metrics["gold_accuracy_sampled"])
    assert "dpo/reward_accuracy" in d.summary and "dpo/rewards/margins" in d.summary
    assert "start/eval/gold_accuracy_sampled" in s.summary

    # Lineage: SFT logs its checkpoint; DPO logs the same artifact (same digest) as used, then its own.
    (sft_out,) = s.artifacts
    assert (sft_out.name, sft_out.type, sft_out.use_after_commit) == ("sft_then_dpo-sft", "model", False)
    assert json.loads(sft_out.metadata)["checkpoint_hash"] == sft.checkpoint_hash
    assert all(e.ref.startswith("file://") for e in sft_out.manifest.contents), "by reference: nothing uploaded"
    used = [a for a in d.artifacts if a.use_after_commit]
    assert [(a.name, a.digest) for a in used] == [("sft_then_dpo-sft", sft_out.digest)]
    assert [a.name for a in d.artifacts if not a.use_after_commit] == ["sft_then_dpo-dpo"]


RM = ["reward.max_steps=2", "reward.global_batch_size=8", "reward.pairs.n_prompts=32"]
PPO = ["ppo.num_rollouts=2", "ppo.rollout_batch_size=16", "ppo.mini_batch_size=8", "ppo.n_prompts=64"]


@pytest.mark.integration
def test_ppo_uses_policy_and_reward_model_and_logs_rollouts(run_recipe, tmp_path):
    run_recipe("sft_rm_ppo", *OFFLINE, *RM, *PPO, "eval.enabled=false", "eval.eval_start_model=false")
    runs = offline_runs(tmp_path / "out" / "sft_rm_ppo")
    (s,), (r,), (p,) = runs["sft"], runs["reward"], runs["ppo"]
    digest = {a.name: a.digest for run in (s, r) for a in run.artifacts if not a.use_after_commit}
    assert {(a.name, a.digest) for a in r.artifacts if a.use_after_commit} == {("sft_rm_ppo-sft", digest["sft_rm_ppo-sft"])}
    assert {(a.name, a.digest) for a in p.artifacts if a.use_after_commit} == {(n, digest[n]) for n in ("sft_rm_ppo-sft", "sft_rm_ppo-reward")}
    rollouts = [h for h in p.history if "ppo/kl" in h]
    assert [h["train/step"] for h in rollouts] == [1, 2] and all("ppo/reward/raw" in h for h in rollouts)


@pytest.mark.integration
@pytest.mark.parametrize("error, status", [(RuntimeError, "failed"), (Preempted, "preempted")])
def test_failed_stage_is_finished_as_failed_and_its_rerun_continues_the_same_run(run_recipe, monkeypatch, tmp_path, error, status):
    from alignment import pipeline

    real = pipeline.runner

    def boom(cfg, ctx):
        raise error("simulated crash")

    monkeypatch.setattr(pipeline, "runner", lambda stage: boom if stage == "sft" else real(stage))
    with pytest.raises(error, match="simulated crash"):
        run_recipe("sft", *OFFLINE)
    monkeypatch.setattr(pipeline, "runner", real)
    run_recipe("sft", *OFFLINE)
    failed, resumed = offline_runs(tmp_path / "out" / "sft")["sft"]
    assert failed.exit_code == 1 and "simulated crash" in failed.summary["error"] and failed.summary["status"] == status
    assert resumed.exit_code == 0 and resumed.run.run_id == failed.run.run_id
    run_recipe("sft", *OFFLINE, "sft.learning_rate=2e-3")
    assert len({r.run.run_id for r in offline_runs(tmp_path / "out" / "sft")["sft"]}) == 2, "other inputs: a new W&B run"


@pytest.mark.integration
def test_tensorboard_logs_the_same_names(run_recipe, tmp_path):
    pytest.importorskip("tensorboard", reason="logger=tensorboard needs pip install 'alignment[tensorboard]'")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_recipe("sft", "logger=tensorboard", *EVERY_STEP)
    events = EventAccumulator(str(tmp_path / "out" / "sft" / "tensorboard" / "sft"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4]
    assert {"eval/gold_accuracy_sampled", "train/tokens_per_second"} <= set(events.Tags()["scalars"])


@pytest.mark.integration
def test_unreachable_wandb_goes_offline_without_hanging(run_recipe, monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{_closed_port()}")
    started = time.monotonic()
    run_recipe("sft", "logger=wandb", "logger.wandb.probe_timeout_seconds=2", "eval.enabled=false", *EVERY_STEP)
    assert time.monotonic() - started < 120
    (run,) = offline_runs(tmp_path / "out" / "sft")["sft"]
    assert run.exit_code == 0 and "train/loss" in run.summary


class _Failing(http.server.BaseHTTPRequestHandler):
    def _fail(self):
        self.send_response(500)
        self.end_headers()

    do_GET = do_POST = do_HEAD = _fail

    def log_message(self, *args):
        pass


@pytest.mark.integration
def test_host_that_answers_but_fails_init_falls_back_to_offline(run_recipe, monkeypatch, tmp_path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Failing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
        run_recipe("sft", "logger=wandb", f"logger.wandb.base_url=http://127.0.0.1:{server.server_address[1]}",
                   "logger.wandb.init_timeout_seconds=3", "eval.enabled=false", *EVERY_STEP)
    finally:
        server.shutdown()
    (run,) = offline_runs(tmp_path / "out" / "sft")["sft"]
    assert run.exit_code == 0 and "train/loss" in run.summary


@pytest.mark.integration
def test_canary_secrets_reach_no_file_of_the_run(tmp_path):
    env_canary, config_canary, key_canary = "envcanary-7f3a9c2e51", "cfgcanary-4b8d0e6a17", "keycanary-" + "9" * 30
    env = {**os.environ, "ALIGNMENT_TEST_SERVICE_TOKEN": env_canary, "WANDB_API_KEY": key_canary, "HOME": str(tmp_path / "home")}
    out = subprocess.run(
        [sys.executable, "-m", "alignment.run", "+recipe=sft", f"output_dir={tmp_path / 'out'}", *TINY, *OFFLINE,
         f"logger.wandb.api_key={config_canary}", f"logger.tags=[{env_canary}]", "sft.max_steps=2", "eval.enabled=false"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    run_dir = tmp_path / "out" / "sft"
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.suffix == ".wandb" for p in files) and any(p.name == "hydra.yaml" for p in files)
    assert any(p.name == "result.json" for p in files) and (run_dir / "sft" / "result.json").is_file()
    for canary in (env_canary, config_canary, key_canary):
        leaks = [str(p) for p in files if canary.encode() in p.read_bytes()]
        assert not leaks, f"{canary} found in {leaks}"
        assert canary not in out.stdout + out.stderr
    hydra_overrides = next(run_dir.glob("hydra/*/.hydra/overrides.yaml")).read_text()
    assert f"logger.wandb.api_key={REDACTED}" in hydra_overrides
