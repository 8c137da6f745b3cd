"""The online stages' schemas: PPO (our loop) and the TRL online trainers GRPO and RLOO, with
their reward functions and the rollout engine's knobs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from omegaconf import MISSING

from alignment.config.base import StageConfig, TrainConfig

# Share of each GPU a colocated vLLM engine takes (weights + KV cache); training keeps the rest.
# TRL's GRPOConfig default, for every online stage.
VLLM_GPU_SHARE = 0.3

@dataclass
class PretrainingTermConfig:
    """The pre-training term of PPO-ptx (Ouyang et al. 2022), for PPO, GRPO and RLOO: ptx_coef x
    the language-modelling loss on plain text (ptx_text: .txt files or rows with "text"; windows
    of ptx_window_tokens), ptx_batch_size windows per micro-batch, added to the RL loss against
    the alignment tax. 0: off. Use text that eval.lm_text does not measure on."""

    ptx_coef: float = 0.0
    ptx_text: List[str] = field(default_factory=list)
    ptx_batch_size: int = 4
    ptx_window_tokens: int = 256


@dataclass
class PPOConfig(StageConfig, PretrainingTermConfig):
    """PPO against a reward model (Ziegler et al. 2019; Ouyang et al. 2022), written here in TRL's
    spirit: maths in alignment/stages/ppo/maths.py, a readable loop in alignment/stages/ppo/loop.py."""

    learning_rate: float = 1e-6
    num_rollouts: int = 100  # rollout batches; each is followed by ppo_epochs of updates
    rollout_batch_size: int = 64  # prompts per rollout
    mini_batch_size: int = 16  # rollouts per optimiser step
    # Rows per forward (and backward) on each process, for scoring rollouts and for training;
    # a mini-batch share larger than this is split and its gradients accumulated. None: the
    # whole share at once. Same result either way; smaller bounds activation memory.
    micro_batch_size: Optional[int] = None
    # Rows per forward on each process when scoring rollouts (log-probs under policy and reference,
    # values): no gradients are kept there, so it may exceed micro_batch_size (TRL's old
    # local_rollout_forward_batch_size, verl's log_prob_micro_batch_size). None: micro_batch_size.
    forward_batch_size: Optional[int] = None
    ppo_epochs: int = 2
    # Learning rate over the stage's optimiser steps (num_rollouts x ppo_epochs x mini-batches per
    # rollout): constant | linear (to 0) | cosine, after warmup_ratio of them at a linear ramp.
    lr_scheduler: str = "constant"
    warmup_ratio: float = 0.0
    temperature: float = 1.0
    max_new_tokens: int = 256
    kl_estimator: str = "k1"  # k1 (log-ratio) or k3 (non-negative, lower variance)
    kl_coef: float = 0.05
    adaptive_kl: bool = False  # Ziegler et al.'s controller towards kl_target over kl_horizon
    kl_target: float = 1.0  # nats per response
    kl_horizon: int = 10000  # episodes
    gamma: float = 1.0
    lam: float = 0.95
    clip_range: float = 0.2
    clip_range_value: float = 0.2
    value_loss_coef: float = 0.1
    whiten_advantages: bool = True
    normalize_scores: bool = True  # running mean/std of reward-model scores
    score_clip: Optional[float] = 5.0  # after normalisation
    # Subtracted from the score of a response that never emits EOS (TRL's sign convention: a
    # positive number penalises truncation); 0 turns it off.
    missing_eos_penalty: float = 1.0
    value_from: str = "reward"  # value model init: "reward" (the reward model) or "policy"
    reward_from: Optional[str] = None  # a reward stage or HF dir; default: the chain's reward stage
    stop_on_hacking: bool = False  # the health check warns; with this it also stops the stage
    n_prompts: int = 4000  # training prompts drawn from the suite (or the prompt file)
    # Prompt files are checked like every data file (alignment/data/checks.py); a longer prompt
    # follows data.over_length (truncate keeps its last max_prompt_tokens tokens).
    max_prompt_tokens: int = 1024
    # Sample rollouts with vLLM colocated on each GPU, through the class GRPO and RLOO use
    # (alignment/modeling/rollout_engine.py); needs a GPU and pip install vllm.
    use_vllm: bool = False
    vllm_gpu_memory_utilization: float = VLLM_GPU_SHARE


@dataclass
class RewardFunctionConfig:
    """One reward an online-RL stage optimises, with its weight in the weighted sum.

    ``name``: ``verifier`` (the task suite's exact check: 1 for a correct reply, else 0),
    ``reward_model`` (the chain's reward stage, or ``reward_from``, scored at the token it was
    trained on), or ``package.module:function``, a function with TRL's reward signature
    ``f(prompts, completions, completion_ids, **columns) -> list[float]`` (``answer`` is the
    reference answer where the data has one). Length or format penalties are ordinary functions.
    """

    name: str = MISSING
    weight: float = 1.0


@dataclass
class OnlineRLConfig(TrainConfig, PretrainingTermConfig):
    """What GRPO and RLOO share: TRL's online trainers sample ``num_generations`` replies per
    prompt, score them with the reward functions and push up the better ones of each group.

    ``per_device_batch_size`` counts replies (prompts x num_generations) per process and step;
    ``max_seq_tokens`` bounds prompt + reply: prompts longer than max_seq_tokens -
    max_new_tokens follow data.over_length.
    """

    learning_rate: float = 1e-6
    num_generations: int = 8  # replies per prompt: the group whose mean (or leave-one-out mean) is the baseline
    temperature: float = 1.0
    max_new_tokens: int = 256  # longest reply, in tokens (TRL's max_completion_length)
    beta: float = 0.0  # KL coefficient against the frozen starting policy; 0 loads no reference model
    epsilon: float = 0.2  # clipping of the probability ratio, low side (and high side unless epsilon_high)
    epsilon_high: Optional[float] = None  # DAPO's asymmetric upper clip; None: epsilon
    num_iterations: int = 1  # optimiser passes over each generated batch (mu in the GRPO paper)
    n_prompts: int = 4000  # training prompts drawn from the suite (or the prompt file)
    rewards: List[RewardFunctionConfig] = field(default_factory=lambda: [RewardFunctionConfig(name="verifier")])
    reward_from: Optional[str] = None  # for a reward_model reward: a reward stage or HF dir; default: the chain's
    # Before the first update, every reward is run on the data's reference answers and on the
    # starting policy's samples of preflight_prompts prompts; a NaN, a reward constant within every
    # group, or reference answers scored below the samples stops the stage with the numbers.
    preflight: bool = True
    preflight_prompts: int = 16
    use_vllm: bool = False  # generate with vLLM (colocated, through TRL); needs a GPU and pip install vllm
    vllm_gpu_memory_utilization: float = VLLM_GPU_SHARE


@dataclass
class GRPOConfig(OnlineRLConfig):
    """Group relative policy optimisation (Shao et al. 2024) through TRL's GRPOTrainer: each
    reply's advantage is its reward minus its group's mean, divided by the group's std."""

    # TRL's loss types: grpo (per-sequence mean), dapo (per-token over the batch), dr_grpo, bnpo, ...
    loss_type: str = "dapo"
    scale_rewards: str = "group"  # group | batch | none (Dr. GRPO: no division by the std)


@dataclass
class RLOOConfig(OnlineRLConfig):
    """REINFORCE leave-one-out (Ahmadian et al. 2024) through TRL's RLOOTrainer: each reply's
    baseline is the mean reward of the other replies of its prompt."""

    normalize_advantages: bool = False  # divide advantages by their batch std
