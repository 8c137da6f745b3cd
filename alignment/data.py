"""Training and held-out data for each stage, from the built-in suite or from a dataset file.

Suite data comes with exact verifiers (gold accuracy). File data goes through the real
``datasets.load_dataset`` code: local ``.json``/``.jsonl``/``.parquet``/``.csv`` files or a
dataset name (which needs the network). Rows are converted once by ``alignment.formats`` (chat
messages, prompt/completion, Alpaca, ShareGPT, TRL explicit/implicit preference, HH-RLHF,
UltraFeedback, ShareGPT preference, or a column mapping) to TRL's conversational form:

- SFT: ``{"messages": [...]}``;
- preference (reward model, DPO): ``{"prompt": [...], "chosen": [...], "rejected": [...]}``;
- prompts (PPO): ``{"prompt": [...]}``.

A row that fits no shape stops the run with the file, the row number and the fix.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from datasets import Dataset

from alignment.config import DataConfig, SuiteConfig
from alignment.evaluate import example_split, user_turn
from alignment.formats import FormatError, convert_rows
from alignment.suite import Example, Suite, build_suite, chatter, suite_fingerprint

log = logging.getLogger(__name__)
_LOCAL_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


MIXTURE = "<mixture of data sources>"


def stage_data(cfg: DataConfig, stage_cfg: Any) -> DataConfig:
    """The data config a stage reads: ``<stage>.data_sources`` (a mixture for that stage)
    replaces data.path and data.sources; otherwise the shared one."""
    if getattr(stage_cfg, "data_sources", None):
        return dataclasses.replace(cfg, path=None, sources=list(stage_cfg.data_sources))
    return cfg


def stage_source(cfg: DataConfig, data_path: Optional[str]) -> Optional[str]:
    """What a stage reads: its own data_path, data.path, the data.sources mixture, or None for
    the built-in task suite."""
    return data_path or cfg.path or (MIXTURE if cfg.sources else None)


class DataError(ValueError):
    """Bad or missing data; the message names the file and row and says how to fix it."""


@dataclass
class HeldOut:
    """What a stage is evaluated on: verified suite examples, or plain prompts from a file."""

    examples: list[Example] = field(default_factory=list)
    unseen: frozenset[Example] = frozenset()
    prompts: list[list[dict[str, str]]] = field(default_factory=list)


@dataclass
class StageData:
    train: Dataset
    held_out: HeldOut
    fingerprint: str
    counts: dict[str, Any]
    eval_pairs: Optional[Dataset] = None  # DPO: held-out preference pairs


_SUITES: dict[tuple, Suite] = {}


def load_suite(cfg: SuiteConfig) -> Suite:
    """Build (once per process) the suite the config describes."""
    key = (cfg.seed, cfg.n_train, cfg.n_eval, tuple(cfg.families or ()))
    if key not in _SUITES:
        _SUITES[key] = build_suite(seed=cfg.seed, n_train=cfg.n_train, n_eval=cfg.n_eval, families=cfg.families or None)
    return _SUITES[key]


def suite_demonstrations(suite: Suite, *, chatter_rate: float, seed: int) -> tuple[list[dict[str, Any]], int]:
    """SFT rows for the suite's training prompts; a share ``chatter_rate`` wraps the answer in
    filler (drawn with its own RNG, so which rows are chatty is reproducible)."""
    rng = random.Random(f"demo-chatter:{seed}")
    rows, n_chatty = [], 0
    for example in suite.train:
        answer = example.answer
        if rng.random() < chatter_rate:
            answer, n_chatty = chatter(example, rng), n_chatty + 1
        rows.append({"messages": user_turn(example.prompt) + [{"role": "assistant", "content": answer}]})
    return rows, n_chatty


def suite_held_out(suite: Suite) -> HeldOut:
    return HeldOut(examples=example_split(suite.eval_seen, suite.eval_unseen), unseen=frozenset(suite.eval_unseen))


def sft_data(cfg: DataConfig, *, data_path: Optional[str], seed: int, tokenizer=None, max_seq_tokens: int = 0) -> StageData:
    """SFT rows; file rows are converted and, given a tokenizer, checked (alignment.checks)."""
    path = stage_source(cfg, data_path)
    if path is None:
        suite = load_suite(cfg.suite)
        rows, n_chatty = suite_demonstrations(suite, chatter_rate=cfg.suite.demo_chatter_rate, seed=cfg.suite.seed)
        return StageData(
            train=Dataset.from_list(rows),
            held_out=suite_held_out(suite),
            fingerprint=f"suite:{suite_fingerprint(suite)}:chatter={cfg.suite.demo_chatter_rate}",
            counts={"source": "suite", "rows": len(rows), "chatty_demonstrations": n_chatty},
        )
    rows, train, held, counts = _checked_file_rows(cfg, path=path, kind="sft", seed=seed, tokenizer=tokenizer, max_seq_tokens=max_seq_tokens)
    return StageData(
        train=Dataset.from_list(train),
        held_out=HeldOut(prompts=[r["messages"][:-1] for r in held]),
        fingerprint=f"file:{fingerprint_rows(rows)}",
        counts=counts,
    )


def preference_file_data(cfg: DataConfig, *, path: str, seed: int, tokenizer=None, max_seq_tokens: int = 0) -> StageData:
    """Preference pairs from a file; given a tokenizer, degenerate pairs are dropped and counted."""
    rows, train, held, counts = _checked_file_rows(cfg, path=path, kind="preference", seed=seed, tokenizer=tokenizer,
                                                   max_seq_tokens=max_seq_tokens)
    return StageData(
        train=Dataset.from_list(train),
        held_out=HeldOut(prompts=[r["prompt"] for r in held]),
        fingerprint=f"file:{fingerprint_rows(rows)}",
        counts=counts,
        eval_pairs=Dataset.from_list(held) if held else None,
    )


def _checked_file_rows(cfg: DataConfig, *, path: str, kind: str, seed: int, tokenizer, max_seq_tokens: int):
    """Converted rows, checked when a tokenizer is given, split into train and held-out."""
    rows, formats = _converted(cfg, path=path, kind=kind, seed=seed)
    if tokenizer is not None:
        from alignment.checks import check_preference_rows, check_sft_rows  # checks imports this module

        check = check_sft_rows if kind == "sft" else check_preference_rows
        rows, report = check(rows, tokenizer=tokenizer, max_seq_tokens=max_seq_tokens, over_length=cfg.over_length,
                             max_drop_share=cfg.max_drop_share, source=path)
        formats["checks"] = report.to_dict()
    train, held = _split(rows, cfg=cfg, seed=seed)
    unit = "rows" if kind == "sft" else "pairs"
    counts = {"source": path, "rows_read": formats.pop("rows"), f"train_{unit}": len(train), f"eval_{unit}": len(held), **formats}
    return rows, train, held, counts


def load_rows(path: str, *, split: str) -> list[dict[str, Any]]:
    """Rows of a local file (by extension) or of a ``datasets`` name, through load_dataset."""
    import datasets

    local = Path(path).expanduser()
    if local.suffix.lower() in _LOCAL_BUILDERS or local.exists():
        if not local.is_file():
            raise DataError(f"data file {local} does not exist: set data.path (or <stage>.data_path) to an existing file")
        builder = _LOCAL_BUILDERS.get(local.suffix.lower())
        if builder is None:
            raise DataError(f"data file {local}: unknown extension {local.suffix!r}; use one of {sorted(_LOCAL_BUILDERS)}")
        try:
            loaded = datasets.load_dataset(builder, data_files=str(local.resolve()), split="train")
        except Exception as err:  # the builders raise many types; all mean the file is unreadable
            raise DataError(f"data file {local} could not be read as {builder}: {err}") from err
        return loaded.to_list()
    try:
        return datasets.load_dataset(path, split=split).to_list()
    except Exception as err:
        raise DataError(
            f"dataset {path!r} could not be loaded ({type(err).__name__}: {err}). Offline, only local files work: "
            "pass a path to a .json/.jsonl/.parquet/.csv file"
        ) from err


def fingerprint_rows(rows: Sequence[dict[str, Any]]) -> str:
    return hashlib.sha256(json.dumps(list(rows), sort_keys=True, default=str).encode()).hexdigest()


def _split(rows: list[dict], *, cfg: DataConfig, seed: int) -> tuple[list[dict], list[dict]]:
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_eval = min(cfg.max_eval_rows, int(round(len(rows) * cfg.eval_fraction)))
    held = sorted(order[:n_eval])
    keep = sorted(order[n_eval:])
    return [rows[i] for i in keep], [rows[i] for i in held]


def prompt_file_rows(cfg: DataConfig, *, path: str, seed: int = 0) -> list[list[dict[str, str]]]:
    """Prompts (message lists ending with a user turn) from any supported row shape."""
    rows, _ = _converted(cfg, path=path, kind="prompt", seed=seed)
    return [r["prompt"] for r in rows]


def _converted(cfg: DataConfig, *, path: str, kind: str, seed: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Rows of one file, or of the weighted mixture of data.sources, in the stage's form."""
    if path != MIXTURE:
        rows, counts = _convert(load_rows(path, split=cfg.split), kind=kind, source=path, fmt=cfg.format, columns=cfg.columns)
        return rows, {"rows": len(rows), **counts}
    from alignment.mixture import Source, mix

    sources, counts = [], {}
    for source in cfg.sources:
        rows, formats = _convert(load_rows(source.path, split=source.split), kind=kind, source=source.path, fmt=source.format,
                                 columns=source.columns)
        sources.append(Source(name=source.path, rows=rows, weight=source.weight))
        for key, value in formats.items():
            counts[key] = counts.get(key, 0) + value
    try:
        mixed, report = mix(sources, total=cfg.mixture_size, seed=seed)
    except ValueError as err:
        raise DataError(f"data.sources: {err}") from None
    for name, entry in report.items():
        log.info("mixture: %s took %d of %d rows (share %.3f, asked %.3f, %d oversampled)", name, entry["rows_taken"],
                 entry["rows_available"], entry["share_realised"], entry["share_requested"], entry["oversampled"])
    return mixed, {"rows": len(mixed), "mixture": report, **counts}


def _convert(raw: list[dict[str, Any]], *, kind: str, source: str, fmt: Optional[str], columns) -> tuple[list[dict[str, Any]], dict[str, int]]:
    try:
        rows, counts = convert_rows(raw, kind=kind, format=fmt, columns=dict(columns) if columns else None, source=source)
    except FormatError as err:
        raise DataError(str(err)) from None
    # Scores (UltraFeedback) are kept for reporting but are not training columns.
    rows = [{k: v for k, v in r.items() if k in ("messages", "prompt", "chosen", "rejected")} for r in rows]
    for key, value in counts.items():
        if key.startswith("dropped:") and value:
            log.info("%s: %d rows %s", source, value, key)
    return rows, {k: v for k, v in counts.items() if k.startswith(("format:", "dropped:"))}
