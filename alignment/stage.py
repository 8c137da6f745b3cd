"""Set-up every stage shares, written once: where a stage starts from, loading the model and
tokenizer, TRL/Trainer arguments from our typed config, and committing the checkpoint.

A stage module (``sft.py``, ``dpo.py``) only wires these pieces to its TRL trainer.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase, set_seed

from alignment import distributed, embedded, lora, packing
from alignment.checkpoints import trainer_save_kwargs
from alignment.distributed import deepspeed_config
from alignment.config import AlignmentConfig, ConfigError, TrainConfig
from alignment.records import CHECKPOINT_DIR, StageResult, commit_checkpoint, hash_directory, new_checkpoint_dir, read_result
from alignment.tracking import NullTracker, Tracker


class StageError(ConfigError):
    """A stage cannot run as configured; the message says which key or file to fix."""


@dataclass(frozen=True)
class StartPoint:
    """The checkpoint a stage starts from. ``path`` None means the embedded model from config.

    An adapter start (init_from an adapter directory) has ``adapter`` set, ``path`` its base and
    ``hash`` the adapter directory's content hash.
    """

    path: Optional[str]
    hash: Optional[str]
    parent_stage: Optional[str] = None
    adapter: Optional[str] = None

    @property
    def label(self) -> str:
        base = self.path or "embedded model (model.* config)"
        return f"{base} + adapter {self.adapter}" if self.adapter else base


@dataclass
class StageContext:
    """What the pipeline hands a stage: the whole config, its directory and its start point."""

    cfg: AlignmentConfig
    run_dir: Path
    stage_dir: Path
    stage: str
    start: StartPoint
    is_first: bool
    previous: dict[str, "StageResult"] = field(default_factory=dict)  # earlier stages of this run
    # Other checkpoints the stage used (e.g. a reward model), filled in for its record.
    inputs: dict[str, Any] = field(default_factory=dict)
    inputs_key: str = ""  # the stage's inputs hash: mid-stage checkpoints carry it
    tracker: Tracker = field(default_factory=NullTracker)  # the stage's W&B/TensorBoard run (alignment/tracking.py)


def resolve_start(ref: str, *, run_dir: Path) -> StartPoint:
    """A start point from ``init_from``: a stage directory, an adapter directory (peft), an HF
    directory or a hub id."""
    candidates = [Path(ref).expanduser(), run_dir / ref]
    for path in candidates:
        record = read_result(path) if path.is_dir() else None
        if record is not None:
            if record.status != "complete" or not record.checkpoint:
                raise StageError(f"init_from={ref}: stage {record.stage} in {path} did not complete; rerun it first")
            return StartPoint(record.checkpoint, record.checkpoint_hash, record.stage)
        if lora.is_adapter_dir(path):
            owner = read_result(path.parent)  # <stage>/adapter: the stage that wrote it
            return StartPoint(lora.adapter_base(path, key="init_from"), hash_directory(path), owner.stage if owner else None,
                              adapter=str(path.resolve()))
        if (path / CHECKPOINT_DIR / "config.json").is_file():
            raise StageError(f"init_from={ref}: {path} has a checkpoint but no result.json (an interrupted stage); rerun it")
        if (path / "config.json").is_file():
            return StartPoint(str(path.resolve()), hash_directory(path))
    if ref.startswith((".", "/", "~")) or Path(ref).suffix:
        raise StageError(f"init_from={ref}: no stage directory (with result.json) or HF model directory (with config.json) there")
    return StartPoint(ref, None)  # a hub id: from_pretrained resolves it (needs the network)


def find_reward_model(ref: Optional[str], ctx: StageContext, *, key: str) -> StartPoint:
    """The reward model a stage uses: ``ref`` (a stage or HF dir) or the chain's reward stage."""
    if ref:
        return resolve_start(ref, run_dir=ctx.run_dir)
    record = ctx.previous.get("reward")
    if record is None:
        raise StageError(f"{ctx.stage} needs a reward model: run a reward stage before it, or set {key}=<reward stage or HF dir>")
    return StartPoint(record.checkpoint, record.checkpoint_hash, record.stage)


def load_tokenizer(ctx: StageContext) -> PreTrainedTokenizerBase:
    """The stage's tokenizer, with a chat template and a pad token; loaded before any model so
    data can be checked first."""
    cfg = ctx.cfg.model
    if ctx.start.path is None:
        return embedded.build_tokenizer()
    tokenizer_ref = cfg.tokenizer_name_or_path if ctx.is_first and cfg.tokenizer_name_or_path else ctx.start.path
    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_ref)
    except OSError as err:
        raise StageError(f"could not load a tokenizer from {tokenizer_ref!r} ({err}); check model.tokenizer_name_or_path / init_from") from err
    if cfg.chat_template:
        tokenizer.chat_template = cfg.chat_template
    elif not tokenizer.chat_template:
        tokenizer.chat_template = embedded.CHAT_TEMPLATE
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_policy(
    ctx: StageContext, tokenizer: Optional[PreTrainedTokenizerBase] = None, *, trainable: bool = True
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The causal LM and tokenizer the stage starts from, with a usable chat template.

    With model.peft set, a policy the stage trains comes wrapped in LoRA adapters (fresh, or the
    start point's adapter); see alignment/lora.py.
    """
    cfg = ctx.cfg.model
    tokenizer = tokenizer or load_tokenizer(ctx)
    if ctx.start.path is None:
        model = embedded.build_model(cfg, tokenizer)
        model.to(_dtype(cfg.dtype))
        padding_free(model, cfg)
        return lora.attach(model, ctx.cfg, task=lora.CAUSAL_LM, adapter=None, trainable=trainable), tokenizer
    try:
        with distributed.whole_loading():
            model = AutoModelForCausalLM.from_pretrained(
                ctx.start.path, dtype=_dtype(cfg.dtype), attn_implementation=cfg.attn_implementation, **lora.load_kwargs(cfg)
            )
    except OSError as err:
        raise StageError(f"could not load a model from {ctx.start.path!r} ({err}); check model.name_or_path / init_from") from err
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    padding_free(model, cfg)
    return lora.attach(model, ctx.cfg, task=lora.CAUSAL_LM, adapter=ctx.start.adapter, trainable=trainable), tokenizer


def padding_free(model: PreTrainedModel, cfg) -> None:
    """Padding-free forwards for ``model`` when ``model.padding_free`` (``cfg``: the ModelConfig)."""
    if cfg.padding_free:
        packing.enable(model)


def trainer_kwargs(train: TrainConfig, ctx: StageContext) -> dict[str, Any]:
    """Keyword arguments shared by every TRL config class, from our TrainConfig."""
    return {
        "output_dir": str(ctx.stage_dir / "trainer"),
        "learning_rate": train.learning_rate,
        "per_device_train_batch_size": train.per_device_batch_size,
        "per_device_eval_batch_size": train.per_device_batch_size,
        "gradient_accumulation_steps": train.gradient_accumulation_steps,
        "num_train_epochs": train.num_epochs,
        "max_steps": train.max_steps,
        "warmup_steps": train.warmup_ratio,  # a float < 1 is a ratio of the total steps
        "lr_scheduler_type": train.lr_scheduler,
        "weight_decay": train.weight_decay,
        "adam_beta1": train.adam_beta1,
        "adam_beta2": train.adam_beta2,
        "max_grad_norm": train.max_grad_norm,
        "gradient_checkpointing": train.gradient_checkpointing,
        "max_length": train.max_seq_tokens,
        "logging_steps": train.logging_every_n_steps,
        **trainer_save_kwargs(train),
        "deepspeed": deepspeed_config(ctx.cfg.deepspeed, train),
        "report_to": "none",
        "seed": ctx.cfg.seed,
        "data_seed": ctx.cfg.seed,
        "use_cpu": not torch.cuda.is_available(),
        "bf16": ctx.cfg.model.dtype == "bfloat16",
        "dataloader_num_workers": 0,
        "dataset_num_proc": None,
    }


def seed_everything(ctx: StageContext) -> None:
    set_seed(ctx.cfg.seed)


def save_checkpoint(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, ctx: StageContext, *, trainer=None) -> tuple[str, str]:
    """Write the full HF-format checkpoint atomically; return its path and content hash.

    Called on every rank: under ZeRO-3 the weights are gathered (a collective) and rank 0 writes
    them, so the stage boundary is an ordinary model whatever the sharding. A failed write (a
    full disk) removes the partial directory and leaves the previous checkpoint as it was.

    A model with LoRA adapters also writes ``<stage>/adapter/``; the checkpoint is then the base
    with the adapter merged in, and the adapter's record goes to the stage's ``inputs["peft"]``.
    """
    state_dict = None
    if trainer is not None and distributed.is_zero3(trainer.model):
        state_dict = trainer.accelerator.get_state_dict(trainer.model_wrapped)
    if ctx.start.adapter:
        ctx.inputs["start_adapter"] = {"adapter": ctx.start.adapter, "hash": ctx.start.hash}
    answer: tuple[Optional[str], Optional[str], Optional[str]] = (None, None, None)
    if distributed.is_main():
        tmp = new_checkpoint_dir(ctx.stage_dir)
        try:
            if lora.is_peft(model):
                ctx.inputs["peft"] = lora.save(model, tokenizer, cfg=ctx.cfg, stage_dir=ctx.stage_dir, merged_dir=tmp,
                                               base=ctx.start.path, state_dict=state_dict)
            else:
                model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
                shutil.rmtree(ctx.stage_dir / lora.ADAPTER_DIR, ignore_errors=True)  # from an earlier LoRA run: stale
            tokenizer.save_pretrained(tmp)
            content_hash = hash_directory(tmp)
            final = commit_checkpoint(tmp, ctx.stage_dir)
            answer = (str(final.resolve()), content_hash, None)
        except OSError as err:
            shutil.rmtree(tmp, ignore_errors=True)
            answer = (None, None, f"{ctx.stage}: could not write the checkpoint in {ctx.stage_dir} ({err}); the partial "
                                  f"write was removed and the previous checkpoint, if any, is unchanged. Free disk space "
                                  f"or point output_dir elsewhere, then rerun")
    path, content_hash, error = distributed.broadcast(answer)
    if error:
        raise StageError(error)
    return path, content_hash


def train_metrics(train_output: Any, log_history: list[dict[str, Any]]) -> dict[str, Any]:
    """Headline training numbers from a transformers Trainer run."""
    losses = [entry["loss"] for entry in log_history if "loss" in entry]
    metrics = {
        "train_loss_mean": float(train_output.training_loss),
        "train_loss_final": float(losses[-1]) if losses else None,
        "train_steps": int(train_output.global_step),
        "train_seconds": float(train_output.metrics.get("train_runtime", math.nan)),
        # [step, loss] at every logging step (averaged over ranks): the stage's training curve.
        "train_loss_history": [[entry["step"], entry["loss"]] for entry in log_history if "loss" in entry],
    }
    return metrics


def config_dict(obj: Any) -> dict[str, Any]:
    return asdict(obj)


def _dtype(name: str) -> torch.dtype:
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
    except KeyError:
        raise StageError(f"model.dtype={name!r} is not one of float32, bfloat16, float16") from None
