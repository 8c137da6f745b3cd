"""Weighted mixtures: exact counts by largest remainder, realised shares, oversampling, determinism, errors."""

from __future__ import annotations

from collections import Counter

import pytest

from alignment.data.mixture import Source, mix


def rows(name, n):
    return [{"source": name, "i": i} for i in range(n)]


def taken(mixed, name):
    return Counter(r["i"] for r in mixed if r["source"] == name)


def test_counts_sum_to_total_by_largest_remainder():
    sources = [Source(n, rows(n, 10), 1.0) for n in ("a", "b", "c")]
    mixed, report = mix(sources, total=10, seed=0)
    # 10/3 = 3.33 each: the one spare row goes to the first source on the tie
    assert [report[n]["rows_taken"] for n in "abc"] == [4, 3, 3]
    assert len(mixed) == 10
    # 0.5/0.3/0.2 of 7 = 3.5/2.1/1.4: floors 3/2/1, the spare to the largest remainder (0.5)
    sources = [Source("a", rows("a", 9), 5), Source("b", rows("b", 9), 3), Source("c", rows("c", 9), 2)]
    _, report = mix(sources, total=7, seed=0)
    assert [report[n]["rows_taken"] for n in "abc"] == [4, 2, 1]


def test_shares_realised_without_replacement():
    sources = [Source("big", rows("big", 200), 3.0), Source("small", rows("small", 100), 1.0)]
    mixed, report = mix(sources, total=100, seed=1)
    assert report["big"] == {"rows_available": 200, "rows_taken": 75, "oversampled": 0,
                             "share_requested": 0.75, "share_realised": 0.75}
    assert report["small"]["share_realised"] == 0.25
    assert max(taken(mixed, "big").values()) == 1 and max(taken(mixed, "small").values()) == 1  # no repeats
    # shuffled: the sources are interleaved, not concatenated
    assert [r["source"] for r in mixed] != sorted(r["source"] for r in mixed)


def test_total_defaults_to_all_rows():
    mixed, report = mix([Source("a", rows("a", 6), 1), Source("b", rows("b", 4), 1)], total=None, seed=0)
    assert len(mixed) == 10 and report["a"]["rows_taken"] == 5 and report["b"]["oversampled"] == 1


def test_oversampling_takes_every_row_then_repeats():
    mixed, report = mix([Source("few", rows("few", 5), 1), Source("many", rows("many", 50), 1)], total=40, seed=2)
    assert report["few"]["rows_taken"] == 20 and report["few"]["oversampled"] == 15
    counts = taken(mixed, "few")
    assert set(counts) == set(range(5)) and sum(counts.values()) == 20
    # repeats are separate dicts, so editing one does not edit its twin
    few = [r for r in mixed if r["source"] == "few"]
    assert len({id(r) for r in few}) == 20


def test_deterministic_from_seed():
    def run(seed, extra=False):
        sources = [Source("a", rows("a", 30), 2), Source("b", rows("b", 30), 1)]
        if extra:
            sources.append(Source("c", rows("c", 30), 1))
        return mix(sources, total=24 if not extra else 32, seed=seed)[0]

    assert run(0) == run(0)
    assert run(0) != run(1)
    # adding a source changes neither which rows the others give nor (here) how many
    assert taken(run(0), "a") == taken(run(0, extra=True), "a")


@pytest.mark.parametrize("sources, total, match", [
    ([], None, "at least one source"),
    ([Source("a", rows("a", 3), 0)], None, "'a' has weight 0"),
    ([Source("a", rows("a", 3), 1), Source("b", rows("b", 3), -1.0)], None, "'b' has weight -1"),
    ([Source("a", rows("a", 3), 1), Source("b", [], 1)], None, "'b' has no rows"),
    ([Source("a", rows("a", 3), 1), Source("a", rows("a", 3), 1)], None, "'a' appears twice"),
    ([Source("a", rows("a", 3), 1)], 0, "positive number of rows"),
])
def test_errors_name_the_source(sources, total, match):
    with pytest.raises(ValueError, match=match):
        mix(sources, total=total, seed=0)
