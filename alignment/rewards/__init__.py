"""Rewards for the online-RL stages: the functions they optimise (functions.py) and the check
that runs them before the first update (preflight.py)."""
