"""Deterministic building and splitting of the built-in instruction suite.

``build_suite`` draws, for each task family (see ``families.py``):

1. the phrasings held out as *unseen* (about a quarter, at least one per family): they never
   appear in ``train``, so ``eval_unseen`` measures instruction following beyond memorised
   wording while ``eval_seen`` measures it on familiar wording;
2. the distinct hidden arguments of the eval instances;
3. the training arguments, never equal to an eval argument, so no eval answer can be
   memorised. Training arguments are distinct unless the family's argument space is too small
   (``add`` has 2,500), in which case they are drawn with replacement.

Every family draws from its own ``random.Random`` seeded with a string built from ``seed`` and
the family name (string seeds hash with SHA-512, so they are stable across processes and Python
versions; ``hash()`` is not). A family's examples therefore do not depend on which other
families are selected. Examples are interleaved round-robin over families, so any prefix is
balanced.

Usage::

    from alignment.data.suite import build_suite, verify, suite_fingerprint
    suite = build_suite(seed=0, n_train=20000, n_eval=400)
    ex = suite.eval_unseen[0]
    assert verify(ex, ex.answer)

Print one training example per family::

    python -c "from alignment.data.suite import build_suite as b
    for e in b(seed=0, n_train=7, n_eval=0).train: print(e)"
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from typing import Any, Sequence

from alignment.data.suite.families import FAMILIES, Args, Family, get_family

_FINGERPRINT_VERSION = 1  # bump when the canonical JSON layout changes


@dataclass(frozen=True)
class Example:
    """One instruction with its gold response and the hidden arguments the verifier needs."""

    family: str  # task family name, e.g. "add"
    prompt: str  # the user instruction text, e.g. "What is 23 + 5?"
    answer: str  # canonical gold response, e.g. "28"
    phrasing: int  # index of the instruction template within its family
    args: Args  # hidden arguments (flat tuple of JSON primitives)


@dataclass(frozen=True)
class Suite:
    """Train prompts plus two held-out eval splits (seen and unseen phrasings)."""

    train: tuple[Example, ...]  # only "seen" phrasings
    eval_seen: tuple[Example, ...]  # held-out instances, phrasings that also appear in train
    eval_unseen: tuple[Example, ...]  # held-out instances, phrasings never used in train

    def eval_all(self) -> tuple[Example, ...]:
        return self.eval_seen + self.eval_unseen


def _per_family_counts(total: int, n_families: int) -> list[int]:
    # Round-robin: family i gets items i, i + F, i + 2F, ...
    return [total // n_families + (1 if i < total % n_families else 0) for i in range(n_families)]


def _interleave(per_family: list[list[Example]]) -> tuple[Example, ...]:
    out: list[Example] = []
    for k in range(max((len(x) for x in per_family), default=0)):
        out.extend(x[k] for x in per_family if k < len(x))
    return tuple(out)


def _sample_eval_args(fam: Family, rng: random.Random, *, n_distinct: int) -> list[Args]:
    if n_distinct > fam.n_args:
        raise ValueError(
            f"family {fam.name!r} has only {fam.n_args} distinct instances, "
            f"cannot hold out {n_distinct}; lower n_eval"
        )
    chosen: list[Args] = []
    taken: set[Args] = set()
    while len(chosen) < n_distinct:
        args = fam.sample_args(rng)
        if args not in taken:
            taken.add(args)
            chosen.append(args)
    return chosen


def _sample_train_args(
    fam: Family, rng: random.Random, *, n: int, excluded: set[Args]
) -> list[Args]:
    # Distinct draws when the space allows; otherwise with replacement (still excluding eval).
    # Rejection sampling near a full space is coupon-collector cost, at most ~n_args*log(n_args)
    # draws, which is small for the spaces that can get full.
    distinct = n <= fam.n_args - len(excluded)
    chosen: list[Args] = []
    taken = set(excluded)
    while len(chosen) < n:
        args = fam.sample_args(rng)
        if args in taken:
            continue
        if distinct:
            taken.add(args)
        chosen.append(args)
    return chosen


def _examples(
    fam: Family, rng: random.Random, args_list: list[Args], phrasings: list[int]
) -> list[Example]:
    out = []
    for args in args_list:
        phrasing = rng.choice(phrasings)
        out.append(Example(fam.name, fam.prompt(phrasing, args), fam.answer(args), phrasing, args))
    return out


def build_suite(
    *, seed: int, n_train: int, n_eval: int, families: Sequence[str] | None = None
) -> Suite:
    """Build the suite; ``n_eval`` is split half seen / half unseen, families round-robin."""
    names = tuple(FAMILIES if families is None else families)
    fams = [get_family(name) for name in names]
    if not fams:
        raise ValueError(f"families is empty; choose from: {', '.join(FAMILIES)}")
    if len(set(names)) != len(names):
        raise ValueError(f"families lists a name twice: {list(names)}")
    if n_train < 0 or n_eval < 0:
        raise ValueError(f"n_train and n_eval must be >= 0, got {n_train} and {n_eval}")

    n_unseen_total = n_eval // 2
    train_counts = _per_family_counts(n_train, len(fams))
    seen_counts = _per_family_counts(n_eval - n_unseen_total, len(fams))
    unseen_counts = _per_family_counts(n_unseen_total, len(fams))

    train, eval_seen, eval_unseen = [], [], []
    for i, fam in enumerate(fams):
        rng = random.Random(f"alignment.suite:{seed}:{fam.name}")
        n_phrasings = len(fam.templates)
        unseen = sorted(rng.sample(range(n_phrasings), max(1, n_phrasings // 4)))
        seen = [p for p in range(n_phrasings) if p not in unseen]

        eval_args = _sample_eval_args(fam, rng, n_distinct=seen_counts[i] + unseen_counts[i])
        train_args = _sample_train_args(fam, rng, n=train_counts[i], excluded=set(eval_args))

        eval_seen.append(_examples(fam, rng, eval_args[: seen_counts[i]], seen))
        eval_unseen.append(_examples(fam, rng, eval_args[seen_counts[i]:], unseen))
        train.append(_examples(fam, rng, train_args, seen))

    return Suite(_interleave(train), _interleave(eval_seen), _interleave(eval_unseen))


def verify(example: Example, response: str) -> bool:
    """Exact check of ``response``; only surrounding whitespace and one final '.' are forgiven."""
    return get_family(example.family).verify(example.args, response)


def corrupt(example: Example, rng: random.Random) -> str:
    """A plausible wrong response (``verify`` rejects it), e.g. for preference pairs."""
    fam = get_family(example.family)
    for _ in range(100):  # family corruptions are wrong by construction; this is a safety net
        response = fam.corrupt(example.args, rng)
        if not fam.verify(example.args, response):
            return response
    raise RuntimeError(f"family {fam.name!r} produced no wrong answer for args {example.args}")


# Filler that wraps an answer the way chatty human demonstrations do. Every task asks for the
# bare answer, so the verifier rejects each of these; none normalises back to the answer.
CHATTER = ("Sure! {answer}", "The answer is {answer}", "Answer: {answer}", "{answer}, I think", "Okay, {answer}")


def chatter(example: Example, rng: random.Random) -> str:
    """The gold answer wrapped in filler: right content, wrong format (``verify`` rejects it)."""
    return rng.choice(CHATTER).format(answer=example.answer)


def example_to_dict(e: Example) -> dict[str, Any]:
    return {
        "family": e.family,
        "prompt": e.prompt,
        "answer": e.answer,
        "phrasing": e.phrasing,
        "args": list(e.args),
    }


def example_from_dict(d: dict[str, Any]) -> Example:
    missing = [k for k in ("family", "prompt", "answer", "phrasing", "args") if k not in d]
    if missing:
        raise ValueError(f"example dict lacks key(s) {missing}; got keys {sorted(d)}")
    return Example(
        family=d["family"],
        prompt=d["prompt"],
        answer=d["answer"],
        phrasing=int(d["phrasing"]),
        args=tuple(d["args"]),
    )


def suite_fingerprint(suite: Suite) -> str:
    """SHA-256 hex of the suite's canonical JSON (sorted keys, no whitespace, ASCII only)."""
    payload = {
        "version": _FINGERPRINT_VERSION,
        "train": [example_to_dict(e) for e in suite.train],
        "eval_seen": [example_to_dict(e) for e in suite.eval_seen],
        "eval_unseen": [example_to_dict(e) for e in suite.eval_unseen],
    }
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("ascii")).hexdigest()

