"""Training FLOPs per token, and the matmul rate they are measured against (utilisation).

Per token (PaLM, Chowdhery et al. 2022, appendix B: 6N + 12·L·H·Q·T, H·Q = d), for N weights
that multiply, L layers of width d and T the mean real length of the step's sequences (attention
stays within a sequence: every side's batches are packed or padded per sequence). One forward
is 2N + 4·L·d·T; the backward twice that. So:

    SFT:    6N + 12·L·d·T   (forward + backward)
    reward: 6N + 12·L·d·T   with N without the input embedding (no LM head: the embedding is a
                            lookup, and the score head is d x 1)
    DPO:    8N + 16·L·d·T   (the policy's forward + backward and the reference's forward)

N counts ``model.parameters()``: a tied embedding once, as the LM head's matmul. Every real
token of a batch counts, DPO's and the reward model's chosen and rejected sequences both. The
convention counts what a plain step computes: our LM head scores labelled positions only
(alignment/modeling/compact_head.py) and our pairs run their shared prompt once, so less
arithmetic is done than counted; gradient checkpointing's recomputation is not counted either.

The peak is a square matmul timed on the same device, same threads (1024 in float32 on CPU, 8192
in bf16 on CUDA): what this machine's BLAS reaches, below any datasheet figure.
"""

from __future__ import annotations

import time
from typing import Any

import torch

PASSES = {"sft": 3, "reward": 3, "dpo": 4}  # forward-equivalents per token: fwd + bwd (2x); DPO adds the reference's fwd
MATMUL = {"cuda": (8192, torch.bfloat16), "cpu": (1024, torch.float32)}


def flops_per_token(stage: str, *, n_params: int, n_layers: int, d_model: int, mean_seq_tokens: float) -> float:
    """Training FLOPs per token (PaLM appendix B): passes x (2N + 4·L·d·T)."""
    return PASSES[stage] * (2 * n_params + 4 * n_layers * d_model * mean_seq_tokens)


def model_shape(model: torch.nn.Module, stage: str) -> dict[str, Any]:
    """N, L and d of a model as :func:`flops_per_token` counts them for ``stage``."""
    config = getattr(model, "config", None)
    while hasattr(model, "get_base_model") and config is None:  # a PEFT wrapper
        model = model.get_base_model()
        config = model.config
    text = config.get_text_config()
    n_params = sum(p.numel() for p in model.parameters())
    if stage == "reward":
        n_params -= model.get_input_embeddings().weight.numel()
    return {"parameters": n_params, "n_layers": text.num_hidden_layers, "d_model": text.hidden_size}


def matmul_peak_tflops(device: str, *, warmup: int = 3, calls: int = 20) -> float:
    """Achieved TFLOP/s of a square matmul on ``device`` with this process's torch threads."""
    size, dtype = MATMUL[device]
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    out, sync = torch.empty_like(a), torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(warmup):
        torch.matmul(a, b, out=out)
    sync()
    started = time.perf_counter()
    for _ in range(calls):
        torch.matmul(a, b, out=out)
    sync()
    return 2 * size**3 * calls / (time.perf_counter() - started) / 1e12
