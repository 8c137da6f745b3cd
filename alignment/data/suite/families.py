"""Task families of the built-in instruction suite: phrasings, samplers, gold answers.

A family is one simple rule (add two numbers, reverse a word, ...) that a ~1M-parameter model
can learn from scratch in minutes. ``templates`` are instruction phrasings differing in wording
and word order (the suite holds some out to test unseen phrasings); ``sample_args`` draws the
hidden arguments from a local RNG; ``answer`` is the one gold response, and the verifier is
exact match against it after ``normalize_response``; ``corrupt`` gives a plausible *wrong*
response (off by one, wrong separator, wrong order) for preference pairs. Words are random
letter strings, so nothing can be recalled from pre-training.

Usage::

    import random
    from alignment.data.suite.families import get_family
    fam = get_family("add")
    args = fam.sample_args(random.Random(0))
    print(fam.prompt(0, args), "->", fam.answer(args))
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass
from typing import Callable

Args = tuple  # flat tuple of JSON primitives (int / str), so it survives a JSON round trip


def normalize_response(response: str) -> str:
    """Strip surrounding whitespace and a single trailing period; nothing else is forgiven."""
    text = response.strip()
    if text.endswith("."):
        text = text[:-1].rstrip()
    return text


@dataclass(frozen=True)
class Family:
    """One task rule with its phrasings; see the module docstring for the fields' roles."""

    name: str
    templates: tuple[str, ...]  # str.format templates over the names `fields` returns
    n_args: int  # size of the argument space; build_suite uses it to know when repeats are forced
    sample_args: Callable[[random.Random], Args]
    fields: Callable[[Args], dict[str, str]]  # template placeholder values for given args
    answer: Callable[[Args], str]
    corrupt: Callable[[Args, random.Random], str]  # must never return a response verify accepts

    def prompt(self, phrasing: int, args: Args) -> str:
        return self.templates[phrasing].format(**self.fields(args))

    def verify(self, args: Args, response: str) -> bool:
        # The gold answer is recomputed from the hidden args, so a tampered Example.answer
        # cannot make a wrong response pass.
        return normalize_response(response) == self.answer(args)


def _word(rng: random.Random, *, min_letters: int, max_letters: int) -> str:
    n_letters = rng.randint(min_letters, max_letters)
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(n_letters))


def _pick_wrong(candidates: list[str], gold: str, rng: random.Random) -> str:
    # Candidates are built to differ from gold; filtering keeps edge cases (palindromes,
    # already-sorted digits) from slipping through.
    wrong = [c for c in candidates if c != gold]
    return rng.choice(wrong)


def _word_family(
    name: str,
    templates: tuple[str, ...],
    *,
    answer: Callable[[Args], str],
    corrupt: Callable[[Args, random.Random], str],
    max_letters: int = 5,
) -> Family:
    """A family whose only argument is one random word of 3..max_letters letters."""
    return Family(
        name=name,
        templates=templates,
        n_args=sum(26**n for n in range(3, max_letters + 1)),
        sample_args=lambda rng: (_word(rng, min_letters=3, max_letters=max_letters),),
        fields=lambda args: {"w": args[0]},
        answer=answer,
        corrupt=corrupt,
    )


def _number_fields(args: Args) -> dict[str, str]:
    return {"a": str(args[0]), "b": str(args[1])}


# ---- add: sum of two numbers in 0..49 -------------------------------------------------------
def _add_corrupt(args: Args, rng: random.Random) -> str:
    total = args[0] + args[1]
    candidates = [total + 1, total + 10] + [v for v in (total - 1, total - 10) if v >= 0]
    return _pick_wrong([str(v) for v in candidates], str(total), rng)


ADD = Family(
    name="add",
    templates=(
        "Add: {a} {b}",
        "Add up: {a} {b}",
        "Sum: {a} {b}",
        "Sum of: {a} and {b}",
        "Add these: {a}, {b}",
        "The sum: {a} + {b}",
        "Add together: {a} {b}",
        "Sum up: {a} + {b}",
    ),
    n_args=50 * 50,
    sample_args=lambda rng: (rng.randint(0, 49), rng.randint(0, 49)),
    fields=_number_fields,
    answer=lambda args: str(args[0] + args[1]),
    corrupt=_add_corrupt,
)


# ---- reverse: a 3-5 letter word backwards ---------------------------------------------------
def _reverse_corrupt(args: Args, rng: random.Random) -> str:
    word, gold = args[0], args[0][::-1]
    i = rng.randrange(len(gold) - 1)
    swapped = gold[:i] + gold[i + 1] + gold[i] + gold[i + 2:]
    dropped = gold[:i] + gold[i + 1:]  # always shorter, so always wrong
    return _pick_wrong([word, swapped, dropped], gold, rng)


REVERSE = _word_family(
    "reverse",
    (
        "Reverse: {w}",
        "Reverse it: {w}",
        "Reverse the word: {w}",
        "Backwards: {w}",
        "Write backwards: {w}",
        "Spell backwards: {w}",
        "Reversed: {w}",
        "Reverse this: {w}",
    ),
    answer=lambda args: args[0][::-1],
    corrupt=_reverse_corrupt,
)


# ---- sort: 3-5 distinct digits, ascending, space separated ----------------------------------
def _sort_answer(args: Args) -> str:
    return " ".join(str(d) for d in sorted(args))


def _sort_corrupt(args: Args, rng: random.Random) -> str:
    ordered = sorted(args)
    i = rng.randrange(len(ordered) - 1)
    swapped = ordered[:i] + [ordered[i + 1], ordered[i]] + ordered[i + 2:]
    candidates = [
        " ".join(str(d) for d in reversed(ordered)),  # descending
        " ".join(str(d) for d in swapped),  # one adjacent pair out of order
        " ".join(str(d) for d in args),  # left as shown (wrong unless already sorted)
        "".join(str(d) for d in ordered),  # right order, separator dropped
    ]
    return _pick_wrong(candidates, _sort_answer(args), rng)


SORT = Family(
    name="sort",
    templates=(
        "Sort: {d}",
        "Sort these: {d}",
        "Sort ascending: {d}",
        "Ascending: {d}",
        "In ascending order: {d}",
        "Sort the digits: {d}",
        "Sorted: {d}",
        "Sort, smallest first: {d}",
    ),
    n_args=10 * 9 * 8 + 10 * 9 * 8 * 7 + 10 * 9 * 8 * 7 * 6,  # ordered draws of 3, 4 or 5
    sample_args=lambda rng: tuple(rng.sample(range(10), rng.randint(3, 5))),
    fields=lambda args: {"d": " ".join(str(d) for d in args)},
    answer=_sort_answer,
    corrupt=_sort_corrupt,
)


# ---- count: number of letters in a 3-7 letter word ------------------------------------------
# Longer words than elsewhere so the answer is not a three-way guess.
COUNT = _word_family(
    "count",
    (
        "Count letters: {w}",
        "Count the letters: {w}",
        "Letter count: {w}",
        "How many letters: {w}",
        "Letters in: {w}",
        "Count letters in: {w}",
        "Number of letters: {w}",
        "Letters, how many: {w}",
    ),
    answer=lambda args: str(len(args[0])),
    corrupt=lambda args, rng: str(len(args[0]) + rng.choice((-1, 1, 2))),
    max_letters=7,
)


# ---- upper: a 3-5 letter word in capitals ---------------------------------------------------
def _upper_corrupt(args: Args, rng: random.Random) -> str:
    word, gold = args[0], args[0].upper()
    i = rng.randrange(len(word))
    one_left_lower = gold[:i] + word[i] + gold[i + 1:]
    return _pick_wrong([word, word.capitalize(), one_left_lower], gold, rng)


UPPER = _word_family(
    "upper",
    (
        "Uppercase: {w}",
        "Upper case: {w}",
        "In uppercase: {w}",
        "Capitals: {w}",
        "In capitals: {w}",
        "Uppercase it: {w}",
        "Write in capitals: {w}",
        "Make uppercase: {w}",
    ),
    answer=lambda args: args[0].upper(),
    corrupt=_upper_corrupt,
)


# ---- repeat: format constraint, the word twice joined by a bare comma -----------------------
def _repeat_corrupt(args: Args, rng: random.Random) -> str:
    w = args[0]
    candidates = [f"{w} {w}", f"{w}, {w}", w, f"{w},{w},{w}", f"{w};{w}"]
    return _pick_wrong(candidates, f"{w},{w}", rng)


REPEAT = _word_family(
    "repeat",
    (
        "Twice with a comma: {w}",
        "Repeat twice: {w}",
        "Twice: {w}",
        "Say it twice: {w}",
        "Repeat with a comma: {w}",
        "Write twice: {w}",
        "Twice, comma between: {w}",
        "Repeat it twice: {w}",
    ),
    answer=lambda args: f"{args[0]},{args[0]}",
    corrupt=_repeat_corrupt,
)


# ---- compare: answer-format constraint, "yes" iff a > b, a != b in 0..99 --------------------
COMPARE = Family(
    name="compare",
    templates=(
        "Is the first bigger: {a} {b}",
        "First bigger, yes or no: {a} {b}",
        "Is the first larger: {a} {b}",
        "First larger: {a} {b}",
        "Bigger first, yes or no: {a} {b}",
        "Is first > second: {a} {b}",
        "First > second: {a} {b}",
        "Is the first one bigger: {a} {b}",
    ),
    n_args=100 * 99,
    sample_args=lambda rng: tuple(rng.sample(range(100), 2)),  # distinct: no ties
    fields=_number_fields,
    answer=lambda args: "yes" if args[0] > args[1] else "no",
    corrupt=lambda args, rng: "no" if args[0] > args[1] else "yes",
)


FAMILY_BY_NAME: dict[str, Family] = {
    f.name: f for f in (ADD, REVERSE, SORT, COUNT, UPPER, REPEAT, COMPARE)
}
FAMILIES: tuple[str, ...] = tuple(FAMILY_BY_NAME)


def get_family(name: str) -> Family:
    """Look a family up by name; unknown names raise a ValueError listing the valid ones."""
    try:
        return FAMILY_BY_NAME[name]
    except KeyError:
        raise ValueError(
            f"unknown task family {name!r}; valid families are: {', '.join(FAMILIES)}"
        ) from None
