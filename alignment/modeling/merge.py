"""A LoRA adapter merged into its base checkpoint one tensor at a time, written shard by shard.

peft's ``merge_and_unload`` needs the whole base model in memory on the rank that saves (and the
base is reloaded there for it): for a large model that is a full copy on one CPU. Here the base's
safetensors files are read lazily, tensor by tensor; each adapted weight gets exactly the sum peft's
merge computes,

    W' = W + scaling * (B @ A)       scaling = alpha / r (alpha / sqrt(r) with rsLoRA),

with A and B in float32 (peft loads an adapter in float32 onto a 16-bit base) and the sum rounded
to the configured dtype, as peft's in-place ``W += delta`` does; the result goes to the output
shard of the same name as its input shard. At most one input shard's tensors are held at once.

It covers what this project trains as a policy: plain LoRA on ``nn.Linear`` layers of a causal LM
whose base is a local safetensors directory. Anything else (a GGUF base, a reward model's new
score head, DoRA, per-layer ranks) is refused by :func:`can_stream`, and the caller merges
through peft.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import torch
from peft import LoraConfig as PeftLoraConfig
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoConfig, GenerationConfig

ADAPTER_WEIGHTS = "adapter_model.safetensors"


def can_stream(base: Optional[str], lora: PeftLoraConfig, *, gguf_file: Optional[str]) -> bool:
    """Whether :func:`merge_streaming` handles this base and adapter."""
    base_dir = Path(base) if base else None
    return (base_dir is not None and gguf_file is None and base_dir.is_dir() and any(base_dir.glob("*.safetensors"))
            and lora.task_type == "CAUSAL_LM" and not lora.use_dora and not lora.lora_bias and not lora.fan_in_fan_out
            and not lora.rank_pattern and not lora.alpha_pattern and not lora.modules_to_save)


def merge_streaming(base: str, adapter_dir: Path, lora: PeftLoraConfig, *, out_dir: Path, dtype: torch.dtype,
                    pad_token_id: Optional[int]) -> None:
    """Write ``base`` with the adapter in ``adapter_dir`` merged in to ``out_dir``: weights in
    ``dtype``, the base's config (and generation config) with ``pad_token_id``."""
    scaling = lora.lora_alpha / (math.sqrt(lora.r) if lora.use_rslora else lora.r)
    pairs = _adapter_pairs(adapter_dir / ADAPTER_WEIGHTS)
    base_dir, merged = Path(base), 0
    out_dir.mkdir(parents=True, exist_ok=True)
    for shard in sorted(base_dir.glob("*.safetensors")):
        tensors = {}
        with safe_open(str(shard), framework="pt") as reader:
            for key in reader.keys():
                weight = reader.get_tensor(key).to(dtype)
                pair = pairs.get(key)
                if pair is not None:
                    a, b = pair
                    weight = (weight + (b @ a) * scaling).to(dtype)
                    merged += 1
                tensors[key] = weight.contiguous()
        save_file(tensors, str(out_dir / shard.name), metadata={"format": "pt"})
        del tensors
    if merged != len(pairs):
        raise ValueError(f"merged {merged} of the adapter's {len(pairs)} layers into {base}: the adapter does not match its base")
    index = base_dir / "model.safetensors.index.json"
    if index.is_file():
        (out_dir / index.name).write_text(index.read_text())
    config = AutoConfig.from_pretrained(base)
    config.pad_token_id = pad_token_id
    config.dtype = dtype
    config.save_pretrained(out_dir)
    try:
        generation = GenerationConfig.from_pretrained(base)
    except OSError:
        generation = GenerationConfig.from_model_config(config)
    generation.pad_token_id = pad_token_id
    generation.save_pretrained(out_dir)


def _adapter_pairs(path: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per base weight name, the adapter's (A, B) in float32."""
    found: dict[str, dict[str, torch.Tensor]] = {}
    with safe_open(str(path), framework="pt") as reader:
        for key in reader.keys():
            for part in ("lora_A", "lora_B"):
                marker = f".{part}.weight"
                if key.endswith(marker):
                    module = key[: -len(marker)].removeprefix("base_model.model.")
                    found.setdefault(f"{module}.weight", {})[part] = reader.get_tensor(key).float()
    return {name: (parts["lora_A"], parts["lora_B"]) for name, parts in found.items()}
