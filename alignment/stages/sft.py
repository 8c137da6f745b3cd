"""Supervised fine-tuning: instruction -> response, loss on the assistant's tokens only.

Wraps TRL's ``SFTTrainer`` on conversational rows (``messages``). A chat template that marks
assistant turns with ``{% generation %}`` masks the prompt through ``assistant_only_loss``;
without the tags each conversation's last assistant turn is the completion and the loss covers
it alone. The model learns to answer, not to predict the instructions it is given. The first
stage of a run also evaluates the model it starts from (the "base" column of the table).

    python -m alignment.run +recipe=sft                      # embedded model, task suite
    python -m alignment.run +recipe=sft model=hf model.name_or_path=/path/to/hf_model data=/path/to/sft.jsonl
"""

from __future__ import annotations

from typing import Any

from datasets import Dataset
from transformers import AutoModelForCausalLM
from trl import SFTConfig as TRLSFTConfig
from trl import SFTTrainer

from alignment.config import SFTConfig
from alignment.data.checks import GENERATION_TAG
from alignment.data.generated import with_generated_rows
from alignment.data.plain_text import tokenized_sft_rows
from alignment.data.sources import stage_data
from alignment.data.stage_data import sft_data
from alignment.evaluate import evaluate_held_out
from alignment.modeling import compact_head
from alignment.records import StageResult
from alignment.scale.distributed import gathered, on_rank_zero
from alignment.stages.common import StageContext, load_policy, padding_free
from alignment.stages.trl_stage import Prepared, TRLStage, run_trl_stage, trainer_kwargs


def train_sft(cfg: SFTConfig, ctx: StageContext) -> StageResult:
    """Run the SFT stage described by ``cfg``."""
    return run_trl_stage(SFT, cfg, ctx)


def prepare(cfg: SFTConfig, ctx: StageContext, tokenizer) -> Prepared:
    data = sft_data(stage_data(ctx.cfg.data, cfg), data_path=cfg.data_path, seed=ctx.cfg.seed, tokenizer=tokenizer,
                    max_seq_tokens=cfg.max_seq_tokens)
    # Rows an earlier stage wrote (self_instruct) join the training rows; held-out data stays the seed data's.
    data = with_generated_rows(data, ctx.previous.values(), tokenizer=tokenizer, max_seq_tokens=cfg.max_seq_tokens, cfg=ctx.cfg.data)
    model = padding_free(load_policy(ctx, tokenizer), ctx)
    start_metrics = {}
    if ctx.is_first and ctx.cfg.eval.enabled and ctx.cfg.eval.eval_start_model:
        with gathered(model):  # under ZeRO-3 the model was created partitioned: whole while rank 0 evaluates
            start_metrics = on_rank_zero(lambda: evaluate_held_out(model, tokenizer, data.held_out, cfg=ctx.cfg.eval, seed=ctx.cfg.seed))
    return Prepared(model=model, tokenizer=tokenizer, data=data, start_metrics=start_metrics)


def build_trainer(cfg: SFTConfig, ctx: StageContext, prepared: Prepared, **overrides: Any) -> SFTTrainer:
    """TRL's SFTTrainer as this stage runs it; ``overrides`` replace trainer arguments (the
    benchmark's step count). Batches stay padded for TRL's collator and are repacked inside the
    model (``padding_free`` in ``prepare``); the LM head scores response tokens only."""
    train, loss_mask = with_loss_mask(prepared.data.train, prepared.tokenizer, assistant_only=cfg.assistant_only_loss)
    if "text" in train.column_names:  # plain text in the mixture: tokenized here, loss on all of its tokens
        rows, shares = tokenized_sft_rows(train, prepared.tokenizer, max_seq_tokens=cfg.max_seq_tokens,
                                          responses_only=cfg.assistant_only_loss)
        train = Dataset.from_list(rows)
        loss_mask = "responses_and_plain_text" if cfg.assistant_only_loss else "all_tokens"
        prepared.data.counts.update(shares)
    prepared.data.counts["loss_mask"] = loss_mask
    args = TRLSFTConfig(
        **{**trainer_kwargs(cfg, ctx), **overrides},
        assistant_only_loss=loss_mask == "generation_tags",
        completion_only_loss=loss_mask == "final_turn",
        packing=False,
        eos_token=prepared.tokenizer.eos_token,
    )
    trainer = SFTTrainer(model=prepared.model, args=args, train_dataset=train, processing_class=prepared.tokenizer)
    compact_head.score_labelled_only(trainer)  # TRL's fused LM head, on labelled positions only
    return trainer


def evaluate(cfg: SFTConfig, ctx: StageContext, prepared: Prepared, model) -> dict[str, Any]:
    return evaluate_held_out(model, prepared.tokenizer, prepared.data.held_out, cfg=ctx.cfg.eval, seed=ctx.cfg.seed)


SFT = TRLStage(prepare=prepare, build_trainer=build_trainer, evaluate=evaluate, loader=AutoModelForCausalLM)


def with_loss_mask(train, tokenizer, *, assistant_only: bool):
    """Rows and the way the loss is restricted to responses.

    A template that marks assistant turns with {% generation %} masks every assistant turn
    ("generation_tags"). Without the tags TRL cannot build that mask, so each conversation is
    split into prompt (all but the last turn) and completion (the last assistant turn) and the
    loss covers the completion only ("final_turn"): the mask comes from the prompt's tokens
    being a prefix of the whole conversation, which alignment/data/checks.py verified before loading.
    """
    if not assistant_only:
        return train, "all_tokens"
    if "text" in train.column_names:
        return train, "responses_and_plain_text"  # labels built with the tokens (build_trainer)
    if GENERATION_TAG.search(tokenizer.chat_template or ""):
        return train, "generation_tags"
    return train.map(lambda row: {"prompt": row["messages"][:-1], "completion": row["messages"][-1:]}, remove_columns=["messages"]), "final_turn"
