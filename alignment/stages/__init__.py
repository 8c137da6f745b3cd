"""The stages: each a module with one ``train_<stage>(cfg, ctx) -> StageResult``.

``sft``, ``reward``, ``dpo``, ``grpo`` and ``rloo`` are TRL-backed and share one skeleton
(trl_stage.py; the online-RL pair also online_rl.py); ``ppo`` is our own loop (ppo/);
``self_instruct`` trains nothing and writes SFT data for a following ``sft``. A stage imports the
shared layers (common.py, alignment/data, modeling, scale, tracking), never another stage. The
pipeline imports a stage's module when it runs it.
"""

from __future__ import annotations

import importlib
from typing import Callable

# stage name -> the module that holds train_<stage>
MODULES = {"sft": "alignment.stages.sft", "reward": "alignment.stages.reward", "dpo": "alignment.stages.dpo",
           "ppo": "alignment.stages.ppo.stage", "grpo": "alignment.stages.grpo", "rloo": "alignment.stages.rloo",
           "self_instruct": "alignment.stages.self_instruct"}
# Stages whose checkpoint is a policy (a causal LM). Every stage starts from the latest of
# these: the reward model from the SFT policy, and PPO or DPO after a reward stage from the
# same SFT policy (the reward model is their second input, not their parent). self_instruct is
# not one: it trains nothing and writes data, so the SFT stage after it starts from model.* (as
# the paper fine-tunes the untuned model on its generated data), not from the policy that wrote it.
POLICY_STAGES = ("sft", "dpo", "ppo", "grpo", "rloo")


def runner(stage: str) -> Callable:
    """``train_<stage>`` from its module (imported now: TRL and its trainers load only when used)."""
    return getattr(importlib.import_module(MODULES[stage]), f"train_{stage}")
