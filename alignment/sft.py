"""Supervised fine-tuning: instruction -> response, loss on the assistant's tokens only.

Wraps TRL's ``SFTTrainer`` on conversational rows (``messages``). The chat template marks
assistant turns with ``{% generation %}``, so ``assistant_only_loss`` masks the prompt: the model
learns to answer, not to predict the instructions it is given.

    python -m alignment.run +recipe=sft                      # embedded model, task suite
    python -m alignment.run +recipe=sft model.name_or_path=/path/to/hf_model data=/path/to/sft.jsonl
"""

from __future__ import annotations

from trl import SFTConfig as TRLSFTConfig
from trl import SFTTrainer

from alignment.data import sft_data
from alignment.evaluate import evaluate_policy
from alignment.stage import (
    StageContext,
    config_dict,
    load_policy,
    save_checkpoint,
    seed_everything,
    train_metrics,
    trainer_kwargs,
)
from alignment.records import StageResult


def train_sft(cfg, ctx: StageContext) -> StageResult:
    """Run the SFT stage described by ``cfg`` (an ``alignment.config.SFTConfig``)."""
    seed_everything(ctx)
    model, tokenizer = load_policy(ctx)
    data = sft_data(ctx.cfg.data, data_path=cfg.data_path, seed=ctx.cfg.seed)

    start_metrics = {}
    if ctx.is_first and ctx.cfg.eval.enabled and ctx.cfg.eval.eval_start_model:
        start_metrics = _evaluate(model, tokenizer, data, ctx)

    args = TRLSFTConfig(
        **trainer_kwargs(cfg, ctx),
        assistant_only_loss=cfg.assistant_only_loss,
        packing=False,
        eos_token=tokenizer.eos_token,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=data.train, processing_class=tokenizer)
    output = trainer.train()

    checkpoint, checkpoint_hash = save_checkpoint(trainer.model, tokenizer, ctx)
    metrics = train_metrics(output, trainer.state.log_history)
    metrics["train_tokens"] = int(trainer._metrics["train"].get("num_tokens", [0])[-1]) if hasattr(trainer, "_metrics") else None
    if ctx.cfg.eval.enabled:
        metrics.update(_evaluate(trainer.model, tokenizer, data, ctx))
    return ctx_result(ctx, cfg, checkpoint=checkpoint, checkpoint_hash=checkpoint_hash, data=data, metrics=metrics, start_metrics=start_metrics)


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
