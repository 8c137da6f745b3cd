"""RLOO: REINFORCE with a leave-one-out baseline (Ahmadian et al. 2024) through TRL's RLOOTrainer.

For each prompt, ``num_generations`` replies are sampled and scored; a reply's advantage is its
reward minus the mean reward of the *other* replies to the same prompt, so no value model is
needed and the baseline does not include the reply itself. ``rloo.beta`` x KL to the starting
policy is added to the loss (0 by default). See alignment/stages/online_rl.py for rewards,
pre-flight and evaluation.

    python -m alignment.run +recipe=sft_then_rloo
"""

from __future__ import annotations

from typing import Any

from transformers import AutoModelForCausalLM
from trl import RLOOConfig as TRLRLOOConfig
from trl import RLOOTrainer

from alignment.config import RLOOConfig
from alignment.records import StageResult
from alignment.stages import online_rl
from alignment.stages.common import StageContext
from alignment.stages.trl_stage import Prepared, TRLStage, run_trl_stage


def train_rloo(cfg: RLOOConfig, ctx: StageContext) -> StageResult:
    """Run the RLOO stage described by ``cfg``."""
    return run_trl_stage(RLOO, cfg, ctx)


def build_trainer(cfg: RLOOConfig, ctx: StageContext, prepared: Prepared, **overrides: Any) -> RLOOTrainer:
    return online_rl.build_trainer(cfg, ctx, prepared, trainer_class=RLOOTrainer, config_class=TRLRLOOConfig,
                                   specific={"normalize_advantages": cfg.normalize_advantages}, overrides=overrides)


RLOO = TRLStage(prepare=online_rl.prepare, build_trainer=build_trainer, evaluate=online_rl.evaluate, loader=AutoModelForCausalLM)
