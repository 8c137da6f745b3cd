"""The built-in instruction task suite: tiny algorithmic tasks with exact verifiers.

Pure Python (no torch). The pipeline's embedded default trains a ~1M-parameter model from
scratch on ``train`` and scores it with ``verify`` on ``eval_seen`` (familiar phrasings) and
``eval_unseen`` (phrasings held out of training). ``corrupt`` gives plausible wrong answers for
preference pairs. Families live in ``families.py``; building and splitting in ``build.py``.

Usage::

    from alignment.data.suite import build_suite, verify, suite_fingerprint
    suite = build_suite(seed=0, n_train=20000, n_eval=400)
    accuracy = sum(verify(e, e.answer) for e in suite.eval_all()) / len(suite.eval_all())

Inspect a sample: see the ``python -c`` one-liner in ``build.py``.
"""

from alignment.data.suite.build import (
    Example,
    Suite,
    build_suite,
    chatter,
    corrupt,
    example_from_dict,
    example_to_dict,
    suite_fingerprint,
    verify,
)
from alignment.data.suite.families import FAMILIES, Family, get_family, normalize_response

__all__ = [
    "FAMILIES",
    "Example",
    "Family",
    "Suite",
    "build_suite",
    "chatter",
    "corrupt",
    "example_from_dict",
    "example_to_dict",
    "get_family",
    "normalize_response",
    "suite_fingerprint",
    "verify",
]
