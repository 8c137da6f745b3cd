"""ROUGE-L between two short texts, as the ``rouge_score`` package computes it (Lin 2004), written
here so the Self-Instruct filter needs no new dependency.

Tokens are ``rouge_score``'s default: the text lowercased, every run of characters other than
``a-z0-9`` a separator, no stemming (Self-Instruct's setting). With ``L`` the length of the
longest common subsequence of the two token lists, precision ``P = L / len(candidate)``, recall
``R = L / len(reference)`` and the F-measure with beta = 1, ``F = 2PR / (P + R)`` (0 when ``L`` is 0
or a text has no tokens). F is symmetric, so which text is the reference does not matter.

Worked example: "Add up: 3 and 5" -> [add, up, 3, and, 5], "Add: 3 5" -> [add, 3, 5]; the LCS is
[add, 3, 5], L = 3, P = 3/5, R = 3/3, F = 2 * 0.6 * 1 / 1.6 = 0.75.
"""

from __future__ import annotations

import re
from typing import Sequence

_SEPARATORS = re.compile(r"[^a-z0-9]+")


def rouge_tokens(text: str) -> list[str]:
    """``rouge_score.tokenize.tokenize(text, stemmer=None)``: lowercase alphanumeric runs."""
    return [t for t in _SEPARATORS.split(text.lower()) if t]


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence, by the usual dynamic programme, one row kept."""
    if len(a) < len(b):
        a, b = b, a
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l_tokens(candidate: Sequence[str], reference: Sequence[str]) -> float:
    """ROUGE-L F-measure of two token lists (see the module docstring)."""
    if not candidate or not reference:
        return 0.0
    common = lcs_length(candidate, reference)
    if common == 0:
        return 0.0
    precision, recall = common / len(candidate), common / len(reference)
    return 2 * precision * recall / (precision + recall)


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F-measure of two texts: 1.0 for the same tokens, 0.0 for none in common."""
    return rouge_l_tokens(rouge_tokens(candidate), rouge_tokens(reference))
