"""Data: where rows come from (sources.py), their formats (formats.py), checks before training
(checks.py), weighted mixtures (mixture.py), what each stage trains and is evaluated on
(stage_data.py), on-policy preference pairs (pairs.py), and the built-in task suite (suite/)."""
