"""Shared test helpers: tiny overrides that make a stage run in seconds, and a runner."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

# Real third-party models, datasets and tokenizers (not part of the package): ../shared/data
# beside the repository, or ALIGNMENT_SHARED_DATA. CI has it and sets
# ALIGNMENT_REQUIRE_SHARED_DATA=1, so there a missing file fails instead of skipping.
SHARED_DATA = Path(os.environ.get("ALIGNMENT_SHARED_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))


def shared(*parts: str) -> Path:
    """A file or folder of the shared real data; the test skips, saying why, when it is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        why = (f"{path} is absent: tests on real models and data need ../shared/data beside the repository "
               f"(or ALIGNMENT_SHARED_DATA=<dir>)")
        if os.environ.get("ALIGNMENT_REQUIRE_SHARED_DATA") == "1":
            pytest.fail(why)
        pytest.skip(why)
    return path

# A 1-layer, 32-wide model on a few hundred suite prompts: every stage runs in seconds.
TINY = [
    "model.hidden_size=32",
    "model.num_layers=1",
    "model.num_heads=2",
    "model.intermediate_size=64",
    "data.suite.n_train=256",
    "data.suite.n_eval=14",
    "sft.max_steps=4",
    "sft.global_batch_size=16",
    "dpo.max_steps=3",
    "dpo.global_batch_size=8",
    "dpo.pairs.n_prompts=32",
    "eval.samples_per_prompt=2",
    "eval.max_new_tokens=8",
    "num_threads=1",
    "logger=none",  # no W&B files, and never the network, unless a test asks for a logger
]


def free_port() -> int:
    """A TCP port nothing listens on now: a two-rank run's rendezvous, so that tests running at
    the same time (pytest-xdist workers) never share one."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def run_recipe(tmp_path):
    """Compose a recipe with the tiny overrides and run it in this process."""
    from alignment.pipeline import run_pipeline
    from alignment.run import compose_config

    def _run(recipe: str, *overrides: str, output_dir: Path | None = None):
        cfg = compose_config([f"+recipe={recipe}", f"output_dir={output_dir or tmp_path / 'out'}", *TINY, *overrides])
        return cfg, run_pipeline(cfg)

    return _run


def is_share_of(value: float, count: int) -> bool:
    """Whether ``value`` is k / count for a whole k in 0..count: an accuracy counted over exactly
    ``count`` items (a metric over other items, or not a count at all, fails)."""
    k = value * count
    return 0 <= round(k) <= count and abs(k - round(k)) < 1e-6
