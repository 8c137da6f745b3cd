"""The three trainers the step benchmark compares, per stage: "ours", "trl_tuned", "trl_default".

"ours" is the TRL trainer exactly as the stage module builds it (its ``build_trainer``, the same
function the pipeline's skeleton calls), with its model loaded as the stage loads it:
padding-free forwards, the LM head on labelled positions only, DPO's explicit reference copy.

"trl_default" is the same trainer class with TRL's default config, given only what defines the
workload: the output directory, the learning rate, batch size, max length and number of steps,
the seed (so every side sees the same rows in the same order), report_to and the device.

"trl_tuned" is TRL alone configured as someone who knows it would on this hardware: float32 (no
bf16 autocast: on CPU its attention backward is several times slower), no gradient checkpointing,
our learning-rate schedule (type and warm-up), the reference log-probs precomputed exactly when
ours precomputes them (DPO), and TRL's own padding-free collator where TRL has one: SFT
(``padding_free=True``: each batch flattened into one row, position ids restarting per sequence,
no packing, so batches hold the same rows as ours; TRL then refuses a ``max_length``, so rows
longer than it would train uncut there: the first-step loss check shows it). TRL 1.16's DPO ``padding_free`` warns and
falls back to padding ("temporarily unavailable"), and its RewardTrainer has none, so those two
stay padded. TRL's ``packing`` is not used: it fills fixed-length blocks, a different batch.

Both TRL sides train on the same loss as ours: SFT's loss on the replies only, through the chat
template's generation tags where it has them (the embedded toy) and otherwise as prompt and
completion with the loss on the completion (SmolLM2's ChatML; how the SFT stage does it).

Data is built once, deterministically, from the task suite: SFT demonstrations as the pipeline
makes them, and preference pairs of the gold answer (chosen) against a corrupted one
(rejected), shared by the reward and DPO stages. No policy is sampled. The model is the embedded
toy from config, or a real checkpoint (``model.name_or_path``, a GGUF file dequantised to
float32): either way saved once as safetensors, from which every side of every run loads.
"""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, PreTrainedTokenizerBase, Trainer, set_seed
from trl import DPOConfig, DPOTrainer, RewardConfig, RewardTrainer, SFTConfig, SFTTrainer

from alignment.config import AlignmentConfig
from alignment.data.stage_data import HeldOut, StageData, load_suite, sft_data, user_turn
from alignment.data.suite import corrupt
from alignment.modeling import embedded, lora
from alignment.modeling.gguf import as_plain_model
from alignment.modeling.loading import load_causal_lm, load_reward_model, load_tokenizer
from alignment.run import compose_config
from alignment.stages import dpo, reward, sft
from alignment.stages.common import StageContext, StartPoint, load_policy, padding_free
from alignment.stages.trl_stage import Prepared

STAGES = ("sft", "reward", "dpo")
SIDES = ("ours", "trl_tuned", "trl_default")
BASELINES = ("trl_tuned", "trl_default")  # the sides ours is divided by; the first is the headline

TINY_MODEL = ["model.hidden_size=32", "model.num_layers=1", "model.num_heads=2", "model.intermediate_size=64"]
TINY = [*TINY_MODEL, "sft.per_device_batch_size=8", "reward.per_device_batch_size=8", "dpo.per_device_batch_size=8", "data.suite.n_eval=14"]
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TUNED_SFT_PADDING_FREE = True  # TRL's padding_free for the tuned SFT side (see the module docstring)


def smollm2(model_dir: str) -> list[str]:
    """Overrides for the step benchmark on SmolLM2-135M-Instruct (the GGUF in ``model_dir``):
    full fine-tuning in float32 (``model.peft=null``: the comparison is of training steps, and
    TRL's sides train every weight), batches of 8 rows of at most 128 tokens, and full-fine-tuning
    learning rates (the preset's are LoRA's; speed does not depend on them)."""
    return [
        "model=smollm2", f"model.name_or_path={model_dir}", f"model.gguf_file={SMOLLM2_GGUF}", "model.peft=null",
        *(f"{s}.{k}={v}" for s in STAGES for k, v in (("global_batch_size", 8), ("per_device_batch_size", 8), ("max_seq_tokens", 128))),
        "sft.learning_rate=2e-5", "reward.learning_rate=1e-5", "dpo.learning_rate=5e-6",
    ]


def bench_config(*, tiny: bool, dpo_sft_weight: float | None, rows_for_steps: int, overrides: list[str]) -> AlignmentConfig:
    """The default recipe's config, with enough suite rows for ``rows_for_steps`` optimiser
    steps of every stage and the benchmark's overrides (tiny sizes, DPO's RPO weight, the user's)."""
    base = ["+recipe=sft_then_dpo", "logger=none", *(TINY if tiny else [])]
    if dpo_sft_weight is not None:
        base.append(f"dpo.sft_loss_weight={dpo_sft_weight}")
    cfg = compose_config([*base, *overrides])
    biggest_batch = max(getattr(cfg, s).sequences_per_step(1) for s in STAGES)
    return compose_config([*base, f"data.suite.n_train={rows_for_steps * biggest_batch}", *overrides])


@dataclass
class Workload:
    """What every side shares: config, tokenizer, the saved initial model and the rows."""

    cfg: AlignmentConfig
    tokenizer: PreTrainedTokenizerBase
    init_dir: Path  # the initial model, saved once so every run loads the same weights
    sft_rows: Dataset
    pair_rows: Dataset
    work_dir: Path


def save_initial_model(cfg: AlignmentConfig, init_dir: Path) -> None:
    """The embedded model at init, or ``model.name_or_path`` (GGUF dequantised), as safetensors."""
    tokenizer = load_tokenizer(cfg.model.name_or_path, cfg.model, gguf_file=cfg.model.gguf_file)
    if cfg.model.name_or_path is None:
        model = embedded.build_model(cfg.model, tokenizer)
    else:
        model = load_causal_lm(cfg.model.name_or_path, cfg.model, tokenizer, key="model.name_or_path", gguf_file=cfg.model.gguf_file)
        as_plain_model(model)
    model.save_pretrained(init_dir, safe_serialization=True)
    tokenizer.save_pretrained(init_dir)


def build_workload(cfg: AlignmentConfig, *, work_dir: Path, init_dir: Path | None = None) -> Workload:
    """The rows, and the initial model saved under ``work_dir`` (or taken from ``init_dir``, saved
    by an earlier :func:`save_initial_model` with the same config: the benchmark's child runs)."""
    if init_dir is None:
        init_dir = work_dir / "init_model"
        save_initial_model(cfg, init_dir)
    tokenizer = load_tokenizer(str(init_dir), cfg.model) if cfg.model.name_or_path else embedded.build_tokenizer()
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
    set_seed(w.cfg.seed)  # the reward head is initialised at load time: same draw on every side
    stage_cfg = getattr(w.cfg, stage)
    if side == "ours":
        return _ours(stage, stage_cfg, w, max_steps=max_steps, run_dir=run_dir, device=device)
    forward, accumulation = stage_cfg.split_batch(1)  # the same rows per step and per forward as ours, one process
    args: dict[str, Any] = {
        "output_dir": str(run_dir / "trainer"),
        "learning_rate": stage_cfg.learning_rate,
        "per_device_train_batch_size": forward,
        "gradient_accumulation_steps": accumulation,
        "max_length": stage_cfg.max_seq_tokens,
        "max_steps": max_steps,
        "seed": w.cfg.seed,
        "report_to": "none",
        "use_cpu": device == "cpu",
        "save_strategy": "no",
    }
    if side == "trl_tuned":
        args.update(bf16=device == "cuda" and w.cfg.model.dtype == "bfloat16", gradient_checkpointing=False,
                    lr_scheduler_type=stage_cfg.lr_scheduler, warmup_steps=stage_cfg.warmup_ratio)
    tokenizer = copy.deepcopy(w.tokenizer)
    if stage == "sft":
        model = AutoModelForCausalLM.from_pretrained(w.init_dir)
        # The loss on replies only, as the SFT stage restricts it (alignment/stages/sft.py).
        rows, loss_mask = sft.with_loss_mask(w.sft_rows, tokenizer, assistant_only=stage_cfg.assistant_only_loss)
        args.update(assistant_only_loss=loss_mask == "generation_tags", completion_only_loss=loss_mask == "final_turn")
        if side == "trl_tuned" and TUNED_SFT_PADDING_FREE:  # TRL enforces no max_length when padding-free without packing
            args.update(padding_free=True, max_length=None)
        return SFTTrainer(model=model, args=SFTConfig(**args), train_dataset=rows, processing_class=tokenizer)
    if stage == "reward":
        model = AutoModelForSequenceClassification.from_pretrained(w.init_dir, num_labels=1)
        return RewardTrainer(model=model, args=RewardConfig(**args), train_dataset=w.pair_rows, processing_class=tokenizer)
    if side == "trl_tuned":
        args["precompute_ref_log_probs"] = dpo.precompute_reference(stage_cfg)
    # TRL's default for ref_model=None: it loads its own reference from the policy's directory.
    model = AutoModelForCausalLM.from_pretrained(w.init_dir)
    return DPOTrainer(model=model, args=DPOConfig(**args, beta=stage_cfg.beta), train_dataset=w.pair_rows, processing_class=tokenizer)


def _ours(stage: str, cfg, w: Workload, *, max_steps: int, run_dir: Path, device: str) -> Trainer:
    """The stage's trainer, built by the stage module's own ``build_trainer`` on its model as the
    stage loads it (from the saved initial model)."""
    start = StartPoint(str(w.init_dir), None, None if stage == "sft" else "sft")
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
    prepared = Prepared(model, tokenizer, data, extras={"reference": dpo.reference_model(cfg, ctx, model, tokenizer)})
    return dpo.build_trainer(cfg, ctx, prepared, **overrides)


def same_objective(stage: str, cfg: AlignmentConfig) -> bool:
    """Whether ours and TRL's sides minimise the same loss (so first-step losses must agree)."""
    if stage == "reward":
        return not cfg.reward.margin and not cfg.reward.center_rewards_coefficient
    if stage == "dpo":
        return cfg.dpo.sft_loss_weight == 0 and cfg.dpo.loss_type == "sigmoid"
    return cfg.sft.assistant_only_loss
