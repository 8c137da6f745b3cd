"""Data files go through the real datasets.load_dataset code; bad rows name the file and row."""

from __future__ import annotations

import json

import pytest

from alignment.config import DataConfig
from alignment.data.sources import load_rows
from alignment.data.stage_data import preference_file_data, sft_data
from alignment.errors import DataError


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_suite_sft_data_is_conversational_with_held_out_split():
    data = sft_data(DataConfig(), data_path=None, seed=0)
    first = data.train[0]["messages"]
    assert [m["role"] for m in first] == ["user", "assistant"]
    assert data.held_out.examples and data.held_out.unseen
    assert data.held_out.unseen < set(data.held_out.examples)
    assert data.fingerprint.startswith("suite:")


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "parquet"])
def test_local_formats_load(tmp_path, fmt):
    rows = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(20)]
    path = tmp_path / f"d.{fmt}"
    if fmt == "jsonl":
        _jsonl(path, rows)
    elif fmt == "json":
        path.write_text(json.dumps(rows))
    else:
        import pandas as pd

        frame = pd.DataFrame(rows)
        frame.to_csv(path, index=False) if fmt == "csv" else frame.to_parquet(path)
    assert load_rows(str(path), split="train") == rows


def test_sft_file_rows_become_messages_and_split(tmp_path):
    rows = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(41)]
    data = sft_data(DataConfig(eval_fraction=0.1), data_path=_jsonl(tmp_path / "s.jsonl", rows), seed=0)
    assert len(data.train) + len(data.held_out.prompts) == 41
    assert len(data.held_out.prompts) == 4
    assert all(m["messages"][-1]["role"] == "assistant" for m in data.train)
    assert data.counts["rows_read"] == 41 and data.counts["format:prompt_completion"] == 41


def test_bad_sft_row_names_file_and_row(tmp_path):
    """The format is detected from the first row; a later row of another shape is named."""
    path = _jsonl(tmp_path / "bad.jsonl", [{"prompt": "q", "completion": "a"}, {"question": "q", "answer": "a"}])
    with pytest.raises(DataError, match=r"bad\.jsonl, row 1: key 'prompt' is missing"):
        sft_data(DataConfig(), data_path=path, seed=0)


def test_column_mapping_reads_other_names(tmp_path):
    path = _jsonl(tmp_path / "qa.jsonl", [{"question": f"q{i}", "answer": f"a{i}"} for i in range(20)])
    data = sft_data(DataConfig(columns={"prompt": "question", "completion": "answer"}), data_path=path, seed=0)
    assert data.train[0]["messages"][-1] == {"role": "assistant", "content": data.train[0]["messages"][-1]["content"]}
    assert data.counts["format:columns"] == 20


def test_preference_rows_and_missing_key(tmp_path):
    good = [{"prompt": f"q{i}", "chosen": "good", "rejected": "bad"} for i in range(20)]
    data = preference_file_data(DataConfig(eval_fraction=0.1), path=_jsonl(tmp_path / "p.jsonl", good), seed=0)
    assert data.train[0]["chosen"] == [{"role": "assistant", "content": "good"}]
    assert data.eval_pairs is not None and len(data.eval_pairs) == 2
    bad = _jsonl(tmp_path / "p2.jsonl", [{"prompt": "q", "chosen": "c"}])
    with pytest.raises(DataError, match=r"p2\.jsonl, row 0: no preference format fits a row with keys \['chosen', 'prompt'\]"):
        preference_file_data(DataConfig(), path=bad, seed=0)


def test_missing_file_and_offline_name_are_clear(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_rows(str(tmp_path / "nope.jsonl"), split="train")
    with pytest.raises(DataError, match="Offline, only local files work"):
        load_rows("some-org/some-dataset-that-is-not-here", split="train")


def test_mixture_of_sources_realises_weights_and_records_them(tmp_path):
    from alignment.config import SourceConfig

    a = _jsonl(tmp_path / "a.jsonl", [{"prompt": f"a{i}", "completion": "x"} for i in range(30)])
    (tmp_path / "b.json").write_text(json.dumps([{"instruction": f"b{i}", "output": "y"} for i in range(5)]))
    cfg = DataConfig(sources=[SourceConfig(path=a, weight=0.75), SourceConfig(path=str(tmp_path / "b.json"), weight=0.25)],
                     mixture_size=40, eval_fraction=0.0)
    data = sft_data(cfg, data_path=None, seed=0)
    mixture = data.counts["mixture"]
    assert mixture[a]["rows_taken"] == 30 and mixture[str(tmp_path / "b.json")]["rows_taken"] == 10
    assert mixture[str(tmp_path / "b.json")]["oversampled"] == 5, "5 rows asked beyond the 5 available"
    assert data.counts["format:prompt_completion"] == 30 and data.counts["format:alpaca"] == 5
    assert len(data.train) == 40
    firsts = [row["messages"][0]["content"] for row in data.train]
    assert sum(f.startswith("b") for f in firsts) == 10


def test_sources_compose_from_the_command_line(tmp_path):
    from alignment.run import compose_config

    a = _jsonl(tmp_path / "a.jsonl", [{"prompt": "q", "completion": "x"}])
    cfg = compose_config(["+recipe=sft", f"data.sources=[{{path: {a}, weight: 0.7}}, {{path: {a}, weight: 0.3}}]"])
    assert [s.weight for s in cfg.data.sources] == [0.7, 0.3]
    with pytest.raises(Exception, match="no such file"):
        compose_config(["+recipe=sft", f"data.sources=[{{path: {tmp_path}/missing.jsonl}}]"])


def test_a_stage_can_have_its_own_mixture(tmp_path):
    from alignment.config import DPOConfig, SourceConfig
    from alignment.data.sources import MIXTURE, stage_data, stage_source

    a = _jsonl(tmp_path / "a.jsonl", [{"prompt": "q", "chosen": "c", "rejected": "r"}])
    shared = DataConfig(path=str(tmp_path / "sft.jsonl"))
    dpo = DPOConfig(data_sources=[SourceConfig(path=a, weight=1.0)])
    data_cfg = stage_data(shared, dpo)
    assert stage_source(data_cfg, dpo.data_path) == MIXTURE and data_cfg.sources[0].path == a
    assert stage_source(stage_data(shared, DPOConfig()), None) == shared.path, "other stages keep the shared data"


def test_ppo_prompt_files_are_checked_like_every_file(tmp_path):
    """Empty prompts are dropped and counted; an over-long prompt follows data.over_length."""
    from alignment.config import PPOConfig
    from alignment.data.stage_data import prompt_data
    from alignment.modeling.embedded import build_tokenizer

    rows = [{"prompt": f"say {i}"} for i in range(8)] + [{"prompt": "   "}, {"prompt": "x" * 300}]
    path = _jsonl(tmp_path / "prompts.jsonl", rows)
    ppo = PPOConfig(data_path=path, rollout_batch_size=4, max_prompt_tokens=64)
    sizes = {"stage": "ppo", "n_prompts": ppo.n_prompts, "max_prompt_tokens": 64, "min_prompts": 4}
    messages, examples, data = prompt_data(DataConfig(), ppo, **sizes, seed=0, tokenizer=build_tokenizer())
    checks = data.counts["checks"]
    assert checks["dropped"] == {"empty_prompt": 1} and checks["truncated"] == 1 and len(messages) == 9
    assert examples == [None] * 9, "a file has no verifier"
    with pytest.raises(DataError, match=r"prompts.jsonl, row 9: \d+ tokens, more than max_prompt_tokens=64"):
        prompt_data(DataConfig(over_length="error"), ppo, **sizes, seed=0, tokenizer=build_tokenizer())
