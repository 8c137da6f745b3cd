"""User reward functions for tests/test_online_rl.py, imported by name as a user's would be
(``grpo.rewards=[{name: reward_fns:brevity}]``; tests/ is on sys.path under pytest)."""

import math


def brevity(completions, **_):
    """Shorter replies score higher: varies within a group, and the suite's short reference answers win."""
    return [-float(len(c[-1]["content"])) for c in completions]


def constant(completions, **_):
    return [1.0] * len(completions)


def sometimes_nan(completions, **_):
    return [math.nan if i % 3 == 0 else float(i) for i in range(len(completions))]


def wrong_is_better(completions, answer, **_):
    """Rewards anything but the reference answer: the references score below the samples."""
    return [0.0 if c[-1]["content"].strip() == a else 1.0 + (i % 2) for i, (c, a) in enumerate(zip(completions, answer))]


not_a_function = 3
