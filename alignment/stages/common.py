"""What every stage shares, written once: where it starts from, loading its tokenizer and policy,
committing its checkpoint, and the record it hands to the next stage.

A stage module uses these and says only what differs: the TRL-backed stages through the
skeleton in alignment/stages/trl_stage.py, PPO through its own loop (alignment/stages/ppo/).
"""

from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Generic, Optional, TypeVar

import torch
from safetensors import SafetensorError
from transformers import PreTrainedModel, PreTrainedTokenizerBase, set_seed

from alignment.config import AlignmentConfig, StageConfig
from alignment.data.stage_data import StageData
from alignment.errors import StageError
from alignment.modeling import lora, packing
from alignment.modeling.loading import build_embedded_policy, load_causal_lm, load_tokenizer
from alignment.records import (
    CHECKPOINT_DIR,
    StageResult,
    cached_directory_hash,
    commit_checkpoint,
    file_digests,
    hash_directory,
    new_checkpoint_dir,
    read_result,
)
from alignment.scale import distributed
from alignment.tracking.base import NullTracker, Tracker


@dataclass(frozen=True)
class StartPoint:
    """The checkpoint a stage starts from. ``path`` None means the embedded model from config.

    An adapter start (init_from an adapter directory) has ``adapter`` set, ``path`` its base and
    ``hash`` the adapter directory's content hash. A GGUF start (``model.gguf_file``) has
    ``gguf_file`` set: the file inside the directory ``path``, and ``hash`` that file's.
    """

    path: Optional[str]
    hash: Optional[str]
    parent_stage: Optional[str] = None
    adapter: Optional[str] = None
    gguf_file: Optional[str] = None

    @property
    def label(self) -> str:
        base = self.path or "embedded model (model.* config)"
        base = f"{base}/{self.gguf_file}" if self.gguf_file else base
        return f"{base} + adapter {self.adapter}" if self.adapter else base

    def record(self) -> dict[str, Any]:
        """How a result.json names this start when it is a second input (a reward model)."""
        return {"stage": self.parent_stage, "checkpoint": self.path, "hash": self.hash}


@dataclass
class StageContext:
    """What the pipeline hands a stage: the whole config, its directory and its start point."""

    cfg: AlignmentConfig
    run_dir: Path
    stage_dir: Path
    stage: str
    start: StartPoint
    is_first: bool
    previous: dict[str, StageResult] = field(default_factory=dict)  # earlier stages of this run
    inputs_key: str = ""  # the stage's inputs hash: mid-stage checkpoints carry it
    tracker: Tracker = field(default_factory=NullTracker)  # the stage's W&B/TensorBoard run (alignment/tracking/)


T = TypeVar("T")


class Lazy(Generic[T]):
    """A value built on first call (a model only some paths need); ``value`` is None until then."""

    def __init__(self, build: Callable[[], T]):
        self._build, self.value = build, None

    def __call__(self) -> T:
        if self.value is None:
            self.value = self._build()
        return self.value


@dataclass(frozen=True)
class SavedCheckpoint:
    """A committed stage-boundary checkpoint; ``adapter`` is the LoRA adapter's record, if any."""

    path: str
    content_hash: str
    adapter: Optional[dict[str, Any]] = None
    files: dict[str, Any] = field(default_factory=dict)  # per file: bytes and sha256 (records.file_digests)


def resolve_start(ref: str, *, run_dir: Path, gguf_file: Optional[str] = None) -> StartPoint:
    """A start point from ``init_from`` or ``model.name_or_path``: a stage directory, an adapter
    directory (peft), an HF directory, a directory holding ``gguf_file``, or a hub id."""
    if gguf_file:
        return _gguf_start(ref, gguf_file)
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
            return StartPoint(str(path.resolve()), cached_directory_hash(path))
    if ref.startswith((".", "/", "~")) or Path(ref).suffix:
        raise StageError(f"init_from={ref}: no stage directory (with result.json) or HF model directory (with config.json) there")
    return StartPoint(ref, None)  # a hub id: from_pretrained resolves it (needs the network)


def _gguf_start(ref: str, gguf_file: str) -> StartPoint:
    local = Path(ref).expanduser() / gguf_file
    if local.is_file():
        return StartPoint(str(Path(ref).expanduser().resolve()), cached_directory_hash(local.parent, only=[local.name]),
                          gguf_file=gguf_file)
    if ref.startswith((".", "/", "~")) or Path(ref).is_dir():
        raise StageError(f"model.gguf_file={gguf_file}: no such file in model.name_or_path={ref}; name the GGUF file inside "
                         f"that directory (transformers' gguf_file), e.g. model.gguf_file=SmolLM2-135M-Instruct.Q4_1.gguf")
    return StartPoint(ref, None, gguf_file=gguf_file)  # a hub repository's GGUF file (needs the network)


def find_reward_model(ref: Optional[str], ctx: StageContext, *, key: str) -> StartPoint:
    """The reward model a stage uses: ``ref`` (a stage or HF dir) or the chain's reward stage."""
    if ref:
        return resolve_start(ref, run_dir=ctx.run_dir)
    record = ctx.previous.get("reward")
    if record is None:
        raise StageError(f"{ctx.stage} needs a reward model: run a reward stage before it, or set {key}=<reward stage or HF dir>")
    return StartPoint(record.checkpoint, record.checkpoint_hash, record.stage)


def require_policy_start(ctx: StageContext) -> None:
    """Stages after SFT start from a trained policy, never from the embedded model's random init."""
    if ctx.start.path is None:
        raise StageError(f"{ctx.stage} needs a trained policy to start from: run it after sft, or set "
                         f"{ctx.stage}.init_from=<stage or HF dir>")


def seed_everything(ctx: StageContext) -> None:
    set_seed(ctx.cfg.seed)


def stage_tokenizer(ctx: StageContext) -> PreTrainedTokenizerBase:
    """The tokenizer of the checkpoint the stage starts from (``model.tokenizer_name_or_path``
    for the first stage, when set), loaded before any model so data can be checked first."""
    model_cfg = ctx.cfg.model
    if ctx.start.path is None:
        return load_tokenizer(None, model_cfg)
    if ctx.is_first and model_cfg.tokenizer_name_or_path:
        return load_tokenizer(model_cfg.tokenizer_name_or_path, model_cfg, key="model.tokenizer_name_or_path")
    return load_tokenizer(ctx.start.path, model_cfg, key=f"model.name_or_path / {ctx.stage}.init_from", gguf_file=ctx.start.gguf_file)


def load_policy(ctx: StageContext, tokenizer: PreTrainedTokenizerBase, *, trainable: bool = True,
                sharded: Optional[bool] = None) -> PreTrainedModel:
    """The causal LM the stage starts from, on the stage's device. With model.peft set, a policy the
    stage trains comes wrapped in LoRA adapters (fresh, or the start point's adapter); see
    alignment/modeling/lora.py.

    ``sharded`` (default: ``trainable``): under ZeRO-3 the model is created partitioned over the
    ranks (:func:`zero3_creation`), so no rank holds all of it; sampling from it on rank 0 alone
    needs ``distributed.gathered`` around. The embedded toy is built whole and partitioned at once."""
    zero3 = zero3_creation(ctx) if (trainable if sharded is None else sharded) else None
    if ctx.start.path is None:
        model = distributed.partition(build_embedded_policy(ctx.cfg.model, tokenizer), zero3)
    else:
        model = load_causal_lm(ctx.start.path, ctx.cfg.model, tokenizer, key=f"model.name_or_path / {ctx.stage}.init_from",
                               gguf_file=ctx.start.gguf_file, zero3=zero3)
    return place(lora.attach(model, ctx.cfg, task=lora.CAUSAL_LM, adapter=ctx.start.adapter, trainable=trainable))


def zero3_creation(ctx: StageContext) -> Optional[dict[str, Any]]:
    """The ZeRO-3 JSON that models a stage trains (and PPO's frozen ones) are created partitioned
    with (alignment/scale/distributed.py: ``zero3_init_config``), or None without ZeRO-3; also None
    with QLoRA (transformers never partitions a 4-bit base) and for a start adapter that is merged
    into its base (model.peft unset: peft merges whole weights)."""
    if ctx.cfg.model.peft == "qlora" or (ctx.start.adapter and ctx.cfg.model.peft is None):
        return None
    return distributed.zero3_init_config(ctx.cfg.deepspeed, dtype=ctx.cfg.model.dtype)


def place(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` on the device this process trains on (its GPU, else the CPU): every model a stage
    samples from or scores with, so generation and scoring never run on the CPU of a GPU node.
    A 4-bit QLoRA base was placed by its loader (``device_map``) and stays there; so does a
    model partitioned under ZeRO-3 (``deepspeed.zero.Init`` put each rank's part on its device)."""
    if getattr(lora.unwrap(model), "hf_device_map", None) is None and not distributed.is_zero3(model):
        model.to(distributed.device())
    return model


def padding_free(model: PreTrainedModel, ctx: StageContext) -> PreTrainedModel:
    """``model`` with padding-free forwards switched on when ``model.padding_free`` (the default):
    each right-padded batch runs repacked into fewer rows inside the backbone
    (alignment/modeling/packing.py); losses and gradients are those of the padded batch."""
    if ctx.cfg.model.padding_free:
        packing.enable(model)
    return model


def save_checkpoint(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, ctx: StageContext, *, trainer=None) -> SavedCheckpoint:
    """Write the full HF-format checkpoint atomically; return it with its content hash.

    Called on every rank: under ZeRO-3 the weights are gathered (a collective) and rank 0 writes
    them, so the stage boundary is an ordinary model whatever the sharding. A failed write (a
    full disk) removes the partial directory and leaves the previous checkpoint as it was.

    A model with LoRA adapters also writes ``<stage>/adapter/``; the checkpoint is then the base
    with the adapter merged in, and the adapter's record comes back as ``adapter``.
    """
    state_dict = None
    if trainer is not None and distributed.is_zero3(trainer.model):
        # A LoRA model gathers its adapter alone (the base on disk is merged into tensor by tensor);
        # otherwise the whole model, gathered onto rank 0.
        state_dict = (lora.gathered_trainable(model) if lora.is_peft(model)
                      else trainer.accelerator.get_state_dict(trainer.model_wrapped))
    answer: tuple[Optional[SavedCheckpoint], Optional[str]] = (None, None)
    if distributed.is_main():
        tmp = new_checkpoint_dir(ctx.stage_dir)
        try:
            adapter = None
            if lora.is_peft(model):
                adapter = lora.save(model, tokenizer, cfg=ctx.cfg, stage_dir=ctx.stage_dir, merged_dir=tmp, base=ctx.start.path,
                                    state_dict=state_dict, gguf_file=ctx.start.gguf_file)
            else:
                model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
                shutil.rmtree(ctx.stage_dir / lora.ADAPTER_DIR, ignore_errors=True)  # from an earlier LoRA run: stale
            tokenizer.save_pretrained(tmp)
            content_hash, files = file_digests(tmp)
            final = commit_checkpoint(tmp, ctx.stage_dir)
            answer = (SavedCheckpoint(str(final.resolve()), content_hash, adapter, files), None)
        except (OSError, SafetensorError) as err:  # safetensors reports a full disk as its own error, not an OSError
            shutil.rmtree(tmp, ignore_errors=True)
            answer = (None, f"{ctx.stage}: could not write the checkpoint in {ctx.stage_dir} ({err}); the partial "
                            f"write was removed and the previous checkpoint, if any, is unchanged. Free disk space "
                            f"or point output_dir elsewhere, then rerun")
    saved, error = distributed.broadcast(answer)
    if error:
        raise StageError(error)
    return saved


def stage_result(ctx: StageContext, cfg: StageConfig, *, saved: SavedCheckpoint, data: StageData, metrics: dict[str, Any],
                 start_metrics: Optional[dict[str, Any]] = None, inputs: Optional[dict[str, Any]] = None,
                 outputs: Optional[dict[str, Any]] = None) -> StageResult:
    """The stage's record; the pipeline adds timing, versions and the inputs hash. ``inputs``
    names the other checkpoints the stage used (a reward model); the start adapter and the
    trained adapter join them. ``outputs``: files written for later stages (records.StageResult)."""
    inputs = dict(inputs or {})
    if ctx.start.adapter:
        inputs["start_adapter"] = {"adapter": ctx.start.adapter, "hash": ctx.start.hash}
    if saved.adapter is not None:
        inputs["peft"] = saved.adapter
    return StageResult(
        stage=ctx.stage,
        status="complete",
        checkpoint=saved.path,
        checkpoint_hash=saved.content_hash,
        checkpoint_files=saved.files,
        parent_stage=ctx.start.parent_stage,
        parent_checkpoint=ctx.start.path,
        parent_checkpoint_hash=ctx.start.hash,
        data_fingerprint=data.fingerprint,
        inputs_hash="",
        config=asdict(cfg),
        inputs=inputs,
        metrics=metrics,
        start_metrics=start_metrics or {},
        data=data.counts,
        outputs=outputs or {},
    )
