"""LoRA and QLoRA for every stage, written once (Hu et al. 2021; Dettmers et al. 2023).

With ``model.peft=lora`` every trained model is wrapped by peft: the base weights W stay frozen
and each target linear layer computes W x + (alpha / r) B A x. B starts at zero, so a stage
starts exactly at its parent. A reward or value model (``SEQ_CLS``) also trains its new scalar
``score`` head in full (peft's ``modules_to_save``): a frozen random head would score nothing.
``model.peft=qlora`` does the same on a base loaded in 4 bits (NF4, bf16 compute) through
bitsandbytes, on a CUDA GPU.

A stage boundary leaves two things:

- ``<stage>/adapter/``: the adapter in peft format (and the tokenizer). ``adapter_config.json``
  names, as an absolute path, the base it adapts: the checkpoint the stage started from, or for
  the embedded default model (built in memory) ``adapter/base/``, written alongside;
- ``<stage>/checkpoint/``: that base with the adapter merged in, a plain HF model. The next stage
  starts from it. Merging reads the base unquantised on the CPU, so a QLoRA adapter is merged
  into full-precision weights, not into their 4-bit rounding. A policy's adapter on a safetensors
  base is merged tensor by tensor from the base's files and written shard by shard
  (alignment/modeling/merge.py): no whole copy of the model on the saving rank (the embedded
  toy's base is written to ``adapter/base/`` first and merged from there). A GGUF base and a
  reward or value model's adapter (its new score head) still go through peft's merge on the
  whole base reloaded in the configured dtype: a GGUF file is dequantised whole, and the head
  lives in the adapter, not in the base's files.

A stage whose ``init_from`` is an adapter directory loads the adapter's base and keeps training
that adapter (with ``model.peft`` unset the adapter is merged and the whole model trained).

The reference policy (DPO, PPO) is the policy a stage started from, and with LoRA it needs no
second copy of the model: for a fresh adapter it is the same network with its adapters disabled;
for a continued adapter, a frozen copy of that adapter named ``ref`` (PPO calls
``add_reference_adapter``). TRL's DPOTrainer, given a PeftModel and ``ref_model=None``, makes
that ``ref`` copy itself in both cases (a fresh adapter's copy is zero: the same as disabled).
``reference_disabled`` computes with whichever the model has.

    python -m alignment.run +recipe=sft_then_dpo model.peft=lora model.lora.r=8
    python -m alignment.run +recipe=dpo model.peft=lora dpo.init_from=outputs/sft_then_dpo/sft/adapter
    python -m alignment.run +recipe=sft_then_dpo model=hf model.peft=qlora model.name_or_path=/path/to/hf_model model.dtype=bfloat16
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, PreTrainedModel, PreTrainedTokenizerBase

from alignment.config import AlignmentConfig, LoraConfig, ModelConfig
from alignment.errors import ConfigError
from alignment.modeling import embedded, merge
from alignment.modeling.gguf import as_plain_model
from alignment.records import commit_checkpoint, hash_directory, new_checkpoint_dir
from alignment.scale import distributed

log = logging.getLogger(__name__)

CAUSAL_LM, SEQ_CLS = "CAUSAL_LM", "SEQ_CLS"  # peft task types: a policy, a reward or value model
ADAPTER_DIR = "adapter"
ADAPTER_CONFIG = "adapter_config.json"
TRAINED = "default"  # peft's name for the adapter being trained
REFERENCE_ADAPTER = "ref"  # TRL's name for the frozen copy of a continued adapter
_HEADS = {SEQ_CLS: ["score"]}  # new layers that train in full next to the adapter
_AUTO_MODEL = {CAUSAL_LM: AutoModelForCausalLM, SEQ_CLS: AutoModelForSequenceClassification}


def peft_config(cfg: LoraConfig, *, task: str) -> PeftLoraConfig:
    """peft's LoraConfig from ours; ``task`` is CAUSAL_LM or SEQ_CLS."""
    targets = list(cfg.target_modules)
    return PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules="all-linear" if targets == ["all-linear"] else targets,
        modules_to_save=_HEADS.get(task),
        task_type=task,
    )


def is_peft(model: torch.nn.Module) -> bool:
    return isinstance(model, PeftModel)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside a PeftModel, adapters still applied (its layers are patched
    in place). Code that reaches for ``model.score`` or the backbone needs this one."""
    return model.get_base_model() if is_peft(model) else model


def load_kwargs(model_cfg: ModelConfig) -> dict[str, Any]:
    """Extra ``from_pretrained`` arguments: with qlora the base is quantised to 4 bits on this
    process's GPU (a 4-bit model cannot be moved after loading)."""
    if model_cfg.peft != "qlora":
        return {}
    from transformers import BitsAndBytesConfig

    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_use_double_quant=True
    )
    return {"quantization_config": quantization, "device_map": {"": int(os.environ.get("LOCAL_RANK", "0"))}}


def qlora_problem(cfg: AlignmentConfig) -> Optional[str]:
    """Why ``model.peft=qlora`` cannot run here, or None; checked before anything loads."""
    if cfg.model.peft != "qlora":
        return None
    reasons = []
    if not torch.cuda.is_available():
        reasons.append("it needs a CUDA GPU and there is none here")
    if not _bitsandbytes_installed():
        reasons.append("it needs bitsandbytes, which is not installed (pip install 'alignment[qlora]')")
    first = getattr(cfg, cfg.stages[0]) if cfg.stages else None
    if not cfg.model.name_or_path and not (first is not None and first.init_from):
        reasons.append("the embedded default model (model.name_or_path unset) is built in memory and cannot be loaded "
                       "in 4 bits; set model.name_or_path=<HF dir>")
    if not reasons:
        return None
    return (f"model.peft=qlora (LoRA on a 4-bit base through bitsandbytes) cannot run: {'; '.join(reasons)}. "
            f"Use model.peft=lora on CPU or with the embedded model")


def attach(model: PreTrainedModel, cfg: AlignmentConfig, *, task: str, adapter: Optional[str], trainable: bool = True) -> PreTrainedModel:
    """The model a stage works with, given the base it loaded.

    ``adapter`` (an adapter directory the stage starts from) is loaded onto the base: kept as a
    trainable adapter with model.peft set, merged in otherwise. Without one, a trained model gets
    a fresh adapter from ``model.lora`` when model.peft is set. A model that is not trained
    (``trainable=False``) gets no fresh adapter and ignores an adapter of another task: a
    reward adapter's base is the policy it was trained from.
    """
    peft = cfg.model.peft
    if adapter is not None and adapter_task(adapter) != task:
        if not trainable:
            return model
        check_task(adapter, task=task)
    if trainable and peft == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    # Adapters train in float32 on a bf16/fp16 base, except under ZeRO-3, which gathers
    # parameters of one dtype: there they stay in the base's dtype.
    adapter_dtype = {"autocast_adapter_dtype": cfg.deepspeed.zero_stage != 3}
    if adapter is not None:
        loaded = PeftModel.from_pretrained(model, adapter, is_trainable=peft is not None and trainable, **adapter_dtype)
        return loaded if peft is not None else loaded.merge_and_unload()
    if peft is None or not trainable:
        return model
    wrapped = get_peft_model(model, peft_config(cfg.model.lora, task=task), **adapter_dtype)
    counts = trainable_parameters(wrapped)
    log.info("LoRA r=%d on %s: %d of %d parameters train (%.2f%%)", cfg.model.lora.r, task, counts["trainable_params"],
             counts["total_params"], 100 * counts["trainable_share"])
    return wrapped


def add_reference_adapter(model: PeftModel) -> None:
    """Keep a frozen copy of the adapter being trained as the reference (a continued adapter:
    disabling adapters would give its base, not the policy the stage started from)."""
    model.add_adapter(REFERENCE_ADAPTER, model.peft_config[TRAINED])
    for name, param in model.named_parameters():
        if f".{TRAINED}." in name:
            model.get_parameter(name.replace(f".{TRAINED}.", f".{REFERENCE_ADAPTER}.")).data.copy_(param.data)
    model.set_adapter(TRAINED)


@contextlib.contextmanager
def reference_disabled(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Inside, ``model`` computes as the policy its stage started from: with every adapter
    disabled (where a fresh adapter starts) or, for a continued adapter, with its frozen ``ref``
    copy. Use it under torch.no_grad(). A no-op for a model without adapters."""
    if not is_peft(model):
        yield model
    elif REFERENCE_ADAPTER in model.peft_config:
        model.set_adapter(REFERENCE_ADAPTER, inference_mode=True)
        try:
            yield model
        finally:
            model.set_adapter(TRAINED)  # also makes the trained adapter trainable again
    else:
        with model.disable_adapter():
            yield model


class ReferenceView(torch.nn.Module):
    """The reference policy as a model of its own, for code that takes two models (rollout
    log-probs, KL): every forward runs ``policy`` in eval mode inside :func:`reference_disabled`.
    No weights of its own; train()/eval() on the view leave the policy's mode alone."""

    def __init__(self, policy: PeftModel):
        super().__init__()
        self.policy = policy

    def train(self, mode: bool = True) -> "ReferenceView":
        self.training = mode
        return self

    def forward(self, *args, **kwargs):
        was_training = self.policy.training
        self.policy.eval()  # the frozen reference never drops out
        try:
            with reference_disabled(self.policy):
                return self.policy(*args, **kwargs)
        finally:
            self.policy.train(was_training)


def trainable_parameters(model: torch.nn.Module) -> dict[str, Any]:
    """Trained and total parameter counts (a reference copy of the adapter counts in neither)."""
    trainable, total = model.get_nb_trainable_parameters() if is_peft(model) else (
        sum(p.numel() for p in model.parameters() if p.requires_grad), sum(p.numel() for p in model.parameters()))
    total -= sum(p.numel() for name, p in model.named_parameters() if f".{REFERENCE_ADAPTER}." in name)
    return {"trainable_params": int(trainable), "total_params": int(total), "trainable_share": trainable / max(1, total)}


def gathered_trainable(model: PeftModel) -> dict[str, torch.Tensor]:
    """The trained parameters (adapters, a score head) of a model partitioned under ZeRO-3, whole,
    on the CPU: all ``save`` needs, instead of the whole model. A collective: call on every rank."""
    import deepspeed

    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None):
        return {name: p.detach().cpu().clone() for name, p in named}


def is_adapter_dir(path: Path) -> bool:
    return (path / ADAPTER_CONFIG).is_file()


def adapter_task(path: str | Path) -> Optional[str]:
    return _adapter_config(Path(path)).get("task_type")


def check_task(adapter: str, *, task: str) -> None:
    """An adapter continues only on the kind of model it was trained on (a policy's adapter
    cannot become a reward model's)."""
    found = adapter_task(adapter)
    if found != task:
        raise ConfigError(f"init_from={adapter}: a {found} adapter cannot be trained on as a {task} model; point init_from "
                          f"at the directory of the stage that wrote it (its merged checkpoint) instead")


def adapter_base(path: Path, *, key: str) -> str:
    """The base an adapter directory adapts (its adapter_config's base_model_name_or_path)."""
    base = _adapter_config(path).get("base_model_name_or_path")
    if not base:
        raise ConfigError(f"{key}={path}: {ADAPTER_CONFIG} names no base model (base_model_name_or_path); "
                          f"set it to the model directory the adapter was trained on")
    if base.startswith(("/", ".", "~")) and not (Path(base).expanduser() / "config.json").is_file():
        raise ConfigError(f"{key}={path}: the adapter's base {base} (base_model_name_or_path in {ADAPTER_CONFIG}) is not a "
                          f"model directory here; rerun the stage that wrote it, or edit that path")
    return base


def save(
    model: PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    *,
    cfg: AlignmentConfig,
    stage_dir: Path,
    merged_dir: Path,
    base: Optional[str],
    state_dict: Optional[dict[str, torch.Tensor]] = None,
    gguf_file: Optional[str] = None,
) -> dict[str, Any]:
    """Write the trained adapter to ``<stage_dir>/adapter/`` (atomically: a temporary directory
    renamed into place) and the merged model into ``merged_dir``; return the adapter's record.

    ``base`` is what the stage started from (None: the embedded model; ``gguf_file``: a GGUF file
    in it); ``state_dict`` the gathered weights under ZeRO-3. Runs on one rank.
    """
    final = stage_dir / ADAPTER_DIR
    tmp = new_checkpoint_dir(stage_dir, name=ADAPTER_DIR)
    task = model.peft_config[TRAINED].task_type
    pad_token_id = unwrap(model).config.pad_token_id  # what the stage set (the score is read at the last non-pad token)
    source = base  # the base's files, read by the merge
    try:
        if base is None:  # the embedded model exists only in memory: write the base next to the adapter
            base_model = _load_unquantised(None, cfg=cfg.model, task=task, tokenizer=tokenizer)
            base_model.save_pretrained(tmp / "base")
            tokenizer.save_pretrained(tmp / "base")
            base, source = str((final / "base").resolve()), str(tmp / "base")
        model.peft_config[TRAINED].base_model_name_or_path = base
        # No stage resizes the vocabulary, so no embedding matrix goes with the adapter (and peft
        # does not look the base up on the hub to check).
        model.save_pretrained(tmp, selected_adapters=[TRAINED], state_dict=state_dict, save_embedding_layers=False)
        tokenizer.save_pretrained(tmp)
        if merge.can_stream(source, model.peft_config[TRAINED], gguf_file=gguf_file):
            # Tensor by tensor from the base's files: no whole copy of the model on this rank.
            merge.merge_streaming(source, tmp, model.peft_config[TRAINED], out_dir=merged_dir, dtype=getattr(torch, cfg.model.dtype),
                                  pad_token_id=pad_token_id)
        else:  # a GGUF or embedded base, a reward model's head: peft merges a whole reloaded base
            base_model = _load_unquantised(base, cfg=cfg.model, task=task, tokenizer=tokenizer, gguf_file=gguf_file)
            merged = PeftModel.from_pretrained(base_model, tmp).merge_and_unload()
            merged.config.pad_token_id = pad_token_id
            if getattr(merged, "generation_config", None) is not None:  # a causal LM
                merged.generation_config.pad_token_id = pad_token_id
            merged.save_pretrained(merged_dir, safe_serialization=True)
        commit_checkpoint(tmp, stage_dir, name=ADAPTER_DIR)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    lora = model.peft_config[TRAINED]
    return {
        "method": cfg.model.peft,
        "adapter": str(final.resolve()),
        "adapter_hash": hash_directory(final),
        "base": base,
        **({"base_gguf_file": gguf_file} if gguf_file else {}),
        "task": task,
        "r": lora.r,
        "alpha": lora.lora_alpha,
        **trainable_parameters(model),
    }


def _load_unquantised(base: Optional[str], *, cfg: ModelConfig, task: str, tokenizer: PreTrainedTokenizerBase,
                      gguf_file: Optional[str] = None) -> PreTrainedModel:
    """The base again, on the CPU in the configured dtype, for merging (and, for the embedded
    model, for writing out: it is rebuilt from config with the same seed, so identical)."""
    dtype = getattr(torch, cfg.dtype)
    if base is None:
        return embedded.build_model(cfg, tokenizer).to(dtype)
    extra = {"num_labels": 1} if task == SEQ_CLS else {}
    if gguf_file:
        extra["gguf_file"] = gguf_file
    with distributed.whole_loading():
        model = _AUTO_MODEL[task].from_pretrained(base, dtype=dtype, **extra)
    return as_plain_model(model) if gguf_file else model


def _bitsandbytes_installed() -> bool:
    return importlib.util.find_spec("bitsandbytes") is not None


def _adapter_config(path: Path) -> dict[str, Any]:
    try:
        return json.loads((path / ADAPTER_CONFIG).read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"init_from={path}: cannot read {ADAPTER_CONFIG} ({err}); is it a peft adapter directory?") from err
