"""Keeping secrets out of everything a run writes: W&B, Hydra's files, result.json and logs.

One rule, applied everywhere through :func:`redact`:

- a mapping key whose words include key, token, secret, password, passwd or credential(s)
  (``api_key``, ``HF_TOKEN``, ``aws_secret_access_key``; but not ``max_seq_tokens`` or
  ``tokenizer_name_or_path``) has its value replaced by ``[redacted]``;
- a ``name=value`` string (a Hydra override) whose name is such a key has its value replaced;
- any occurrence of a secret *value* is replaced wherever it appears: the values of environment
  variables whose names look secret (``WANDB_API_KEY=...``) and values found under secret keys
  of the config (:func:`secret_values`).

Matching is by whole words so that a key such as ``max_new_tokens`` is not redacted.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any, Iterable, Mapping

REDACTED = "[redacted]"
_SECRET_WORDS = frozenset({"key", "apikey", "token", "secret", "password", "passwd", "credential", "credentials"})
_WORD = re.compile(r"[A-Z]?[a-z]+|[A-Z]+(?![a-z])|\d+")
# Shorter values are left alone: redacting "1" or "true" everywhere would garble every file.
MIN_SECRET_CHARS = 8


def is_secret_name(name: str) -> bool:
    """``api_key``, ``WANDB_API_KEY``, ``hfToken``, ``logger.wandb.api_key`` -> True."""
    last = re.split(r"[./]", str(name))[-1]
    return any(word.lower() in _SECRET_WORDS for word in _WORD.findall(last))


def env_secret_values(environ: Mapping[str, str] | None = None) -> set[str]:
    """Values of the environment variables whose names look secret."""
    environ = os.environ if environ is None else environ
    return {value for name, value in environ.items() if is_secret_name(name) and len(value) >= MIN_SECRET_CHARS}


def secret_values(obj: Any) -> set[str]:
    """String values found under secret-looking keys anywhere in a nested dict/list."""
    found: set[str] = set()
    if isinstance(obj, Mapping):
        for key, value in obj.items():
            if is_secret_name(str(key)) and isinstance(value, str) and len(value) >= MIN_SECRET_CHARS:
                found.add(value)
            found |= secret_values(value)
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            found |= secret_values(item)
    return found


def redact(obj: Any, *, values: Iterable[str] = ()) -> Any:
    """A copy of ``obj`` (dicts, lists, strings, scalars) with secrets replaced by ``[redacted]``.

    ``values`` adds secret values to look for besides the environment's.
    """
    known = sorted(env_secret_values() | {v for v in values if v and len(v) >= MIN_SECRET_CHARS}, key=len, reverse=True)
    return _redact(obj, known)


def redact_text(text: str, *, values: Iterable[str] = ()) -> str:
    return redact(str(text), values=values)


def _redact(obj: Any, known: list[str]) -> Any:
    if isinstance(obj, Mapping):
        return {key: (REDACTED if is_secret_name(str(key)) and obj[key] not in (None, "") else _redact(value, known))
                for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_redact(item, known) for item in obj)
    if isinstance(obj, str):
        name, eq, _ = obj.partition("=")
        if eq and name and " " not in name and is_secret_name(name.lstrip("+~")):
            return f"{name}={REDACTED}"
        for value in known:
            obj = obj.replace(value, REDACTED)
        return obj
    return obj


def scrub_yaml_files(paths: Iterable[Path], *, values: Iterable[str] = ()) -> None:
    """Rewrite YAML files (Hydra's config.yaml, overrides.yaml, hydra.yaml) with secrets redacted."""
    import yaml

    values = set(values)
    for path in paths:
        if not path.is_file():
            continue
        text = path.read_text(encoding="utf-8")
        data = yaml.safe_load(text)
        clean = yaml.safe_dump(redact(data, values=values), sort_keys=False, allow_unicode=True)
        if clean != yaml.safe_dump(data, sort_keys=False, allow_unicode=True):
            path.write_text(clean, encoding="utf-8")


def scrub_text_file(path: Path, *, values: Iterable[str] = ()) -> None:
    """Replace secret values in a text file (a log written before the filter was in place)."""
    if path.is_file():
        text = path.read_text(encoding="utf-8", errors="replace")
        clean = redact_text(text, values=values)
        if clean != text:
            path.write_text(clean, encoding="utf-8")


class RedactingFilter(logging.Filter):
    """A logging filter that removes secret values from every record's message."""

    def __init__(self, values: Iterable[str] = ()):
        super().__init__()
        self.values = set(values)

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact_text(message, values=self.values)
        if clean != message:
            record.msg, record.args = clean, ()
        return True


def install_log_filter(values: Iterable[str] = ()) -> None:
    """Put a :class:`RedactingFilter` on every handler of the root logger (Hydra's console and
    ``alignment.log`` file handlers included)."""
    values = set(values)
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter(values))


class RedactingStream:
    """A text stream (``sys.stderr``) whose writes have secret values replaced: Hydra writes its
    failure line (``Error executing job with overrides: [...]``, the command line included) and
    tracebacks straight to the stream, past any logging filter."""

    def __init__(self, stream, values: Iterable[str]):
        self._stream = stream
        self._known = sorted(env_secret_values() | {v for v in values if len(v) >= MIN_SECRET_CHARS}, key=len, reverse=True)

    def write(self, text: str) -> int:
        for value in self._known:
            text = text.replace(value, REDACTED)
        return self._stream.write(text)

    def __getattr__(self, name: str) -> Any:  # flush, fileno, isatty, encoding, ...
        return getattr(self._stream, name)


def override_secret_values(argv: Iterable[str]) -> set[str]:
    """Values of ``name=value`` command-line overrides whose name looks secret."""
    return {arg.split("=", 1)[1] for arg in argv if "=" in arg and is_secret_name(arg.split("=", 1)[0].lstrip("+~"))}


def redact_output(argv: Iterable[str]) -> None:
    """From now on, what this process prints to stdout and stderr has the secret values of the
    command line and the environment replaced."""
    import sys

    values = override_secret_values(argv)
    if not isinstance(sys.stderr, RedactingStream):
        sys.stdout, sys.stderr = RedactingStream(sys.stdout, values), RedactingStream(sys.stderr, values)
