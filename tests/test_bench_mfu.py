"""The MFU benchmark (``python -m alignment.bench.mfu``): the FLOPs formula by hand, and one
tiny CPU run of both stages checked for shape and self-consistency, not speed (timings of a
few tiny steps on a busy machine mean nothing)."""

from __future__ import annotations

import math

import pytest

from alignment.bench.mfu import flops_per_token, measure


def test_flops_per_token_by_hand():
    """N = 1000 parameters, L = 2 layers, d = 8, T = 10 tokens.

    One forward: 2N + 4·L·d·T = 2000 + 4·2·8·10 = 2000 + 640 = 2640 FLOPs per token.
    SFT (6N + 12·L·d·T): 6000 + 1920 = 7920 = 3 x 2640.
    DPO (8N + 16·L·d·T): 8000 + 2560 = 10560 = 4 x 2640.
    """
    shape = {"n_params": 1000, "n_layers": 2, "d_model": 8, "mean_seq_tokens": 10}
    assert flops_per_token("sft", **shape) == 7920
    assert flops_per_token("dpo", **shape) == 10560


@pytest.mark.integration
def test_measure_tiny_cpu():
    result = measure(device="cpu", size="tiny", stages=["sft", "dpo"], steps=2, warmup=1, batch=4, seq_tokens=64, threads=1)
    assert result["peak"]["tflops"] > 0
    m = result["model"]
    n, layers, d = m["parameters"], m["n_layers"], m["d_model"]
    assert (layers, d) == (2, 64) and 50_000 < n < 200_000
    assert [s["stage"] for s in result["stages"]] == ["sft", "dpo"]
    for s in result["stages"]:
        assert math.isfinite(s["mfu"]) and s["mfu"] > 0, s
        assert s["tokens_per_second"] > 0 and len(s["step_seconds"]) == 2
        t = s["mean_seq_tokens"]
        assert 32 <= t <= 56  # rows are rendered to seq_tokens/2 .. seq_tokens-8 tokens
        expected = 6 * n + 12 * layers * d * t if s["stage"] == "sft" else 8 * n + 16 * layers * d * t
        assert math.isclose(s["flops_per_token"], expected, rel_tol=1e-12)
        assert math.isclose(s["mfu"], s["tokens_per_second"] * expected / 1e12 / result["peak"]["tflops"], rel_tol=1e-9)
