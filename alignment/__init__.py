"""alignment: one command from a pretrained language model to an instruction-following,
preference-aligned one (SFT, reward model, PPO or DPO), each stage handing a Hugging Face
checkpoint and its record to the next.

    python -m alignment.run +recipe=sft_then_dpo

Where things live: run.py (the command), pipeline.py (stage order, skip or rerun),
config.py and config_checks.py (typed config, cross-field rules), stages/ (one module per
stage), data/, modeling/, scale/, tracking/, report/, bench/.
"""

__version__ = "0.1.0"
