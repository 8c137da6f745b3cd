"""GRPO: group relative policy optimisation (Shao et al. 2024) through TRL's GRPOTrainer.

For each prompt, ``num_generations`` replies are sampled and scored; a reply's advantage is its
reward minus the mean of its group, divided by the group's std (``grpo.scale_rewards=group``;
``batch`` or ``none``, Dr. GRPO's choice, also exist). The loss is PPO's clipped surrogate on
those advantages, aggregated per ``grpo.loss_type`` (TRL's default ``dapo``: over every token of
the batch), plus ``beta`` x KL to the starting policy (0 by default, as DAPO and Dr. GRPO do:
no reference model is held). See alignment/stages/online_rl.py for rewards, pre-flight and evaluation.

    python -m alignment.run +recipe=sft_then_grpo
    python -m alignment.run +recipe=sft_rm_grpo grpo.beta=0.04
    python -m alignment.run +recipe=grpo grpo.init_from=outputs/sft_then_grpo/sft 'grpo.rewards=[{name: verifier}, {name: my_pkg.rewards:brevity, weight: 0.1}]'
"""

from __future__ import annotations

from typing import Any

from transformers import AutoModelForCausalLM
from trl import GRPOConfig as TRLGRPOConfig
from trl import GRPOTrainer

from alignment.config import GRPOConfig
from alignment.records import StageResult
from alignment.stages import online_rl
from alignment.stages.common import StageContext
from alignment.stages.trl_stage import Prepared, TRLStage, run_trl_stage


def train_grpo(cfg: GRPOConfig, ctx: StageContext) -> StageResult:
    """Run the GRPO stage described by ``cfg``."""
    return run_trl_stage(GRPO, cfg, ctx)


def build_trainer(cfg: GRPOConfig, ctx: StageContext, prepared: Prepared, **overrides: Any) -> GRPOTrainer:
    return online_rl.build_trainer(cfg, ctx, prepared, trainer_class=GRPOTrainer, config_class=TRLGRPOConfig,
                                   specific={"loss_type": cfg.loss_type, "scale_rewards": cfg.scale_rewards}, overrides=overrides)


GRPO = TRLStage(prepare=online_rl.prepare, build_trainer=build_trainer, evaluate=online_rl.evaluate, loader=AutoModelForCausalLM)
