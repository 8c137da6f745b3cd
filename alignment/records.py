"""What a stage leaves behind, written so that a crash never leaves a half-truth on disk.

A stage directory ``<output_dir>/<run_name>/<stage>/`` holds ``checkpoint/`` (Hugging Face
format) and ``result.json`` (a ``StageResult``). The order of writes is what makes it safe:

1. the old ``result.json`` is removed before the stage starts training, so a stage that dies
   never leaves a record describing weights that are about to change;
2. the new checkpoint is written into a temporary sibling directory and renamed into place;
3. only then is ``result.json`` written (temporary file, fsync, ``os.replace``).

A ``result.json`` therefore always points at a complete checkpoint whose content hash it holds.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Optional

from alignment.errors import CheckpointError
from alignment.tracking.redaction import redact

RESULT_FILE = "result.json"
CHECKPOINT_DIR = "checkpoint"
SCHEMA_VERSION = 1
_HASH_CHUNK_BYTES = 1 << 20
_TRACKED_PACKAGES = ("alignment", "torch", "transformers", "trl", "datasets", "accelerate", "deepspeed", "peft", "hydra-core")


@dataclass
class StageResult:
    """The typed record a stage hands to the next one (``result.json``)."""

    stage: str
    status: str  # "complete" | "failed"
    checkpoint: Optional[str]  # absolute path of the HF checkpoint directory
    checkpoint_hash: Optional[str]  # sha256 over the checkpoint's files (see hash_directory)
    parent_stage: Optional[str]  # stage name, or None for the first stage
    parent_checkpoint: Optional[str]  # the checkpoint this stage started from (dir or hub id)
    parent_checkpoint_hash: Optional[str]  # None when it was built from config or is a hub id
    data_fingerprint: Optional[str]
    inputs_hash: str  # hash of config + parent hash + data fingerprint: a change reruns the stage
    config: dict[str, Any]  # the fully resolved stage config
    # Per file of the checkpoint, {"bytes": size, "sha256": digest}: a skip verifies the content
    # against these and names the file that changed.
    checkpoint_files: dict[str, Any] = field(default_factory=dict)
    # What inputs_hash is made of, each hashed on its own ({"config", "parent", "data"}), so a
    # rerun can say which of them changed.
    inputs_parts: dict[str, Any] = field(default_factory=dict)
    # Other checkpoints the stage used besides its parent, e.g. {"reward_model": {stage, checkpoint, hash}}.
    inputs: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    start_metrics: dict[str, Any] = field(default_factory=dict)  # the starting model, evaluated
    data: dict[str, Any] = field(default_factory=dict)  # counts of rows read, kept, dropped
    wall_seconds: float = 0.0
    versions: dict[str, str] = field(default_factory=dict)
    git_commit: Optional[str] = None
    error: Optional[str] = None
    # Processes, ZeRO stage, LoRA and the Slurm job (id, restart count) the stage ran under.
    launch: dict[str, Any] = field(default_factory=dict)
    # Files the stage wrote for later stages besides a checkpoint (self_instruct's SFT rows): name ->
    # {"path", "rows", "bytes", "sha256"}. A skip verifies them; later stages' data fingerprints hold them.
    outputs: dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        """The on-disk form: secret-looking keys and secret values removed (alignment/tracking/redaction.py)."""
        record = dataclasses.asdict(self)
        record["config"], record["error"] = redact(record["config"]), redact(record["error"])
        return record

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "StageResult":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in known})


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so readers see the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


class UnreadableRecord(CheckpointError):
    """A ``result.json`` that is not a stage record; the message names the file and why."""


def read_result(stage_dir: Path) -> Optional[StageResult]:
    """The stage's record, or None when there is none. A file that is not a record (truncated,
    another JSON value, bytes that are not UTF-8) raises :class:`UnreadableRecord` naming it:
    the pipeline reruns such a stage, a stage asked to start from it stops with the message."""
    path = stage_dir / RESULT_FILE
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as err:
        raise UnreadableRecord(f"{path} is not UTF-8 text (byte {err.start}): not a stage record") from None
    except json.JSONDecodeError as err:
        raise UnreadableRecord(f"{path} is not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("stage"), str) or "status" not in raw:
        raise UnreadableRecord(f"{path} holds {type(raw).__name__} {str(raw)[:40]!r}, not a stage record (an object with 'stage' and 'status')")
    try:
        return StageResult.from_dict(raw)
    except TypeError as err:
        raise UnreadableRecord(f"{path} lacks fields of a stage record ({err})") from None


def file_digests(directory: Path) -> tuple[str, dict[str, dict[str, Any]]]:
    """In one read of the files: ``hash_directory(directory)`` and, per relative path,
    ``{"bytes": size, "sha256": digest}``."""
    whole, digests = hashlib.sha256(), {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        name = path.relative_to(directory).as_posix()
        whole.update(name.encode() + b"\0")
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            while chunk := handle.read(_HASH_CHUNK_BYTES):
                whole.update(chunk)
                digest.update(chunk)
        whole.update(b"\0")
        digests[name] = {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}
    return whole.hexdigest(), digests


def changed_files(directory: Path, recorded: dict[str, dict[str, Any]]) -> list[str]:
    """The recorded files that are missing from ``directory`` or whose size or content differs
    (sizes first: a truncated file costs no read), plus files that were not there when recorded."""
    changed = []
    for name, expected in recorded.items():
        path = directory / name
        if not path.is_file() or path.stat().st_size != expected["bytes"]:
            changed.append(name)
    present = {p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file()} if directory.is_dir() else set()
    changed += sorted(present - set(recorded))
    if changed:
        return changed
    _, actual = file_digests(directory)
    return [name for name, expected in recorded.items() if actual[name]["sha256"] != expected["sha256"]]


def changed_outputs(outputs: dict[str, dict[str, Any]]) -> list[str]:
    """The recorded output files (``StageResult.outputs``) that are missing or whose size or sha256 differs."""
    changed = []
    for record in outputs.values():
        path = Path(record["path"])
        if not path.is_file() or path.stat().st_size != record["bytes"] or hashlib.sha256(path.read_bytes()).hexdigest() != record["sha256"]:
            changed.append(str(path))
    return changed


def remove_orphans(stage_dir: Path) -> list[Path]:
    """Temporary files and directories an interrupted write left in ``stage_dir`` (``.checkpoint.tmp-PID``,
    ``.adapter.old-PID``, ``.result.json.tmp-PID``, ...): removed; only the one process that runs a stage
    writes there, so none of them can belong to a live write when the stage starts."""
    removed = []
    for path in sorted(stage_dir.glob(".*")) if stage_dir.is_dir() else []:
        if ".tmp-" in path.name or ".old-" in path.name:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
            removed.append(path)
    return removed


def hash_directory(directory: Path, *, only: Optional[list[str]] = None) -> str:
    """sha256 over every file's relative path and bytes, in sorted order (``only``: these files).
    The checkpoint's lineage hash; skips verify per-file digests (``file_digests``) instead."""
    digest = hashlib.sha256()
    files = [directory / name for name in only] if only is not None else [p for p in directory.rglob("*") if p.is_file()]
    for path in sorted(files):
        digest.update(path.relative_to(directory).as_posix().encode() + b"\0")
        with open(path, "rb") as handle:
            while chunk := handle.read(_HASH_CHUNK_BYTES):
                digest.update(chunk)
        digest.update(b"\0")
    return digest.hexdigest()


def cached_directory_hash(directory: Path, *, only: Optional[list[str]] = None) -> str:
    """:func:`hash_directory` of a model the run only reads (a base model, an ``init_from``
    directory), computed once and cached under ``$XDG_CACHE_HOME/alignment/hashes/`` (default
    ~/.cache), keyed by the directory's path and every file's relative path, size and
    modification time: a 140 GB checkpoint is read once, not on every run and rank, and a file
    that is rewritten changes its key. Nothing is written into the model's directory."""
    files = sorted([directory / name for name in only] if only is not None else [p for p in directory.rglob("*") if p.is_file()])
    stats = [(p.relative_to(directory).as_posix(), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    key = hashlib.sha256(json.dumps([str(directory.resolve()), stats]).encode()).hexdigest()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "alignment" / "hashes" / f"{key}.json"
    try:
        return json.loads(cache.read_text())["sha256"]
    except (OSError, ValueError, KeyError):
        pass
    digest = hash_directory(directory, only=only)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f"{cache.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps({"directory": str(directory.resolve()), "sha256": digest}))
        os.replace(tmp, cache)
    except OSError:
        pass  # an unwritable cache only costs the next run the same read
    return digest


def new_checkpoint_dir(stage_dir: Path, *, name: str = CHECKPOINT_DIR) -> Path:
    """A fresh temporary directory to save the checkpoint (or ``name``) into before it is committed."""
    tmp = stage_dir / f".{name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def commit_checkpoint(tmp: Path, stage_dir: Path, *, name: str = CHECKPOINT_DIR) -> Path:
    """Move a fully written directory into ``<stage_dir>/<name>`` (replacing an old one):
    the checkpoint, or a LoRA stage's ``adapter``."""
    final = stage_dir / name
    _fsync_tree(tmp)
    if final.exists():
        retired = stage_dir / f".{name}.old-{os.getpid()}"
        os.replace(final, retired)
        os.replace(tmp, final)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(stage_dir)
    return final


def inputs_hash(*, config: dict[str, Any], parent_hash: Optional[str], parent_ref: Optional[str], data_fingerprint: Optional[str]) -> str:
    """What decides whether a finished stage is still valid for the current command."""
    payload = json.dumps(
        {"config": config, "parent_hash": parent_hash, "parent_ref": parent_ref, "data": data_fingerprint},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(payload.encode()).hexdigest()


def package_versions() -> dict[str, str]:
    versions = {}
    for name in _TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def git_commit() -> Optional[str]:
    """The commit of the source tree this package runs from, when it is a git checkout."""
    source = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(
            ["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True
        )
        dirty = subprocess.run(
            ["git", "-C", str(source), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=5, check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(directory: Path) -> None:
    for path in directory.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    _fsync_dir(directory)
