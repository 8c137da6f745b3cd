"""Read an instruction back as a suite instance, so a written instruction can be verified.

``parse_instruction("Reverse: abc")`` is the ``reverse`` example with args ``("abc",)`` and gold
answer ``"cba"``; text that no family's phrasing matches is None. Every phrasing counts, seen or
held out: a policy that writes an unseen phrasing wrote a verifiable task all the same.

A phrasing matches the whole instruction (surrounding whitespace aside); its words match in any
letter case, its placeholders as the family draws them, a little wider where the rule still
holds: numbers of up to four digits for ``add`` and ``compare`` (distinct for ``compare``, which
has no ties), 2 to 10 digits for ``sort``, lowercase words of 1 to 12 letters. The gold answer is
the family's own ``answer``, so ``verify`` checks a reply exactly as it checks the suite.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Optional

from alignment.data.suite.build import Example
from alignment.data.suite.families import FAMILIES, Args, get_family

# What each template placeholder matches: {a} {b} numbers, {w} a word, {d} digits separated by spaces.
_FIELDS: dict[str, str] = {"a": r"\d{1,4}", "b": r"\d{1,4}", "w": r"[a-z]{1,12}", "d": r"\d(?: \d){1,9}"}


def _args(family: str, groups: dict[str, str]) -> Optional[Args]:
    """The family's args from the matched placeholders; None where the rule has no answer."""
    if family in ("add", "compare"):
        a, b = int(groups["a"]), int(groups["b"])
        return None if family == "compare" and a == b else (a, b)
    if family == "sort":
        return tuple(int(d) for d in groups["d"].split())
    return (groups["w"],)


@lru_cache(maxsize=None)
def _patterns() -> tuple[tuple[str, int, re.Pattern], ...]:
    """(family, phrasing, compiled template) for every phrasing of every family."""
    out = []
    for name in FAMILIES:
        for phrasing, template in enumerate(get_family(name).templates):
            parts = re.split(r"\{(\w+)\}", template)  # literal, field, literal, field, ...
            regex = "".join(f"(?i:{re.escape(part)})" if i % 2 == 0 else f"(?P<{part}>{_FIELDS[part]})"
                            for i, part in enumerate(parts))
            out.append((name, phrasing, re.compile(regex)))
    return tuple(out)


def parse_instruction(text: str) -> Optional[Example]:
    """The suite example ``text`` states, or None when it is no family's phrasing."""
    stripped = text.strip()
    for family, phrasing, pattern in _patterns():
        match = pattern.fullmatch(stripped)
        if match is None:
            continue
        args = _args(family, match.groupdict())
        if args is not None:
            return Example(family, stripped, get_family(family).answer(args), phrasing, args)
    return None
