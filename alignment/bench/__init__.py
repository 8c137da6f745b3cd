"""Benchmarks: modules that measure and print a table (never tests).

    python -m alignment.bench.recipe --seeds 0 1 2     # the default recipe's time and quality
"""
