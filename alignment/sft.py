"""Supervised fine-tuning: instruction -> response, loss on the assistant's tokens only.

Wraps TRL's ``SFTTrainer`` on conversational rows (``messages``). The chat template marks
assistant turns with ``{% generation %}``, so ``assistant_only_loss`` masks the prompt: the model
learns to answer, not to predict the instructions it is given.

    python -m alignment.run +recipe=sft                      # embedded model, task suite
    python -m alignment.run +recipe=sft model.name_or_path=/path/to/hf_model data=/path/to/sft.jsonl
"""

from __future__ import annotations

from transformers import AutoModelForCausalLM
from trl import SFTConfig as TRLSFTConfig
from trl import SFTTrainer

from alignment.checks import GENERATION_TAG
from alignment.data import sft_data, stage_data
from alignment.evaluate import evaluate_policy
from alignment.stage import (
    StageContext,
    config_dict,
    load_policy,
    load_tokenizer,
    save_checkpoint,
    seed_everything,
    train_metrics,
    trainer_kwargs,
)
from alignment import checkpoints, fused_head
from alignment.distributed import unsharded
from alignment.records import StageResult


def train_sft(cfg, ctx: StageContext) -> StageResult:
    """Run the SFT stage described by ``cfg`` (an ``alignment.config.SFTConfig``)."""
    seed_everything(ctx)
    tokenizer = load_tokenizer(ctx)
    data = sft_data(stage_data(ctx.cfg.data, cfg), data_path=cfg.data_path, seed=ctx.cfg.seed, tokenizer=tokenizer, max_seq_tokens=cfg.max_seq_tokens)
    model, tokenizer = load_policy(ctx, tokenizer)

    start_metrics = {}
    if ctx.is_first and ctx.cfg.eval.enabled and ctx.cfg.eval.eval_start_model:
        start_metrics = _evaluate(model, tokenizer, data, ctx)

    trainer, data.counts["loss_mask"] = build_sft_trainer(cfg, ctx, model, tokenizer, data.train)
    output = checkpoints.train(trainer, ctx, cfg)

    checkpoint, checkpoint_hash = save_checkpoint(trainer.model, tokenizer, ctx, trainer=trainer)
    metrics = train_metrics(output, trainer.state.log_history)
    metrics["train_tokens"] = int(trainer._metrics["train"].get("num_tokens", [0])[-1]) if hasattr(trainer, "_metrics") else None
    if ctx.cfg.eval.enabled:
        metrics.update(_evaluate(unsharded(trainer.model, checkpoint, loader=AutoModelForCausalLM), tokenizer, data, ctx))
    return ctx_result(ctx, cfg, checkpoint=checkpoint, checkpoint_hash=checkpoint_hash, data=data, metrics=metrics, start_metrics=start_metrics)


def build_sft_trainer(cfg, ctx: StageContext, model, tokenizer, rows, **overrides) -> tuple[SFTTrainer, str]:
    """TRL's SFTTrainer as this stage runs it, and how its loss is masked; ``overrides`` replace
    trainer arguments (the benchmark's step count). Batches stay padded for TRL's collator and
    are repacked inside the model (alignment/packing.py); the LM head scores response tokens
    only (alignment/fused_head.py)."""
    train, loss_mask = _with_loss_mask(rows, tokenizer, assistant_only=cfg.assistant_only_loss)
    args = TRLSFTConfig(
        **{**trainer_kwargs(cfg, ctx), **overrides},
        assistant_only_loss=loss_mask == "generation_tags",
        completion_only_loss=loss_mask == "final_turn",
        packing=False,
        eos_token=tokenizer.eos_token,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer)
    fused_head.score_labelled_only(trainer)
    return trainer, loss_mask


def _with_loss_mask(train, tokenizer, *, assistant_only: bool):
    """Rows and the way the loss is restricted to responses.

    A template that marks assistant turns with {% generation %} masks every assistant turn
    ("generation_tags"). Without the tags TRL cannot build that mask, so each conversation is
    split into prompt (all but the last turn) and completion (the last assistant turn) and the
    loss covers the completion only ("final_turn"): the mask comes from the prompt's tokens
    being a prefix of the whole conversation, which alignment.checks verified before loading.
    """
    if not assistant_only:
        return train, "all_tokens"
    if GENERATION_TAG.search(tokenizer.chat_template or ""):
        return train, "generation_tags"
    return train.map(lambda row: {"prompt": row["messages"][:-1], "completion": row["messages"][-1:]}, remove_columns=["messages"]), "final_turn"


def _evaluate(model, tokenizer, data, ctx: StageContext) -> dict:
    held = data.held_out
    return evaluate_policy(
        model, tokenizer, cfg=ctx.cfg.eval, examples=held.examples, unseen=held.unseen, prompts=held.prompts, seed=ctx.cfg.seed
    )


def ctx_result(ctx: StageContext, cfg, *, checkpoint, checkpoint_hash, data, metrics, start_metrics=None) -> StageResult:
    """The stage's record; the pipeline adds timing, versions and the inputs hash."""
    return StageResult(
        stage=ctx.stage,
        status="complete",
        checkpoint=checkpoint,
        checkpoint_hash=checkpoint_hash,
        parent_stage=ctx.start.parent_stage,
        parent_checkpoint=ctx.start.path,
        parent_checkpoint_hash=ctx.start.hash,
        data_fingerprint=data.fingerprint,
        inputs_hash="",
        config=config_dict(cfg),
        inputs=dict(ctx.inputs),
        metrics=metrics,
        start_metrics=start_metrics or {},
        data=data.counts,
    )
