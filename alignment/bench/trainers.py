"""The two trainers the step benchmark compares, per stage: "ours" and "trl".

"ours" is the TRL trainer exactly as the stage module builds it (its ``build_trainer``, the same
function the pipeline's skeleton calls), with its model loaded as the stage loads it:
padding-free forwards, the LM head on labelled positions only, DPO's explicit reference copy. "trl" is the same trainer class
with TRL's default config, given only what defines the workload: the output directory, the
learning rate, batch size, max length and number of steps, the seed (so both see the same rows
in the same order), report_to and the device. SFT's ``assistant_only_loss`` is also passed to
TRL: without it TRL trains on every token, a different objective, and the losses could not be
compared. Everything that only changes speed (precision, gradient checkpointing, scheduler)
stays at TRL's default: that difference is what the benchmark measures.

Data is built once, deterministically, from the task suite: SFT demonstrations as the pipeline
makes them, and preference pairs of the gold answer (chosen) against a corrupted one
(rejected), shared by the reward and DPO stages. No policy is sampled.
"""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass
from pathlib import Path

from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, PreTrainedTokenizerBase, Trainer, set_seed
from trl import DPOConfig, DPOTrainer, RewardConfig, RewardTrainer, SFTConfig, SFTTrainer

from alignment.config import AlignmentConfig
from alignment.data.stage_data import HeldOut, StageData, load_suite, sft_data, user_turn
from alignment.data.suite import corrupt
from alignment.modeling import embedded, lora
from alignment.modeling.loading import load_reward_model
from alignment.run import compose_config
from alignment.stages import dpo, reward, sft
from alignment.stages.common import StageContext, StartPoint, load_policy, padding_free
from alignment.stages.trl_stage import Prepared

STAGES = ("sft", "reward", "dpo")
SIDES = ("ours", "trl")

TINY_MODEL = ["model.hidden_size=32", "model.num_layers=1", "model.num_heads=2", "model.intermediate_size=64"]
TINY = [*TINY_MODEL, "sft.per_device_batch_size=8", "reward.per_device_batch_size=8", "dpo.per_device_batch_size=8", "data.suite.n_eval=14"]


def bench_config(*, tiny: bool, dpo_sft_weight: float | None, rows_for_steps: int, overrides: list[str]) -> AlignmentConfig:
    """The default recipe's config, with enough suite rows for ``rows_for_steps`` optimiser
    steps of every stage and the benchmark's overrides (tiny sizes, DPO's RPO weight, the user's)."""
    base = ["+recipe=sft_then_dpo", "logger=none", *(TINY if tiny else [])]
    if dpo_sft_weight is not None:
        base.append(f"dpo.sft_loss_weight={dpo_sft_weight}")
    cfg = compose_config([*base, *overrides])
    biggest_batch = max(getattr(cfg, s).per_device_batch_size * getattr(cfg, s).gradient_accumulation_steps for s in STAGES)
    return compose_config([*base, f"data.suite.n_train={rows_for_steps * biggest_batch}", *overrides])


@dataclass
class Workload:
    """What both sides share: config, tokenizer, the saved initial model and the rows."""

    cfg: AlignmentConfig
    tokenizer: PreTrainedTokenizerBase
    init_dir: Path  # the embedded model at init, saved once so every run loads the same weights
    sft_rows: Dataset
    pair_rows: Dataset
    work_dir: Path


def build_workload(cfg: AlignmentConfig, *, work_dir: Path) -> Workload:
    tokenizer = embedded.build_tokenizer()
    init_dir = work_dir / "init_model"
    embedded.build_model(cfg.model, tokenizer).save_pretrained(init_dir, safe_serialization=True)
    tokenizer.save_pretrained(init_dir)
    sft_rows = sft_data(cfg.data, data_path=None, seed=cfg.seed).train
    rng = random.Random(cfg.seed)
    pairs = [
        {"prompt": user_turn(e.prompt), "chosen": [{"role": "assistant", "content": e.answer}],
         "rejected": [{"role": "assistant", "content": corrupt(e, rng)}]}
        for e in load_suite(cfg.data.suite).train
    ]
    return Workload(cfg, tokenizer, init_dir, sft_rows, Dataset.from_list(pairs), work_dir)


def build_trainer(stage: str, side: str, w: Workload, *, max_steps: int, run_dir: Path, device: str) -> Trainer:
    """A fresh trainer (fresh model from the same weights, same seed) for one timed run."""
    set_seed(w.cfg.seed)  # the reward head is initialised at load time: same draw on both sides
    stage_cfg = getattr(w.cfg, stage)
    if side == "ours":
        return _ours(stage, stage_cfg, w, max_steps=max_steps, run_dir=run_dir, device=device)
    common = {
        "output_dir": str(run_dir / "trainer"),
        "learning_rate": stage_cfg.learning_rate,
        "per_device_train_batch_size": stage_cfg.per_device_batch_size,
        "max_length": stage_cfg.max_seq_tokens,
        "max_steps": max_steps,
        "seed": w.cfg.seed,
        "report_to": "none",
        "use_cpu": device == "cpu",
        "save_strategy": "no",
    }
    tokenizer = copy.deepcopy(w.tokenizer)
    if stage == "sft":
        model = AutoModelForCausalLM.from_pretrained(w.init_dir)
        args = SFTConfig(**common, assistant_only_loss=True)
        return SFTTrainer(model=model, args=args, train_dataset=w.sft_rows, processing_class=tokenizer)
    if stage == "reward":
        model = AutoModelForSequenceClassification.from_pretrained(w.init_dir, num_labels=1)
        return RewardTrainer(model=model, args=RewardConfig(**common), train_dataset=w.pair_rows, processing_class=tokenizer)
    # TRL's default for ref_model=None: it loads its own reference from the policy's directory.
    model = AutoModelForCausalLM.from_pretrained(w.init_dir)
    return DPOTrainer(model=model, args=DPOConfig(**common, beta=stage_cfg.beta), train_dataset=w.pair_rows, processing_class=tokenizer)


def _ours(stage: str, cfg, w: Workload, *, max_steps: int, run_dir: Path, device: str) -> Trainer:
    """The stage's trainer, built by the stage module's own ``build_trainer`` on its model as the
    stage loads it."""
    start = StartPoint(None, None) if stage == "sft" else StartPoint(str(w.init_dir), None, "sft")
    ctx = StageContext(cfg=w.cfg, run_dir=run_dir, stage_dir=run_dir, stage=stage, start=start, is_first=stage == "sft")
    # The benchmark's only changes: its step count, no mid-run checkpoints, and the device asked for.
    overrides = {"max_steps": max_steps, "save_strategy": "no", "use_cpu": device == "cpu"}
    tokenizer = copy.deepcopy(w.tokenizer)
    rows = w.sft_rows if stage == "sft" else w.pair_rows
    data = StageData(train=rows, held_out=HeldOut(), fingerprint="bench", counts={})
    if stage == "reward":
        model, tokenizer = load_reward_model(str(w.init_dir), w.cfg.model)
        model = lora.attach(padding_free(model, ctx), w.cfg, task=lora.SEQ_CLS, adapter=None)
        return reward.build_trainer(cfg, ctx, Prepared(model, tokenizer, data), **overrides)
    model = padding_free(load_policy(ctx, tokenizer), ctx)
    if stage == "sft":
        return sft.build_trainer(cfg, ctx, Prepared(model, tokenizer, data), **overrides)
    prepared = Prepared(model, tokenizer, data, extras={"reference": dpo.reference_model(cfg, model)})
    return dpo.build_trainer(cfg, ctx, prepared, **overrides)


def same_objective(stage: str, cfg: AlignmentConfig) -> bool:
    """Whether ours and TRL's default minimise the same loss (so first-step losses must agree)."""
    if stage == "reward":
        return not cfg.reward.margin and not cfg.reward.center_rewards_coefficient
    if stage == "dpo":
        return cfg.dpo.sft_loss_weight == 0 and cfg.dpo.loss_type == "sigmoid"
    return cfg.sft.assistant_only_loss
