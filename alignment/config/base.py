"""The schema's foundations: the model, the data, and what every stage reads (StageConfig,
TrainConfig). Part of the typed configuration that alignment/config/__init__.py registers."""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Dict, List, Optional

from omegaconf import MISSING


def shipped_dir(package: str, source_dir: str) -> Path:
    """Where conf/, recipes/ or slurm/ are: inside the installed package (``alignment.conf``),
    or, when this is a source checkout imported without installing it, the repository's top level."""
    try:
        return Path(str(resources.files(package)))
    except ModuleNotFoundError:
        return Path(__file__).resolve().parents[2] / source_dir


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

    # Sequences per optimiser step over all processes (pairs for reward and DPO, replies for GRPO
    # and RLOO), so that a recipe trains the same model at any process count: each process takes
    # global_batch_size / processes per step, in forwards of at most per_device_batch_size (the
    # largest such that divides it), accumulating gradients over the rest (split_batch below; the
    # plan is logged at launch). null: per_device_batch_size x gradient_accumulation_steps x processes.
    global_batch_size: Optional[int] = 32
    per_device_batch_size: int = 8  # the most sequences one device runs in one forward
    gradient_accumulation_steps: Optional[int] = None  # only with global_batch_size=null (then default 1)
    num_epochs: float = 1.0
    max_steps: int = -1  # > 0 overrides num_epochs
    warmup_ratio: float = 0.03
    lr_scheduler: str = "cosine"
    # Recompute activations in the backward pass: less memory, about a third more compute. Off
    # unless memory needs it (TRL's configs turn it on by default; we say it here instead).
    gradient_checkpointing: bool = False
    max_seq_tokens: int = 1024  # prompt + response, in tokens

    def split_batch(self, world: int) -> tuple[int, int]:
        """(sequences per forward on each device, forwards accumulated per optimiser step) for
        ``world`` processes; a global batch that does not split evenly over them is an error that
        names the key (checked before launch: alignment/config_checks.py)."""
        if self.global_batch_size is None:
            return self.per_device_batch_size, self.gradient_accumulation_steps or 1
        per_process, uneven = divmod(self.global_batch_size, world)
        if uneven or not per_process:
            raise ValueError(f"global_batch_size={self.global_batch_size} does not split evenly over {world} processes: pick a "
                             f"multiple of {world}")
        forward = max(d for d in range(1, min(self.per_device_batch_size, per_process) + 1) if per_process % d == 0)
        return forward, per_process // forward

    def sequences_per_step(self, world: int) -> int:
        """Sequences in one optimiser step over all ``world`` processes."""
        forward, accumulation = self.split_batch(world)
        return forward * accumulation * world
