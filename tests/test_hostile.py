"""Hostile inputs (the hardening issue): corrupted checkpoints and records, orphaned temporary
files, values that cannot work, a canary secret in a failing run. Each ends in a clear message or
a correct rerun, never a library traceback."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from alignment.errors import CheckpointError, StageError
from alignment.run import compose_config
from conftest import TINY

SFT_ONLY = ["eval.enabled=false"]


def _weights(stage) -> dict[str, torch.Tensor]:
    # Copies: load_file maps the file, and the test overwrites it in place.
    return {k: v.clone() for k, v in load_file(str(Path(stage.checkpoint) / "model.safetensors")).items()}


@pytest.mark.integration
def test_same_size_corruption_of_a_finished_checkpoint_reruns_the_stage(run_recipe, caplog):
    """100 KB of a committed model.safetensors overwritten with zeros: the file keeps its size, so
    a size check trusts it. The per-file digest does not: the stage reruns, says why, and its
    weights come out equal to the uninterrupted run's."""
    _, (first,) = run_recipe("sft", *SFT_ONLY)
    clean = _weights(first)
    path = Path(first.checkpoint) / "model.safetensors"
    size = path.stat().st_size
    with open(path, "r+b") as handle:
        handle.seek(size // 2)
        handle.write(b"\0" * min(100_000, size // 3))
    assert path.stat().st_size == size
    with caplog.at_level(logging.INFO, logger="alignment.pipeline"):
        _, (again,) = run_recipe("sft", *SFT_ONLY)
    assert "its checkpoint changed since it was recorded: model.safetensors" in caplog.text
    assert again.wall_seconds != first.wall_seconds, "the stage ran again"
    after = _weights(again)
    assert after.keys() == clean.keys() and all(torch.equal(after[k], clean[k]) for k in clean)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="alignment.pipeline"):
        _, (third,) = run_recipe("sft", *SFT_ONLY)
    assert third.wall_seconds == again.wall_seconds and "skipped: complete" in caplog.text


@pytest.mark.integration
@pytest.mark.parametrize("content, why", [(b"[]", "holds list"), (b"null", "holds NoneType"), (b"\xff\xfe{", "not UTF-8"),
                                           (b"", "not valid JSON")])
def test_a_broken_record_reruns_its_stage_and_says_why(run_recipe, caplog, content, why):
    _, (first,) = run_recipe("sft", *SFT_ONLY)
    (Path(first.checkpoint).parent / "result.json").write_bytes(content)
    with caplog.at_level(logging.INFO, logger="alignment.pipeline"):
        _, (again,) = run_recipe("sft", *SFT_ONLY)
    assert "[sft] runs: its record is unreadable" in caplog.text and why in caplog.text
    assert again.status == "complete" and again.checkpoint_hash == first.checkpoint_hash


@pytest.mark.integration
def test_every_rerun_logs_its_reason(run_recipe, caplog):
    with caplog.at_level(logging.INFO, logger="alignment.pipeline"):
        run_recipe("sft", *SFT_ONLY)
        assert "[sft] runs: no record of an earlier run" in caplog.text
        caplog.clear()
        run_recipe("sft", *SFT_ONLY, "sft.learning_rate=5e-4")
        assert "[sft] runs: inputs changed: config" in caplog.text
        caplog.clear()
        run_recipe("sft", *SFT_ONLY, "sft.learning_rate=5e-4", "data.suite.n_train=300")
    assert "[sft] runs: inputs changed: config, data" in caplog.text


@pytest.mark.integration
def test_orphaned_temporary_files_are_removed_on_the_next_run(run_recipe, tmp_path):
    stage_dir = tmp_path / "out" / "sft" / "sft"
    orphans = [stage_dir / ".checkpoint.tmp-99999", stage_dir / ".adapter.old-4242", stage_dir / ".result.json.tmp-31337"]
    orphans[0].mkdir(parents=True)
    (orphans[0] / "model.safetensors").write_bytes(b"partial")
    orphans[1].mkdir()
    orphans[2].write_bytes(b"")
    run_recipe("sft", *SFT_ONLY)
    assert not [p for p in orphans if p.exists()]
    assert not [p.name for p in stage_dir.iterdir() if p.name.startswith(".")]


@pytest.mark.integration
@pytest.mark.parametrize("where, error", [(".checkpoint.tmp-", StageError), ("checkpoint-", CheckpointError)])
def test_disk_full_in_safetensors_is_a_clear_error(run_recipe, monkeypatch, tmp_path, where, error):
    """safetensors reports ENOSPC as its own SafetensorError, which is not an OSError: at the stage
    boundary (the partial directory is removed) and in a mid-stage checkpoint (left without its
    completion marker, so a rerun ignores it)."""
    from transformers import PreTrainedModel

    real = PreTrainedModel.save_pretrained

    def full(self, directory, **kwargs):
        if where not in Path(directory).name:
            return real(self, directory, **kwargs)
        (Path(directory) / "model.safetensors").write_bytes(b"partial")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", full)
    with pytest.raises(error, match="No space left on device.*previous"):
        run_recipe("sft", *SFT_ONLY, "sft.save_every_n_steps=2")
    stage_dir = tmp_path / "out" / "sft" / "sft"
    assert not [p.name for p in stage_dir.iterdir() if p.name.startswith(".checkpoint")]


@pytest.mark.parametrize("override, key", [
    ("dpo.beta=0", "dpo.beta=0.0 must be > 0"), ("dpo.beta=-1", "dpo.beta=-1.0 must be > 0"),
    ("eval.temperature=0", "eval.temperature=0.0 must be > 0"), ("dpo.pairs.temperature=0", "dpo.pairs.temperature=0.0 must be > 0"),
    ("sft.max_seq_tokens=1", "sft.max_seq_tokens=1 cannot hold a prompt"), ("dpo.pairs.samples_per_prompt=1", "samples_per_prompt must be >= 2"),
])
def test_values_that_cannot_work_are_refused_at_compose_time(override, key):
    with pytest.raises(StageError, match=key.replace(".", r"\.").replace("(", r"\(")):
        compose_config(["+recipe=sft_then_dpo", override])


def test_ppo_temperature_zero_is_refused_before_three_models_load():
    with pytest.raises(StageError, match=r"ppo\.temperature=0\.0 must be > 0"):
        compose_config(["+recipe=sft_rm_ppo", "ppo.temperature=0"])


def test_a_canary_secret_reaches_nothing_a_failing_run_prints(tmp_path):
    """Hydra writes 'Error executing job with overrides: [...]' to stderr itself, the command line
    included; the process's own streams redact it."""
    canary = "wandbcanary-" + "7" * 28
    out = subprocess.run([sys.executable, "-m", "alignment.run", "+recipe=sft", *TINY, f"logger.wandb.api_key={canary}",
                          f"hydra.run.dir={tmp_path / 'hydra'}", "output_dir=/proc/alignment-cannot-write-here"],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path, env={**os.environ, "HOME": str(tmp_path)})
    assert out.returncode != 0
    assert "Error executing job with overrides" in out.stderr, out.stderr[-2000:]
    assert canary not in out.stdout + out.stderr and "logger.wandb.api_key=[redacted]" in out.stderr


def _read(path: Path, kind: str = "sft"):
    from alignment.data.sources import _convert, load_rows

    return _convert(load_rows(str(path), split="train"), kind=kind, source=str(path), fmt=None, columns=None)


def _jsonl(path: Path, rows) -> Path:
    import json

    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize("bad, field", [(5, "int"), ([1, 2], "list"), ({"a": 1}, "dict"), (None, "NoneType"), (True, "bool")])
def test_a_bad_value_in_a_mixed_column_is_reported_at_its_own_row(tmp_path, bad, field):
    """datasets cast a column to one type over the whole file and reported a bad value at row 4 as row 0."""
    from alignment.errors import DataError

    rows = [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(4)] + [{"prompt": "p4", "completion": bad}]
    with pytest.raises(DataError, match=r"mixed\.jsonl, row 4: key 'completion"):
        _read(_jsonl(tmp_path / "mixed.jsonl", rows))


def test_strings_and_message_lists_in_one_column_load_as_written(tmp_path):
    """The README's mixed file: chosen a string in one row and a message list in another, and
    number-like answers that must stay strings."""
    rows = [{"prompt": "Add: 2 2", "chosen": "4", "rejected": "5"},
            {"prompt": "Say 12", "chosen": [{"role": "assistant", "content": "12"}], "rejected": [{"role": "assistant", "content": "21"}]}]
    out, counts = _read(_jsonl(tmp_path / "prefs.jsonl", rows), kind="preference")
    assert [r["chosen"][0]["content"] for r in out] == ["4", "12"] and counts == {"format:explicit": 2}


@pytest.mark.parametrize("content, message", [
    (b"", "is an empty file"), (b"  \n\n", "is an empty file"),
    (b'[\n{"prompt": "a", "completion": "b"},\n{"prompt": "a" "completion": "b"}\n]', r"line 3, column 16: invalid JSON"),
    (b'{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": "b"}\n{"prompt": \n', r"line 3, column 12: invalid JSON"),
    (b'{"prompt": "a", "completion": "b"}\n{"prompt": "caf\xe9", "completion": "b"}\n', r"line 2: byte 0xe9 is not UTF-8"),
    (b'[{"prompt": "a", "completion": "b"}, 7]', r"row 1: a row must be a JSON object"),
    (b'"just a string"', r"line 1: a row must be a JSON object"),
])
def test_unreadable_json_files_say_where_and_why(tmp_path, content, message):
    from alignment.errors import DataError

    path = tmp_path / "data.jsonl"
    path.write_bytes(content)
    with pytest.raises(DataError, match=message):
        _read(path)


def test_a_directory_is_called_a_directory(tmp_path):
    from alignment.errors import DataError

    (tmp_path / "data.jsonl").mkdir()
    with pytest.raises(DataError, match="is a directory"):
        _read(tmp_path / "data.jsonl")
    with pytest.raises(StageError, match="is a directory, not a file"):
        compose_config(["+recipe=sft", f"data={tmp_path / 'data.jsonl'}"])


def _broken_copy(tmp_path: Path, how: str) -> Path:
    """stories260K with one thing broken (``how``)."""
    import json
    import shutil

    from conftest import shared

    model = tmp_path / how
    shutil.copytree(shared("models", "stories260K"), model)
    for path in model.iterdir():
        path.chmod(0o644)
    config = json.loads((model / "config.json").read_text())
    if how == "no_model_type":
        (model / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    elif how == "bad_config_value":
        (model / "config.json").write_text(json.dumps({**config, "hidden_size": "wide"}))
    elif how == "bad_tokenizer":
        (model / "tokenizer.json").write_text('{"version": "1.0", "model": 7}')
        (model / "tokenizer.model").unlink()
    elif how == "truncated_weights":
        with open(model / "model.safetensors", "r+b") as handle:
            handle.truncate(1000)
    return model


@pytest.mark.integration
@pytest.mark.parametrize("how, cause", [("no_model_type", "ValueError"), ("bad_config_value", "hidden_size"),
                                        ("bad_tokenizer", "KeyError"), ("truncated_weights", "SafetensorError")])
def test_a_broken_model_directory_is_named_not_a_library_traceback(tmp_path, run_recipe, how, cause):
    model = _broken_copy(tmp_path, how)
    with pytest.raises(StageError, match=f"could not load a (model|tokenizer) from '{model}'.*{cause}.*model.name_or_path"):
        run_recipe("sft", "model=hf", f"model.name_or_path={model}", "eval.enabled=false")


def test_config_and_data_errors_exit_2_with_one_line(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    for args in (["+recipe=sft_then_dpo", "dpo.beta=-1"], ["+recipe=sft_then_dpo", "dpo.betta=0.2"], ["+recipe=sft", f"data={empty}"]):
        out = subprocess.run([sys.executable, "-m", "alignment.run", *args, *TINY, f"output_dir={tmp_path / 'out'}"],
                             capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert out.returncode == 2, (args, out.stderr[-1500:])
        assert "Traceback" not in out.stderr, (args, out.stderr[-1500:])
    assert f"data file {empty} is an empty file" in out.stderr
