"""Weighted mixtures of several data sources into one training set.

Each source's weight is its share of the final mixture (weights are normalised, so 3 and 1 mean 75% and
25%). A source gives ``round(share * total)`` rows, with largest remainders settling the rounding so the
counts sum to ``total`` exactly. A source with enough rows is sampled without replacement; a smaller one
gives every row once plus extra rows drawn with replacement, counted as ``oversampled``.

Each source draws from its own RNG seeded by ``(seed, name)``, so adding a source leaves the rows taken
from the others unchanged; only their order in the shuffled mixture moves.

    rows, report = mix([Source("chat", chat_rows, 0.7), Source("math", math_rows, 0.3)], total=10_000, seed=0)
    # report["math"] == {"rows_available": 2000, "rows_taken": 3000, "oversampled": 1000,
    #                    "share_requested": 0.3, "share_realised": 0.3}
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any, Optional

Row = dict[str, Any]


@dataclass(frozen=True)
class Source:
    """One data source in a mixture."""

    name: str  # names the source in the report and in errors
    rows: list[Row]
    weight: float  # share of the final mixture, before normalising over all sources


def mix(sources: list[Source], *, total: Optional[int], seed: int) -> tuple[list[Row], dict[str, dict[str, Any]]]:
    """Rows drawn from ``sources`` by weight, shuffled, and a report per source name.

    ``total=None`` keeps the size of all sources together. Rows are shallow copies, so an oversampled
    row appears as separate dicts.
    """
    _validate(sources)
    if total is None:
        total = sum(len(s.rows) for s in sources)
    if isinstance(total, bool) or not isinstance(total, int) or total < 1:
        raise ValueError(f"mixture total must be a positive number of rows, got {total!r}")
    weight_sum = sum(s.weight for s in sources)
    shares = [s.weight / weight_sum for s in sources]
    counts = _apportion(shares, total=total)

    mixed: list[Row] = []
    report: dict[str, dict[str, Any]] = {}
    for source, share, count in zip(sources, shares, counts):
        rng = random.Random(f"mix:{seed}:{source.name}")
        available = len(source.rows)
        if count <= available:
            taken = rng.sample(source.rows, count)
        else:  # every row once, then the shortfall drawn with replacement
            taken = rng.sample(source.rows, available) + rng.choices(source.rows, k=count - available)
        mixed.extend(dict(row) for row in taken)
        report[source.name] = {
            "rows_available": available,
            "rows_taken": count,
            "oversampled": max(0, count - available),
            "share_requested": share,
            "share_realised": count / total,
        }
    random.Random(f"mix-order:{seed}").shuffle(mixed)
    return mixed, report


def _apportion(shares: list[float], *, total: int) -> list[int]:
    """Integer counts proportional to ``shares`` summing to ``total`` (largest remainder; ties go to the
    earlier source)."""
    quotas = [share * total for share in shares]
    counts = [math.floor(q) for q in quotas]
    by_remainder = sorted(range(len(quotas)), key=lambda i: (-(quotas[i] - counts[i]), i))
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts


def _validate(sources: list[Source]) -> None:
    if not sources:
        raise ValueError("a mixture needs at least one source")
    seen: set[str] = set()
    for source in sources:
        if source.name in seen:
            raise ValueError(f"mixture source {source.name!r} appears twice: give each source its own name")
        seen.add(source.name)
        if isinstance(source.weight, bool) or not isinstance(source.weight, (int, float)) \
                or not math.isfinite(source.weight) or source.weight <= 0:
            raise ValueError(f"mixture source {source.name!r} has weight {source.weight!r}: weights must be "
                             "positive numbers (remove the source rather than giving it weight 0)")
        if not source.rows:
            raise ValueError(f"mixture source {source.name!r} has no rows: check its path and split, or remove it")
