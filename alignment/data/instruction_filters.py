"""The Self-Instruct filters (Wang et al. 2022, section 2.3) on written instructions, and the
diversity figures of what they keep.

A candidate is checked in this order and rejected for the first reason that applies, so every
candidate has exactly one reason (or none) and the counts add up:

- ``too_short`` / ``too_long``: fewer than ``min_words`` or more than ``max_words`` words
  (whitespace-separated; the paper keeps 3 to 150);
- ``keyword``: a whole word or phrase of :data:`KEYWORDS` (the paper's list: tasks a language
  model cannot do, such as drawing or listening), in any letter case;
- ``bad_start``: the first character is not an ASCII letter (punctuation, a digit, another script);
- ``duplicate``: equal, once normalised (lowercase, whitespace collapsed, a final period dropped),
  to an instruction of the seed data or of the pool;
- ``similar``: ROUGE-L (alignment/data/rouge.py) of at least ``threshold`` to an instruction of
  the pool (seed pool plus every instruction kept so far; the paper's threshold is 0.7).

    pool = InstructionPool(seeds=["Add: 3 5", "Reverse: abc"])
    pool.rejection("Add up: 3 5", threshold=0.7)   # ("similar", 0.857..., "Add: 3 5")
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Iterable, Optional, Sequence

from alignment.data.rouge import rouge_l_tokens, rouge_tokens

# The paper's keyword filter: instructions about images, files, audio and the like.
KEYWORDS = ("image", "images", "graph", "graphs", "picture", "pictures", "file", "files", "map", "maps", "draw", "plot",
            "go to", "video", "audio", "music", "flowchart", "diagram")
_KEYWORD = re.compile(r"\b(?:" + "|".join(re.escape(k).replace(r"\ ", r"\s+") for k in KEYWORDS) + r")\b", re.IGNORECASE)
_ASCII_LETTER = re.compile(r"[A-Za-z]")


def normalise(text: str) -> str:
    """The form exact duplicates are compared in."""
    text = " ".join(text.lower().split())
    return text[:-1].rstrip() if text.endswith(".") else text


def text_rejection(text: str, *, min_words: int, max_words: int) -> Optional[str]:
    """The first of the filters on the text alone that rejects ``text``, or None."""
    words = len(text.split())
    if words < min_words:
        return "too_short"
    if words > max_words:
        return "too_long"
    if _KEYWORD.search(text):
        return "keyword"
    if not _ASCII_LETTER.match(text.strip()):
        return "bad_start"
    return None


class InstructionPool:
    """The instructions a candidate must differ from: the seed pool and the ones kept so far.

    ``known`` (every instruction of the seed data, which may be far larger than the seed pool)
    counts for exact duplicates only; ROUGE-L is measured against the pool.
    """

    def __init__(self, seeds: Sequence[str], *, known: Iterable[str] = ()):
        self.seeds = list(seeds)
        self.kept: list[str] = []
        self._tokens: list[list[str]] = [rouge_tokens(s) for s in self.seeds]
        self._seen = Counter(normalise(s) for s in [*known, *self.seeds])

    def __len__(self) -> int:
        return len(self.seeds) + len(self.kept)

    def add(self, text: str) -> None:
        self.kept.append(text)
        self._tokens.append(rouge_tokens(text))
        self._seen[normalise(text)] += 1

    def remove(self, text: str) -> None:
        """Take back a kept instruction (the last one equal to ``text``)."""
        index = len(self.seeds) + len(self.kept) - 1 - self.kept[::-1].index(text)
        del self.kept[index - len(self.seeds)], self._tokens[index]
        self._seen[normalise(text)] -= 1

    def most_similar(self, text: str) -> tuple[float, Optional[str]]:
        """The highest ROUGE-L of ``text`` to a pool member, and that member."""
        tokens = rouge_tokens(text)
        best, best_index = 0.0, None
        for index, other in enumerate(self._tokens):
            score = rouge_l_tokens(tokens, other)
            if score > best:
                best, best_index = score, index
        members = self.seeds + self.kept
        return best, members[best_index] if best_index is not None else None

    def rejection(self, text: str, *, threshold: float) -> tuple[Optional[str], float, Optional[str]]:
        """(``duplicate``, ``similar`` or None; the highest ROUGE-L; the most similar member)."""
        if self._seen[normalise(text)] > 0:
            return "duplicate", 1.0, text
        score, member = self.most_similar(text)
        return ("similar" if score >= threshold else None), score, member


def diversity(kept: Sequence[str], *, seeds: Sequence[str]) -> dict[str, float]:
    """How varied the kept instructions are.

    ``distinct_1`` / ``distinct_2``: distinct word unigrams / bigrams over all unigrams / bigrams of
    the kept instructions (Li et al. 2016; bigrams within an instruction); ``mean_max_rouge_l_to_seeds``:
    each kept instruction's highest ROUGE-L to a seed, averaged; ``distinct_first_words``: how many
    different first words (ROUGE tokens) they start with.
    """
    tokens = [rouge_tokens(t) for t in kept]
    unigrams = [t for row in tokens for t in row]
    bigrams = [pair for row in tokens for pair in zip(row, row[1:])]
    seed_tokens = [rouge_tokens(s) for s in seeds]
    nearest = [max((rouge_l_tokens(row, s) for s in seed_tokens), default=0.0) for row in tokens]
    return {
        "distinct_1": len(set(unigrams)) / len(unigrams) if unigrams else 0.0,
        "distinct_2": len(set(bigrams)) / len(bigrams) if bigrams else 0.0,
        "mean_max_rouge_l_to_seeds": sum(nearest) / len(nearest) if nearest else 0.0,
        "distinct_first_words": len({row[0] for row in tokens if row}),
    }
