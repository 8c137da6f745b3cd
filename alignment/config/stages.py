"""The offline training stages' schemas: SFT, the reward model and DPO (with the pairs they sample)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from alignment.config.base import TrainConfig


@dataclass
class SFTConfig(TrainConfig):
    """Supervised fine-tuning on instruction/response pairs (TRL SFTTrainer)."""

    learning_rate: float = 2e-5
    assistant_only_loss: bool = True  # loss on assistant tokens only, via {% generation %}


@dataclass
class PairsConfig:
    """How DPO preference pairs are made on the task suite: sample the parent policy, label by
    the verifier, pair a correct response (chosen) with an incorrect one (rejected)."""

    n_prompts: int = 2000
    samples_per_prompt: int = 4
    temperature: float = 1.0
    max_new_tokens: int = 256  # longest sampled reply, in tokens
    batch_size: int = 64  # sequences per generate() call
    max_pairs_per_prompt: int = 2
    # When no sample of a prompt is correct, use the gold answer as the chosen response.
    gold_when_no_correct: bool = True


@dataclass
class RewardConfig(TrainConfig):
    """A reward model: the policy's transformer with a scalar head (num_labels=1), trained with
    the Bradley-Terry loss -log sigmoid(r(chosen) - r(rejected) - margin) (TRL RewardTrainer)."""

    learning_rate: float = 1e-5
    margin: float = 0.0  # a fixed margin the chosen reward must beat the rejected one by
    center_rewards_coefficient: Optional[float] = None  # e.g. 0.01: pulls mean reward to 0
    pairs: PairsConfig = field(default_factory=PairsConfig)


@dataclass
class DPOConfig(TrainConfig):
    """Direct preference optimisation (TRL DPOTrainer) against the frozen parent policy."""

    learning_rate: float = 5e-7
    beta: float = 0.1
    loss_type: str = "sigmoid"  # any TRL DPO loss type: sigmoid, ipo, hinge, robust, ...
    # Weight of an NLL term on the chosen response added to the preference loss (RPO, Pang et
    # al. 2024); 0 is plain DPO. Plain DPO on near-miss pairs lowers the likelihood of the chosen
    # answer too and pushes mass onto tokens no demonstration used ("likelihood displacement",
    # Razin et al. 2024); the NLL term anchors the chosen answer. On the embedded toy it made DPO's
    # gain steady across runs instead of hit-or-miss (conf/model/tiny.yaml sets 1.0).
    sft_loss_weight: float = 0.0
    # Reference log-probs computed once before training (TRL's precompute_ref_log_probs) instead
    # of a reference forward in every step; no reference model is held meanwhile, which frees
    # its memory on a GPU. None: when it saves work, i.e. num_epochs > 1 (each pair's reference
    # pass then runs once, not once per epoch).
    precompute_ref_log_probs: Optional[bool] = None
    pairs: PairsConfig = field(default_factory=PairsConfig)
    # Who labels sampled pairs on the suite: "verifier" (exact), "reward" (the reward model of an
    # earlier stage, as large pipelines do), or "auto" (the reward model when the chain has one).
    pair_labeler: str = "auto"
    reward_from: Optional[str] = None  # a reward stage or HF dir; default: the chain's reward stage
