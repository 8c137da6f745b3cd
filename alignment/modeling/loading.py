"""Loading tokenizers and models from a checkpoint directory (or hub id), or building the embedded one.

Loaders only load: a tokenizer gets a chat template and a pad token when it lacks them, a model
gets the configured dtype and attention kernel. What a stage then switches on (LoRA adapters,
padding-free forwards) is done by the stage, where a reader sees it (alignment/stages/common.py).

A loader given ``zero3`` (the ZeRO-3 JSON of alignment/scale/distributed.py:
``zero3_init_config``) creates its model partitioned over the ranks (``model_creation``): no rank
holds the whole model, and sampling from it on rank 0 gathers it first (``gathered``). Without
``zero3`` the model is loaded whole, also while a ZeRO-3 trainer exists.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Optional

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from alignment.config import ModelConfig
from alignment.errors import StageError, UserError
from alignment.modeling import embedded, lora
from alignment.modeling.gguf import as_plain_model
from alignment.scale.distributed import model_creation


def dtype_of(name: str) -> torch.dtype:
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
    except KeyError:
        raise StageError(f"model.dtype={name!r} is not one of float32, bfloat16, float16") from None


def load_tokenizer(ref: Optional[str], model_cfg: ModelConfig, *, key: str = "model.name_or_path",
                   gguf_file: Optional[str] = None) -> PreTrainedTokenizerBase:
    """The tokenizer at ``ref`` (None: the embedded one; ``gguf_file``: the one inside that GGUF
    file of ``ref``) with a chat template and a pad token, so data can be rendered and checked
    before any model loads. ``key`` names the setting that chose ``ref``, for the error message.

    A tokenizer without a chat template gets :func:`fallback_chat_template`, written for its own
    end-of-sequence token; one without a pad token pads with its EOS token (the pad positions are
    masked everywhere, and reward models are read where training read them: see scoring.py)."""
    if ref is None:
        return embedded.build_tokenizer()
    with loading("a tokenizer", ref, key=key, gguf_file=gguf_file):
        tokenizer = AutoTokenizer.from_pretrained(ref, **({"gguf_file": gguf_file} if gguf_file else {}))
    if tokenizer.eos_token is None:
        raise StageError(f"the tokenizer of {ref!r} has no end-of-sequence token, so generation could never stop; set "
                         f"model.tokenizer_name_or_path to a tokenizer that has one")
    if model_cfg.chat_template:
        tokenizer.chat_template = model_cfg.chat_template
    elif not tokenizer.chat_template:
        tokenizer.chat_template = fallback_chat_template(tokenizer)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def fallback_chat_template(tokenizer: PreTrainedTokenizerBase) -> str:
    """A chat template for a tokenizer that has none (a base model): plain ``User:`` /
    ``Assistant:`` lines, each assistant turn closed by the tokenizer's own EOS token (so SFT
    teaches the model to stop where generation stops) and marked with ``{% generation %}`` (so the
    SFT loss covers the replies only). The space after ``Assistant:`` belongs to the reply: a
    sentencepiece or BPE vocabulary merges it into the reply's first token. The embedded toy's template ends turns with its own EOS
    text ``<|end|>``; in a real vocabulary that string is plain text, not EOS."""
    bos = "{{ bos_token }}" if tokenizer.bos_token else ""
    return (
        bos + "{% for message in messages %}"
        "{% if message['role'] == 'assistant' %}"
        "Assistant:{% generation %} {{ message['content'] }}{{ eos_token }}{% endgeneration %}{{ '\\n' }}"
        "{% else %}"
        "{{ message['role'] | capitalize }}: {{ message['content'] }}\n"
        "{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}Assistant:{% endif %}"
    )


def build_embedded_policy(model_cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    """The embedded default model, built from ``model_cfg``'s architecture fields."""
    return embedded.build_model(model_cfg, tokenizer).to(dtype_of(model_cfg.dtype))


def load_causal_lm(path: str, model_cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase, *, key: str,
                   gguf_file: Optional[str] = None, zero3: Optional[dict[str, Any]] = None) -> PreTrainedModel:
    """A causal LM from ``path`` in the configured dtype and attention kernel (4-bit under QLoRA);
    from a GGUF file of ``path`` when ``gguf_file`` is given (transformers dequantises it to the
    configured dtype, on every rank: a GGUF file has no per-tensor lazy reads). Partitioned
    under ``zero3`` (module docstring)."""
    extra = {"gguf_file": gguf_file} if gguf_file else {}
    with loading("a model", path, key=key, gguf_file=gguf_file), model_creation(zero3):
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype_of(model_cfg.dtype), attn_implementation=model_cfg.attn_implementation, **lora.load_kwargs(model_cfg),
            **extra,
        )
    if gguf_file:
        as_plain_model(model)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model


def load_reward_model(path: str, model_cfg: ModelConfig, *,
                      zero3: Optional[dict[str, Any]] = None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A sequence-classification model with one output from any causal-LM or reward checkpoint,
    and the tokenizer saved with it. Partitioned under ``zero3`` (module docstring)."""
    with loading("a reward model", path, key="the reward model's checkpoint"), model_creation(zero3):
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=1, dtype=dtype_of(model_cfg.dtype), attn_implementation=model_cfg.attn_implementation,
            **lora.load_kwargs(model_cfg)
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id  # the score is read at the last non-pad token
    return model, tokenizer


def load_value_model_from_policy(path: str, *, zero3: Optional[dict[str, Any]] = None) -> PreTrainedModel:
    """A scalar-head model on a policy checkpoint (PPO's ``value_from=policy``); the head is new.
    Partitioned under ``zero3`` (module docstring)."""
    with loading("a value model", path, key="ppo.value_from=policy"), model_creation(zero3):
        return AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)


@contextmanager
def loading(what: str, path: str, *, key: str, gguf_file: Optional[str] = None) -> Iterator[None]:
    """One clear error for a checkpoint transformers cannot load. A broken directory fails deep
    inside transformers, tokenizers or safetensors with whatever type those raise (ValueError,
    KeyError, SafetensorError, a validation error); the cause is the directory's content either
    way, so the message names it. Running out of memory is not a broken checkpoint: it passes."""
    try:
        yield
    except (MemoryError, torch.OutOfMemoryError, UserError):
        raise
    except Exception as err:
        where = f"{path!r}" + (f" ({gguf_file})" if gguf_file else "")
        detail = " ".join(str(err).split())[:300].rstrip(".")
        raise StageError(f"could not load {what} from {where}: {type(err).__name__}: {detail}. Check {key}: it must "
                         f"name a complete Hugging Face checkpoint (config.json with a model_type, the weights, the "
                         f"tokenizer files) or hub id") from err

