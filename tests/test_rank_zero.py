"""Rank 0 samples and evaluates, every rank receives: ranks that sample differently cannot hang.

Two processes (gloo, spawned here, a 120 s collective timeout) sample preference pairs with
deliberately different seeds, as GPUs that are not bit-identical would. Each then takes one
collective per pair, as a trainer takes one per batch: with ranks sampling for themselves their
pair counts could differ and the job would hang; with the pairs from rank 0 they hold the same
rows. An error on rank 0 reaches every rank instead of leaving the others waiting.
"""

from __future__ import annotations

import json
import os
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from alignment.config import AlignmentConfig, ModelConfig, PairsConfig
from alignment.errors import StageError
from alignment.modeling.embedded import build_model, build_tokenizer
from alignment.scale.distributed import on_rank_zero


def _rank(rank: int, store: str, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2, timeout=timedelta(seconds=120))
    try:
        from alignment.data.pairs import suite_preference_data

        tok = build_tokenizer()
        torch.manual_seed(0)
        model = build_model(ModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64), tok)
        cfg = AlignmentConfig(seed=rank)  # each rank would sample other pairs
        cfg.data.suite.n_train, cfg.data.suite.n_eval, cfg.eval.n_prompts = 64, 14, 8
        data = suite_preference_data(model, tok, pairs=PairsConfig(n_prompts=8, max_new_tokens=6, samples_per_prompt=4), cfg=cfg)
        rows = data.train.to_list()
        for _ in rows:  # one collective per row, as a trainer has per batch
            dist.all_reduce(torch.ones(1))
        try:
            on_rank_zero(lambda: (_ for _ in ()).throw(StageError("rank 0 could not sample")))
            raised = None
        except StageError as err:
            raised = str(err)
        with open(f"{out}.{rank}", "w") as handle:
            json.dump({"rows": rows, "raised": raised}, handle, default=str)
    finally:
        dist.destroy_process_group()


def test_ranks_that_sample_differently_get_rank_zeros_pairs_and_its_errors(tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    out = str(tmp_path / "rows")
    mp.start_processes(_rank, args=(str(tmp_path / "store"), out), nprocs=2, start_method="spawn")
    zero, one = (json.loads(open(f"{out}.{r}").read()) for r in (0, 1))
    assert zero["rows"] and one["rows"] == zero["rows"]
    assert zero["raised"] == one["raised"] == "rank 0 could not sample"


def test_without_a_process_group_it_is_a_plain_call():
    assert on_rank_zero(lambda: 41 + 1) == 42
    with pytest.raises(StageError, match="boom"):
        on_rank_zero(lambda: (_ for _ in ()).throw(StageError("boom")))
