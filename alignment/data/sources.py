"""Where a stage's rows come from: a file, a ``datasets`` name, or a weighted mixture of sources.

Local ``.json``/``.jsonl`` files are read here with every value as written (``datasets`` would cast
a column to one type); ``.parquet``/``.csv`` files and dataset names (which need the network) go
through ``datasets.load_dataset``. Every row is converted once by alignment/data/formats.py to the
stage's conversational form.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from alignment.config import DataConfig, StageConfig
from alignment.data.formats import FormatError, convert_rows
from alignment.data.mixture import Source, mix
from alignment.data.plain_text import SUITE_SOURCE, is_text_source, text_documents, token_windows, txt_documents
from alignment.errors import DataError

log = logging.getLogger(__name__)
_LOCAL_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
MIXTURE = "<mixture of data sources>"


def stage_data(cfg: DataConfig, stage_cfg: StageConfig) -> DataConfig:
    """The data config a stage reads: ``<stage>.data_sources`` (a mixture for that stage)
    replaces data.path and data.sources; otherwise the shared one."""
    if stage_cfg.data_sources:
        return dataclasses.replace(cfg, path=None, sources=list(stage_cfg.data_sources))
    return cfg


def stage_source(cfg: DataConfig, data_path: Optional[str]) -> Optional[str]:
    """What a stage reads: its own data_path, data.path, the data.sources mixture, or None for
    the built-in task suite."""
    return data_path or cfg.path or (MIXTURE if cfg.sources else None)


def load_rows(path: str, *, split: str) -> list[dict[str, Any]]:
    """Rows of a local file (by extension) or of a ``datasets`` name. JSON and JSON Lines are read
    here (:func:`read_json_rows`), Parquet, CSV and names through ``load_dataset``."""
    import datasets

    local = Path(path).expanduser()
    if local.suffix.lower() in _LOCAL_BUILDERS or local.exists():
        if local.is_dir():
            raise DataError(f"data file {local} is a directory: point data.path (or <stage>.data_path) at a file inside it")
        if not local.is_file():
            raise DataError(f"data file {local} does not exist: set data.path (or <stage>.data_path) to an existing file")
        builder = _LOCAL_BUILDERS.get(local.suffix.lower())
        if builder is None:
            raise DataError(f"data file {local}: unknown extension {local.suffix!r}; use one of {sorted(_LOCAL_BUILDERS)}")
        if local.stat().st_size == 0:
            raise DataError(f"data file {local} is an empty file: it holds no rows")
        if builder == "json":
            return read_json_rows(local)
        try:
            return datasets.load_dataset(builder, data_files=str(local.resolve()), split="train").to_list()
        except Exception as err:  # the builders raise many types; all mean the file is unreadable
            raise DataError(f"data file {local} could not be read as {builder}: {type(err).__name__}: {err}") from err
    try:
        return datasets.load_dataset(path, split=split).to_list()
    except Exception as err:
        raise DataError(
            f"dataset {path!r} could not be loaded ({type(err).__name__}: {err}). Offline, only local files work: "
            "pass a path to a .json/.jsonl/.parquet/.csv file"
        ) from err


def read_json_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a JSON file (a list of objects) or a JSON Lines file (one object a line), each
    value as written. ``datasets``' JSON builder casts a column to one type over the whole file, so
    a column mixing strings and message lists (or numbers and strings) is refused or re-decoded,
    and its errors name neither the line nor the row; here every error does."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise DataError(f"data file {path}, line {line}: byte {raw[err.start]:#04x} is not UTF-8; save the file as UTF-8") from None
    if not text.strip():
        raise DataError(f"data file {path} is an empty file (only whitespace): it holds no rows")
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"data file {path}, line {err.lineno}, column {err.colno}: invalid JSON ({err.msg})") from None
        numbered = list(enumerate(rows if isinstance(rows, list) else [rows]))
        where = "row"
    else:  # JSON Lines (datasets reads those from a .json file too)
        numbered = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                numbered.append((number, json.loads(line)))
            except json.JSONDecodeError as err:
                raise DataError(f"data file {path}, line {number}, column {err.colno}: invalid JSON ({err.msg}); each line "
                                f"of a JSON Lines file holds one object") from None
        where = "line"
    for index, row in numbered:
        if not isinstance(row, dict):
            raise DataError(f"data file {path}, {where} {index}: a row must be a JSON object with named fields, got "
                            f"{type(row).__name__} {json.dumps(row)[:60]}")
    return [row for _, row in numbered]


def fingerprint_rows(rows: Sequence[dict[str, Any]]) -> str:
    return hashlib.sha256(json.dumps(list(rows), sort_keys=True, default=str).encode()).hexdigest()


def converted_rows(cfg: DataConfig, *, path: str, kind: str, seed: int,
                   suite_rows: Optional[Callable[[], list[dict[str, Any]]]] = None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Rows of one file, or of the weighted mixture of data.sources, in the stage's form. SFT
    mixtures may hold plain text (``{"text": ...}`` rows) and, given ``suite_rows``, the task
    suite's demonstrations as the member ``path: suite`` (alignment/data/plain_text.py)."""
    if path != MIXTURE:
        rows, counts = _source_rows(path, split=cfg.split, kind=kind, fmt=cfg.format, columns=cfg.columns, suite_rows=None)
        return rows, {"rows": len(rows), **counts}
    sources, counts = [], {}
    for source in cfg.sources:
        rows, formats = _source_rows(source.path, split=source.split, kind=kind, fmt=source.format, columns=source.columns,
                                     suite_rows=suite_rows)
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


def _source_rows(path: str, *, split: str, kind: str, fmt: Optional[str], columns,
                 suite_rows: Optional[Callable[[], list[dict[str, Any]]]]) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """One source's rows: the suite's demonstrations, plain text, or a file or dataset converted."""
    if path == SUITE_SOURCE:
        if suite_rows is None:
            raise DataError(f"data source {SUITE_SOURCE!r} (the task suite's demonstrations) is a mixture member for SFT only "
                            f"(sft.data_sources); other stages read the suite when data.path and data.sources are unset")
        rows = suite_rows()
        return rows, {"format:suite": len(rows)}
    text = is_text_source(path, fmt=fmt)
    raw = None if text else load_rows(path, split=split)
    if text or is_text_source(path, fmt=fmt, first_row=raw[0] if raw else None):
        if kind != "sft":
            raise DataError(f"{path}: plain text (rows of 'text') trains SFT only; the {kind} data needs conversational rows. "
                            f"For a pre-training term in PPO or GRPO use ppo.ptx_text / grpo.ptx_text")
        documents = text_source_documents(path) if raw is None else text_documents(raw, source=path)
        return [{"text": d} for d in documents], {"format:text": len(documents)}
    return _convert(raw, kind=kind, source=path, fmt=fmt, columns=columns)


def text_source_documents(path: str) -> list[str]:
    """The documents of a plain-text file: ``.txt`` blocks, or the ``text`` field of JSON rows."""
    if Path(path).suffix.lower() == ".txt":
        return txt_documents(path)
    return text_documents(load_rows(path, split="train"), source=path)


def text_windows(paths: Sequence[str], tokenizer, *, max_tokens: int, max_total: Optional[int] = None) -> list[list[int]]:
    """Token windows (:func:`alignment.data.plain_text.token_windows`) of every document of the
    plain-text files ``paths``, in order; with ``max_total``, only their first ``max_total``
    tokens (the last window cut short), and no document after those is tokenized."""
    windows, budget = [], max_total
    for path in paths:
        for document in text_source_documents(path):
            for window in token_windows(document, tokenizer, max_tokens=max_tokens):
                if budget is not None:
                    if budget <= 1:
                        return [w for w in windows if len(w) >= 2]
                    window = window[:budget]
                    budget -= len(window)
                windows.append(window)
    return [w for w in windows if len(w) >= 2]


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


def file_fingerprint(path: str) -> str:
    local = Path(path).expanduser()
    if local.is_file():
        digest = hashlib.sha256()
        with open(local, "rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
        return f"file:{digest.hexdigest()}"
    return f"name:{path}"
