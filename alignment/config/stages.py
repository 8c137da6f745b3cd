"""The offline stages' schemas: SFT, the reward model and DPO (with the pairs they sample), and
Self-Instruct, which writes SFT data."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from alignment.config.base import StageConfig, TrainConfig


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


@dataclass
class SelfInstructConfig(StageConfig):
    """Self-Instruct (Wang et al. 2022): the policy writes new instructions after a numbered list
    of seed instructions, the candidates are filtered, and the kept ones are answered by the same
    policy. It writes an SFT dataset (``<stage>/data.jsonl``) that a following ``sft`` stage trains
    on beside the seed data, and trains nothing: the optimiser fields it inherits are unused.

    The seed pool is the first ``n_seeds`` instructions of the seed data: the task suite's training
    prompts, or ``data_path`` (any prompt format, read as PPO and GRPO read prompt files).
    """

    n_instructions: int = 200  # instructions to keep; the stage stops once it has them
    max_rounds: int = 40  # rounds at most, whatever was kept by then
    instructions_per_round: int = 32  # candidates written per round (also the generate batch, in sequences)
    n_seeds: int = 175  # seed pool size (the paper's 175 tasks); 0: every instruction of the seed data
    seeds_per_prompt: int = 6  # seed instructions in each writing prompt (the paper: 6)
    generated_per_prompt: int = 2  # kept instructions beside them, once there are any (the paper: 2)
    temperature: float = 0.7  # sampling temperature of the written instructions (0: greedy)
    max_new_tokens: int = 64  # longest written instruction, in tokens; one cut there is rejected as unfinished
    answer_temperature: float = 0.0  # of the answers; 0: greedy
    answer_max_new_tokens: int = 256  # longest answer, in tokens; one cut there is rejected as unfinished
    rouge_threshold: float = 0.7  # a candidate with ROUGE-L >= this to any pool instruction is rejected
    min_words: int = 3  # fewer whitespace-separated words: rejected (the paper: 3)
    max_words: int = 150  # more: rejected (the paper: 150)
    # A kept instruction that states a task-suite instance (alignment/data/suite/parse.py) has its
    # answer checked by the suite's verifier; a wrong answer drops it.
    verify_answers: bool = True
    max_seed_tokens: int = 256  # a longer seed instruction (chat-rendered) follows data.over_length
