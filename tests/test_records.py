"""Atomic writes, checkpoint commit and hashing: a record never points at half-written weights."""

from __future__ import annotations

import json

import pytest

from alignment.records import (
    StageResult,
    UnreadableRecord,
    atomic_write_json,
    commit_checkpoint,
    hash_directory,
    inputs_hash,
    new_checkpoint_dir,
    read_result,
)


def _result(**kw) -> StageResult:
    base = dict(stage="sft", status="complete", checkpoint="/c", checkpoint_hash="h", parent_stage=None,
                parent_checkpoint=None, parent_checkpoint_hash=None, data_fingerprint="d", inputs_hash="i", config={})
    return StageResult(**{**base, **kw})


def test_result_round_trip(tmp_path):
    atomic_write_json(tmp_path / "result.json", _result(metrics={"a": 1.0}).to_dict())
    back = read_result(tmp_path)
    assert back == _result(metrics={"a": 1.0})
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary file left behind"


@pytest.mark.parametrize("content, why", [(b'{"stage": "sft", "stat', "not valid JSON (line 1"), (b"[]", "holds list"),
                                           (b"null", "holds NoneType"), (b'{"stage": "sft", "status": "complete"}', "lacks fields"),
                                           (b'{"stage": "\xff\xfe"}', "not UTF-8 text (byte 11)")])
def test_unreadable_result_names_the_file_and_why(tmp_path, content, why):
    (tmp_path / "result.json").write_bytes(content)  # a torn write, another tool's file, stray bytes
    with pytest.raises(UnreadableRecord) as err:
        read_result(tmp_path)
    assert str(tmp_path / "result.json") in str(err.value) and why in str(err.value)


def test_hash_changes_with_content_and_names(tmp_path):
    (tmp_path / "a").write_bytes(b"1")
    first = hash_directory(tmp_path)
    assert hash_directory(tmp_path) == first
    (tmp_path / "a").write_bytes(b"2")
    assert hash_directory(tmp_path) != first
    (tmp_path / "a").rename(tmp_path / "b")
    assert len({first, hash_directory(tmp_path)}) == 2


def test_commit_replaces_old_checkpoint_whole(tmp_path):
    old = new_checkpoint_dir(tmp_path)
    (old / "weights").write_text("old")
    final = commit_checkpoint(old, tmp_path)
    new = new_checkpoint_dir(tmp_path)
    (new / "weights").write_text("new")
    assert (final / "weights").read_text() == "old", "the old checkpoint stays until the new one is complete"
    commit_checkpoint(new, tmp_path)
    assert (final / "weights").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]


def test_inputs_hash_depends_on_each_input():
    base = dict(config={"lr": 1}, parent_hash="p", parent_ref="/x", data_fingerprint="d")
    h = inputs_hash(**base)
    for key, value in [("config", {"lr": 2}), ("parent_hash", "q"), ("parent_ref", "/y"), ("data_fingerprint", "e")]:
        assert inputs_hash(**{**base, key: value}) != h, key
    assert json.dumps(h)


def test_a_base_models_hash_is_read_once_and_follows_its_files(tmp_path, monkeypatch):
    """The cached hash equals the full hash; a second call reads no file content (its key is
    sizes and mtimes); a rewritten file gives a new, correct hash."""
    import os

    from alignment import records

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"x" * 1000)
    first = records.cached_directory_hash(model)
    assert first == records.hash_directory(model)
    reads = []
    monkeypatch.setattr(records, "hash_directory", lambda *a, **k: reads.append(a) or "recomputed")
    assert records.cached_directory_hash(model) == first and reads == []
    (model / "model.safetensors").write_bytes(b"y" * 1000)
    os.utime(model / "model.safetensors", ns=(1, 1))  # a new mtime even on a coarse clock
    assert records.cached_directory_hash(model) == "recomputed" and len(reads) == 1
    assert sorted(p.name for p in model.iterdir()) == ["config.json", "model.safetensors"]  # nothing written beside the weights
