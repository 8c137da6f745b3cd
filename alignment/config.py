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

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

# Evaluation, launch and tracking: groups that depend on no stage config, in config_run.py (re-exported here).
from alignment.config_run import DeepSpeedConfig, EvalConfig, LauncherConfig, LoggerConfig, WandbConfig  # noqa: F401


def shipped_dir(package: str, source_dir: str) -> Path:
    """Where conf/, recipes/ or slurm/ are: inside the installed package (``alignment.conf``),
    or, when this is a source checkout imported without installing it, the repository's top level."""
    try:
        return Path(str(resources.files(package)))
    except ModuleNotFoundError:
        return Path(__file__).resolve().parent.parent / source_dir


@dataclass
class LoraConfig:
    """LoRA adapters (Hu et al. 2021) through peft: W + (alpha / r) * B A on the target modules."""

    r: int = 16  # rank of the update
    alpha: int = 32  # scale numerator: the update is multiplied by alpha / r
    dropout: float = 0.05
    # Module names to adapt, or ["all-linear"] (peft's shorthand: every linear layer but the head).
    target_modules: List[str] = field(default_factory=lambda: ["all-linear"])


@dataclass
class ModelConfig:
    """Which model the chain starts from.

    With ``name_or_path`` unset, the embedded default is built: a small Llama initialised from
    the architecture fields below (fixed seed) and a character-level tokenizer with a chat
    template. Set it to a local Hugging Face directory (or a hub id, which needs the network)
    to start from a real model instead; the architecture fields are then ignored.
    """

    # The preset (conf/model/<preset>.yaml) whose training defaults the run uses; each preset file
    # sets it. "tiny" is the embedded toy: a real name_or_path under it is refused.
    preset: str = "hf"
    name_or_path: Optional[str] = None
    # A GGUF file inside the name_or_path directory (or hub repository), as transformers names it:
    # the weights are dequantised to ``dtype`` and the tokenizer is read from the same file
    # (pip install 'alignment[gguf]'). Stage checkpoints are ordinary safetensors.
    gguf_file: Optional[str] = None
    tokenizer_name_or_path: Optional[str] = None  # defaults to name_or_path
    # A Jinja chat template for real tokenizers that have none (or whose template does not
    # mark assistant turns with {% generation %}); None keeps the tokenizer's own.
    chat_template: Optional[str] = None
    dtype: str = "float32"  # float32 | bfloat16 | float16
    attn_implementation: str = "sdpa"
    # Run the transformer on real tokens only: each right-padded batch is repacked into fewer
    # rows of whole sequences with per-sequence position ids (alignment/modeling/packing.py). Same loss
    # and gradients as the padded batch, a third fewer positions on the task suite.
    padding_free: bool = True
    # Architecture of the embedded model (used only when name_or_path is unset).
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 384
    max_position_embeddings: int = 256
    init_seed: int = 0
    # Parameter-efficient training for every stage: None (full fine-tuning), "lora", or "qlora"
    # (LoRA on a 4-bit base through bitsandbytes; needs a CUDA GPU). See alignment/modeling/lora.py.
    peft: Optional[str] = None
    lora: LoraConfig = field(default_factory=lambda: LoraConfig())


@dataclass
class SuiteConfig:
    """The built-in instruction task suite (alignment/data/suite/), generated from a seed."""

    seed: int = 0
    n_train: int = 48000  # training prompts (instances may repeat when a family is small)
    n_eval: int = 400  # held-out prompts, half with phrasings never seen in training
    families: Optional[List[str]] = None  # None: every family
    # Share of SFT demonstrations that wrap the right answer in filler ("Sure! 53"), as chatty
    # human-written demonstrations do. Every task asks for the bare answer, so the verifier
    # counts these wrong: SFT imitates the habit, and preference tuning on verifier-labelled
    # samples has a real, common failure to remove. Held-out answers are always exact.
    demo_chatter_rate: float = 0.1


@dataclass
class SourceConfig:
    """One dataset of a mixture: a file or ``datasets`` name and its share of the mixture."""

    path: str = MISSING
    weight: float = 1.0  # share of the final mixture (normalised over the sources)
    format: Optional[str] = None
    columns: Optional[Dict[str, str]] = None
    split: str = "train"


@dataclass
class DataConfig:
    """Where the examples come from.

    ``path`` unset: the built-in task suite (with exact verifiers, so gold accuracy is known).
    ``path`` set: a local .json/.jsonl/.parquet/.csv file or a ``datasets`` name. SFT reads
    ``messages`` or ``prompt``/``completion`` rows (or ``prompt``/``chosen``); DPO reads
    ``prompt``/``chosen``/``rejected`` rows. A stage's own ``data_path`` overrides this one.
    """

    path: Optional[str] = None
    # Several sources mixed by weight, used when path is unset:
    #   data.sources='[{path: a.jsonl, weight: 0.7}, {path: b.json, weight: 0.3}]'
    sources: List[SourceConfig] = field(default_factory=list)
    mixture_size: Optional[int] = None  # rows in the mixture; None: the sources' total
    format: Optional[str] = None  # None: detected from the first row (see alignment/data/formats.py)
    columns: Optional[Dict[str, str]] = None  # e.g. {prompt: question, completion: answer}
    split: str = "train"
    # Checks before training (alignment/data/checks.py): rows longer than the stage's max_seq_tokens
    # are dropped, truncated (kept if a response token survives) or an error; a run whose
    # degenerate and dropped rows exceed max_drop_share stops.
    over_length: str = "truncate"  # drop | truncate | error
    max_drop_share: float = 0.05
    eval_fraction: float = 0.05  # share of rows held out for evaluation
    max_eval_rows: int = 200
    suite: SuiteConfig = field(default_factory=SuiteConfig)


@dataclass
class StageConfig:
    """What every stage reads: its start, its data, its optimiser and its mid-stage checkpoints."""

    learning_rate: float = 1e-5
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    max_grad_norm: float = 1.0
    logging_every_n_steps: int = 10
    # Starting checkpoint: None takes the parent stage's checkpoint (or model.* for the first
    # stage); a path to an HF directory or a previous stage's directory overrides it.
    init_from: Optional[str] = None
    data_path: Optional[str] = None  # overrides data.path for this stage
    data_sources: List[SourceConfig] = field(default_factory=list)  # a mixture for this stage only
    # Mid-stage checkpoints (optimizer, scheduler, RNG and data position included), kept under
    # <stage>/trainer/; an interrupted stage resumes from the newest complete one. 0: never.
    save_every_n_steps: int = 200
    keep_checkpoints: int = 2  # older mid-stage checkpoints are deleted
    # Resume from this mid-stage checkpoint instead of the newest complete one (a path); a
    # checkpoint that is partial or from other inputs is then an error, not skipped.
    resume_from: Optional[str] = None


@dataclass
class TrainConfig(StageConfig):
    """A stage trained by a TRL trainer over a dataset: batches, epochs, schedule, lengths."""

    per_device_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    # Optional: the sequences per optimiser step you intend. When set it must equal
    # per_device_batch_size x gradient_accumulation_steps x processes, checked before launch.
    global_batch_size: Optional[int] = None
    num_epochs: float = 1.0
    max_steps: int = -1  # > 0 overrides num_epochs
    warmup_ratio: float = 0.03
    lr_scheduler: str = "cosine"
    # Recompute activations in the backward pass: less memory, about a third more compute. Off
    # unless memory needs it (TRL's configs turn it on by default; we say it here instead).
    gradient_checkpointing: bool = False
    max_seq_tokens: int = 1024  # prompt + response, in tokens


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
class PPOConfig(StageConfig):
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
    ppo_epochs: int = 2
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
class OnlineRLConfig(TrainConfig):
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
    eval: EvalConfig = field(default_factory=EvalConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    recipe: Optional[str] = None  # filled in from +recipe=NAME; recorded in every result.json


GROUPS = {
    "model": ModelConfig,
    "data": DataConfig,
    "sft": SFTConfig,
    "reward": RewardConfig,
    "dpo": DPOConfig,
    "ppo": PPOConfig,
    "grpo": GRPOConfig,
    "rloo": RLOOConfig,
    "eval": EvalConfig,
    "deepspeed": DeepSpeedConfig,
    "launcher": LauncherConfig,
    "logger": LoggerConfig,
}


def register_schemas() -> None:
    """Register the schemas; conf/config.yaml and each group's YAML extend them."""
    cs = ConfigStore.instance()
    cs.store(name="alignment_schema", node=AlignmentConfig)
    for group, schema in GROUPS.items():
        cs.store(group=group, name=f"{group}_schema", node=schema)
