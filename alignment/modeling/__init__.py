"""Models: loading (loading.py) and the embedded default (embedded.py), LoRA (lora.py),
padding-free forwards (packing.py), TRL's LM head on labelled positions (compact_head.py),
sampling (generation.py) and scoring sampled sequences (scoring.py)."""
