"""Training rows a stage writes for a later stage (Self-Instruct's SFT data), written so that a
killed run resumes without a duplicated or lost row, and read back by the SFT stage.

Writing (:class:`RowJournal`): each batch of rows is appended to a JSON Lines file and fsynced,
then a small state file is replaced atomically (temporary file, ``os.replace``) with the file's
committed length in bytes, the row count and the writer's progress. A crash between the two leaves
bytes past the committed length; :meth:`RowJournal.resume` cuts the file back to that length, so
the rerun redoes exactly the batch that was not committed. A state written for other inputs (the
stage's inputs hash changed) starts the file afresh.

Reading: a stage that writes rows records the file in its result's ``outputs`` under
:data:`SFT_ROWS` (path, rows, bytes, sha256); the pipeline verifies the file before skipping that
stage and puts its digest into later stages' data fingerprints. :func:`with_generated_rows`
appends those rows to an SFT stage's training rows, checked like every SFT file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Iterable

from datasets import Dataset

from alignment.config import DataConfig
from alignment.data.checks import check_sft_rows
from alignment.data.stage_data import StageData
from alignment.errors import DataError
from alignment.records import StageResult, atomic_write_json

log = logging.getLogger(__name__)

SFT_ROWS = "sft_rows"  # the outputs key of a file of SFT rows ({"messages": [...]})


class RowJournal:
    """``path`` (JSON Lines) with its state file ``<path>.state.json``, tied to one inputs hash."""

    def __init__(self, path: Path, *, inputs_key: str):
        self.path, self.inputs_key = path, inputs_key
        self.state_path = path.with_name(path.name + ".state.json")

    def resume(self) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """The committed rows and the progress saved with them; ([], {}) for a fresh start."""
        state = self._state()
        if state is None or state.get("inputs_key") != self.inputs_key or self._size() < state["bytes"]:
            if self.path.exists() or self.state_path.exists():
                log.info("%s: not resumable (no state, other inputs or a shorter file): starting afresh", self.path)
            self.path.unlink(missing_ok=True)
            self.state_path.unlink(missing_ok=True)
            return [], {}
        if self._size() > state["bytes"]:
            log.info("%s: dropping %d bytes written after the last committed batch", self.path, self._size() - state["bytes"])
            with open(self.path, "r+b") as handle:
                handle.truncate(state["bytes"])
                handle.flush()
                os.fsync(handle.fileno())
        rows = read_rows(self.path) if state["bytes"] else []
        if len(rows) != state["rows"]:
            raise DataError(f"{self.path}: {len(rows)} rows but its state {self.state_path} says {state['rows']}; delete both to start afresh")
        return rows, state["progress"]

    def append(self, rows: list[dict[str, Any]], *, total_rows: int, progress: dict[str, Any]) -> None:
        """Append ``rows`` (the batch), then commit them with ``progress`` (``total_rows`` after it)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "ab") as handle:
            handle.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8"))
            handle.flush()
            os.fsync(handle.fileno())
        atomic_write_json(self.state_path, {"inputs_key": self.inputs_key, "bytes": self._size(), "rows": total_rows,
                                            "progress": progress})

    def _size(self) -> int:
        return self.path.stat().st_size if self.path.exists() else 0

    def _state(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.state_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None


def read_rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def output_record(path: Path, *, rows: int) -> dict[str, Any]:
    """What a result's ``outputs`` says of a written file: where, how many rows, bytes and sha256."""
    return {"path": str(path.resolve()), "rows": rows, "bytes": path.stat().st_size,
            "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


def with_generated_rows(data: StageData, previous: Iterable[StageResult], *, tokenizer, max_seq_tokens: int,
                        cfg: DataConfig) -> StageData:
    """``data`` (an SFT stage's) with the SFT rows earlier stages of the run wrote appended to its
    training rows, checked with the stage's tokenizer; held-out data unchanged. The counts say how
    many rows came from the seed data and how many were generated, and the fingerprint changes
    with the generated file."""
    written = [(r.stage, r.outputs[SFT_ROWS]) for r in previous if SFT_ROWS in (r.outputs or {})]
    if not written:
        return data
    seed_rows = data.train.to_list()
    columns = data.train.column_names
    generated, sources = [], []
    for stage, record in written:
        path = Path(record["path"])
        if not path.is_file():
            raise DataError(f"{path}: the SFT rows stage {stage} wrote are gone; rerun it (delete {path.parent}/result.json)")
        rows, checks = read_rows(path), {}
        if rows:  # a stage that kept nothing wrote an empty file
            rows, report = check_sft_rows(rows, tokenizer=tokenizer, max_seq_tokens=max_seq_tokens, over_length=cfg.over_length,
                                          max_drop_share=cfg.max_drop_share, source=str(path))
            checks = report.to_dict()
        generated += [{c: r.get(c) for c in columns} for r in rows]
        sources.append({"stage": stage, "path": str(path), "sha256": record["sha256"], "checks": checks})
        log.info("sft: %d rows generated by %s (%s) join %d seed rows", len(rows), stage, path, len(seed_rows))
    data.train = Dataset.from_list(seed_rows + generated)
    data.counts.update(rows_from_seed=len(seed_rows), rows_generated=len(generated), generated_by=sources)
    data.fingerprint += "+generated:" + ",".join(s["sha256"] for s in sources)
    return data
