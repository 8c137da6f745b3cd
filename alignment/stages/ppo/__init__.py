"""PPO (our own; TRL 1.x has none): stage.py sets it up, loop.py runs it, rollout.py samples and
scores, engine.py optimises policy and value, maths.py holds the pure tensor functions, and
health.py watches for reward hacking."""
