"""Loading tokenizers and models from a checkpoint directory (or hub id), or building the embedded one.

Loaders only load: a tokenizer gets a chat template and a pad token when it lacks them, a model
gets the configured dtype and attention kernel. What a stage then switches on (LoRA adapters,
padding-free forwards) is done by the stage, where a reader sees it (alignment/stages/common.py).

Every model is loaded whole, also while a ZeRO-3 trainer exists (alignment/scale/distributed.py:
``whole_loading``): the models loaded here are sampled from or scored with before a trainer
shards them.
"""

from __future__ import annotations

from typing import Optional

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from alignment.config import ModelConfig
from alignment.errors import StageError
from alignment.modeling import embedded, lora
from alignment.scale.distributed import whole_loading


def dtype_of(name: str) -> torch.dtype:
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
    except KeyError:
        raise StageError(f"model.dtype={name!r} is not one of float32, bfloat16, float16") from None


def load_tokenizer(ref: Optional[str], model_cfg: ModelConfig, *, key: str = "model.name_or_path") -> PreTrainedTokenizerBase:
    """The tokenizer at ``ref`` (None: the embedded one) with a chat template and a pad token, so
    data can be rendered and checked before any model loads. ``key`` names the setting that
    chose ``ref``, for the error message."""
    if ref is None:
        return embedded.build_tokenizer()
    try:
        tokenizer = AutoTokenizer.from_pretrained(ref)
    except OSError as err:
        raise StageError(f"could not load a tokenizer from {ref!r} ({err}); check {key}") from err
    if model_cfg.chat_template:
        tokenizer.chat_template = model_cfg.chat_template
    elif not tokenizer.chat_template:
        tokenizer.chat_template = embedded.CHAT_TEMPLATE
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def build_embedded_policy(model_cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    """The embedded default model, built from ``model_cfg``'s architecture fields."""
    return embedded.build_model(model_cfg, tokenizer).to(dtype_of(model_cfg.dtype))


def load_causal_lm(path: str, model_cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase, *, key: str) -> PreTrainedModel:
    """A causal LM from ``path`` in the configured dtype and attention kernel (4-bit under QLoRA)."""
    try:
        with whole_loading():
            model = AutoModelForCausalLM.from_pretrained(
                path, dtype=dtype_of(model_cfg.dtype), attn_implementation=model_cfg.attn_implementation, **lora.load_kwargs(model_cfg)
            )
    except OSError as err:
        raise StageError(f"could not load a model from {path!r} ({err}); check {key}") from err
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model


def load_reward_model(path: str, model_cfg: ModelConfig) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A sequence-classification model with one output from any causal-LM or reward checkpoint,
    and the tokenizer saved with it."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        with whole_loading():
            model = AutoModelForSequenceClassification.from_pretrained(
                path, num_labels=1, attn_implementation=model_cfg.attn_implementation, **lora.load_kwargs(model_cfg)
            )
    except OSError as err:
        raise StageError(f"could not load a reward model from {path!r} ({err})") from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id  # the score is read at the last non-pad token
    return model, tokenizer


def load_value_model_from_policy(path: str) -> PreTrainedModel:
    """A scalar-head model on a policy checkpoint (PPO's ``value_from=policy``); the head is new."""
    with whole_loading():
        return AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)
