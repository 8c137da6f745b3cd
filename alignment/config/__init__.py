"""Typed configuration: the schema, and every default that suits a real model.

Each Hydra config group (``model``, ``data``, ``sft``, ``dpo``, ``eval``) is a dataclass below,
registered in Hydra's ConfigStore as the schema of that group. The defaults here are for a real
pretrained model trained in full (learning rates, lengths and batch sizes as TRL and the usual
recipes set them). A model preset (``conf/model/*.yaml``) overrides what suits its model: the
embedded toy's values live in ``conf/model/tiny.yaml`` (the default preset), SmolLM2's in
``conf/model/smollm2.yaml``. Recipes under ``recipes/`` only list stages and override what differs.
Because the schema is structured, ``dpo.betta=0.2`` or ``sft.learning_rate=abc`` fails while
Hydra composes the config, before anything is loaded.

    python -m alignment.run +recipe=sft_then_dpo --cfg job   # print the composed config
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import List, Optional

from hydra.core.config_store import ConfigStore

# The schema's parts, re-exported: alignment.config is the one place to import a config class from.
from alignment.config.base import (  # noqa: F401
    DataConfig, LoraConfig, ModelConfig, SourceConfig, StageConfig, SuiteConfig, TrainConfig, shipped_dir,
)
from alignment.config.online import (  # noqa: F401
    VLLM_GPU_SHARE, GRPOConfig, OnlineRLConfig, PPOConfig, RewardFunctionConfig, RLOOConfig,
)
from alignment.config.run import DeepSpeedConfig, EvalConfig, LauncherConfig, LoggerConfig, WandbConfig  # noqa: F401
from alignment.config.stages import DPOConfig, PairsConfig, RewardConfig, SelfInstructConfig, SFTConfig  # noqa: F401


@dataclass
class AlignmentConfig:
    """The whole run. ``stages`` comes from the recipe (``+recipe=NAME``)."""

    stages: List[str] = field(default_factory=list)
    run_name: Optional[str] = None  # default: the recipe's name (multirun: plus the overrides)
    output_dir: str = "outputs"
    seed: int = 0
    # Torch threads per process; 0 = the cores this process may use divided by local processes.
    num_threads: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    rloo: RLOOConfig = field(default_factory=RLOOConfig)
    self_instruct: SelfInstructConfig = field(default_factory=SelfInstructConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    recipe: Optional[str] = None  # filled in from +recipe=NAME; recorded in every result.json


# Each config group: a field of AlignmentConfig whose default is one of the schema dataclasses.
GROUPS = {f.name: f.default_factory for f in dataclasses.fields(AlignmentConfig) if dataclasses.is_dataclass(f.default_factory)}


def register_schemas() -> None:
    """Register the schemas; conf/config.yaml and each group's YAML extend them."""
    cs = ConfigStore.instance()
    cs.store(name="alignment_schema", node=AlignmentConfig)
    for group, schema in GROUPS.items():
        cs.store(group=group, name=f"{group}_schema", node=schema)
