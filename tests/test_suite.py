"""Unit tests for the built-in instruction suite (alignment/data/suite/); pure Python, no torch.

Run: python -m pytest tests/test_suite.py -q
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

import alignment.data.suite

from alignment.data.suite import (
    FAMILIES,
    Example,
    build_suite,
    corrupt,
    example_from_dict,
    example_to_dict,
    get_family,
    suite_fingerprint,
    verify,
)


def _example(family: str, args: tuple, phrasing: int = 0) -> Example:
    fam = get_family(family)
    return Example(family, fam.prompt(phrasing, args), fam.answer(args), phrasing, args)


# (family, args, correct response, wrong responses), worked out by hand.
HAND_CASES = [
    ("add", (23, 5), "28", ["27", "29", "2 8", "028", "twenty-eight"]),
    ("add", (0, 0), "0", ["00", "1", ""]),
    ("reverse", ("abcd",), "dcba", ["abcd", "DCBA", "dcb", "d c b a"]),
    ("reverse", ("aba",), "aba", ["ab", "baa"]),
    ("sort", (7, 1, 3), "1 3 7", ["7 3 1", "137", "1,3,7", "1 3  7", "7 1 3"]),
    ("count", ("qwxyz",), "5", ["4", "6", "five", "05"]),
    ("upper", ("kqsh",), "KQSH", ["kqsh", "Kqsh", "KQSh", "K Q S H"]),
    ("repeat", ("niv",), "niv,niv", ["niv, niv", "niv niv", "niv", "niv,niv,niv", "NIV,NIV"]),
    ("compare", (7, 3), "yes", ["no", "Yes!", "yes yes", "y"]),
    ("compare", (3, 7), "no", ["yes", "nope"]),
]


def test_hand_cases_cover_every_family():
    assert {case[0] for case in HAND_CASES} == set(FAMILIES)
    assert len(FAMILIES) >= 6


@pytest.mark.parametrize("family, args, gold, wrongs", HAND_CASES)
def test_verifier_on_hand_written_cases(family, args, gold, wrongs):
    ex = _example(family, args)
    assert ex.answer == gold
    assert verify(ex, gold)
    assert verify(ex, f"  {gold}\n")  # surrounding whitespace is forgiven
    assert verify(ex, f"{gold}.")  # so is one trailing period
    assert not verify(ex, f"{gold}..")
    for wrong in wrongs:
        assert not verify(ex, wrong), wrong


def test_verifier_recomputes_gold_from_args():
    tampered = Example("add", "What is 2 + 2?", "5", 0, (2, 2))
    assert not verify(tampered, "5")
    assert verify(tampered, "4")


def test_prompts_and_answers_are_short():
    suite = build_suite(seed=0, n_train=2000, n_eval=200)
    for e in suite.train + suite.eval_all():
        assert len(e.prompt) <= 60, e
        assert len(e.answer) <= 12, e


def test_corrupt_is_always_wrong_and_plausible():
    suite = build_suite(seed=1, n_train=3000, n_eval=200)
    rng = random.Random(0)
    for e in suite.train + suite.eval_all():
        for _ in range(3):
            wrong = corrupt(e, rng)
            assert isinstance(wrong, str) and wrong.strip(), e
            assert not verify(e, wrong), (e, wrong)
            assert len(wrong) <= 20  # same shape as an answer, not a random essay


def test_each_family_has_varied_phrasings():
    for name in FAMILIES:
        templates = get_family(name).templates
        assert len(templates) >= 6
        # Phrasings must differ in words, not only punctuation.
        word_sets = {frozenset(t.lower().replace("?", " ").replace(".", " ").split())
                     for t in templates}
        assert len(word_sets) == len(templates), name


def test_same_seed_same_suite_different_seed_different_suite():
    a = build_suite(seed=7, n_train=500, n_eval=70)
    b = build_suite(seed=7, n_train=500, n_eval=70)
    c = build_suite(seed=8, n_train=500, n_eval=70)
    assert a == b
    assert suite_fingerprint(a) == suite_fingerprint(b)
    assert a != c
    assert suite_fingerprint(a) != suite_fingerprint(c)


def test_fingerprint_is_stable_across_processes():
    # A fresh interpreter has a different str-hash seed; the suite must not depend on it.
    code = ("from alignment.data.suite import build_suite, suite_fingerprint; "
            "print(suite_fingerprint(build_suite(seed=3, n_train=300, n_eval=40)))")
    repo_root = Path(alignment.data.suite.__file__).resolve().parents[3]
    fingerprints = {
        subprocess.run(
            [sys.executable, "-c", code], check=True, capture_output=True, text=True,
            cwd=repo_root, env={**os.environ, "PYTHONHASHSEED": str(hash_seed)},
        ).stdout.strip()
        for hash_seed in (1, 2)
    }
    here = suite_fingerprint(build_suite(seed=3, n_train=300, n_eval=40))
    assert fingerprints == {here}
    assert len(here) == 64 and int(here, 16) >= 0


def test_unseen_phrasings_never_appear_in_train():
    suite = build_suite(seed=0, n_train=4000, n_eval=400)
    for name in FAMILIES:
        n_templates = len(get_family(name).templates)
        train = {e.phrasing for e in suite.train if e.family == name}
        seen = {e.phrasing for e in suite.eval_seen if e.family == name}
        unseen = {e.phrasing for e in suite.eval_unseen if e.family == name}
        assert unseen and not (unseen & train), name
        assert seen <= train, name
        assert len(unseen) == max(1, n_templates // 4), name  # all held-out ones get used
        assert len(train) == n_templates - len(unseen), name
    # Every example's prompt really is its phrasing's template.
    for e in suite.train + suite.eval_all():
        assert e.prompt == get_family(e.family).prompt(e.phrasing, e.args)


def test_holdout_depends_on_seed():
    holdouts = {
        frozenset((e.family, e.phrasing) for e in build_suite(seed=s, n_train=0, n_eval=200)
                  .eval_unseen)
        for s in range(5)
    }
    assert len(holdouts) > 1


def test_eval_is_disjoint_from_train_and_distinct():
    suite = build_suite(seed=0, n_train=20000, n_eval=400)
    train_keys = {(e.family, e.args) for e in suite.train}
    eval_keys = [(e.family, e.args) for e in suite.eval_all()]
    assert len(eval_keys) == len(set(eval_keys)) == 400
    assert not train_keys & set(eval_keys)


def test_split_sizes_and_round_robin_balance():
    suite = build_suite(seed=0, n_train=1000, n_eval=101)
    assert len(suite.train) == 1000
    assert (len(suite.eval_seen), len(suite.eval_unseen)) == (51, 50)
    assert suite.eval_all() == suite.eval_seen + suite.eval_unseen
    n = len(FAMILIES)
    assert [e.family for e in suite.train[:n]] == list(FAMILIES)
    for split in (suite.train, suite.eval_seen, suite.eval_unseen):
        counts = [sum(e.family == f for e in split) for f in FAMILIES]
        assert max(counts) - min(counts) <= 1


def test_small_argument_space_repeats_in_train_only():
    # "add" has 2,500 argument pairs, fewer than it is asked for here.
    suite = build_suite(seed=0, n_train=4000, n_eval=100, families=["add"])
    train_args = [e.args for e in suite.train]
    assert len(train_args) == 4000 and len(set(train_args)) < 4000
    assert not set(train_args) & {e.args for e in suite.eval_all()}
    # With a large space, training instances are distinct.
    words = build_suite(seed=0, n_train=3000, n_eval=100, families=["reverse"])
    assert len({e.args for e in words.train}) == 3000


def test_family_subset_and_order():
    suite = build_suite(seed=0, n_train=30, n_eval=10, families=("upper", "add"))
    assert [e.family for e in suite.train[:4]] == ["upper", "add", "upper", "add"]
    assert {e.family for e in suite.eval_all()} == {"upper", "add"}


def test_unknown_family_error_names_it_and_lists_valid_ones():
    with pytest.raises(ValueError) as err:
        build_suite(seed=0, n_train=10, n_eval=10, families=["add", "multiply"])
    message = str(err.value)
    assert "multiply" in message
    assert all(name in message for name in FAMILIES)


@pytest.mark.parametrize("kwargs", [
    {"families": []},
    {"families": ["add", "add"]},
    {"n_train": -1},
    {"n_eval": 6000, "families": ["add"]},  # more held-out pairs than exist
])
def test_bad_arguments_raise_value_error(kwargs):
    with pytest.raises(ValueError):
        build_suite(**{"seed": 0, "n_train": 10, "n_eval": 10, **kwargs})


def test_json_round_trip():
    suite = build_suite(seed=0, n_train=100, n_eval=20)
    for e in suite.train + suite.eval_all():
        back = example_from_dict(json.loads(json.dumps(example_to_dict(e))))
        assert back == e
        assert isinstance(back.args, tuple)
        assert verify(back, e.answer)
    with pytest.raises(ValueError, match="args"):
        example_from_dict({"family": "add", "prompt": "p", "answer": "1", "phrasing": 0})
