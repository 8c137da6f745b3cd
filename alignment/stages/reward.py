"""Reward model: the policy's transformer with a scalar head, trained on preference pairs.

Bradley-Terry loss per pair (TRL's ``RewardTrainer``), with an optional fixed margin m and an
optional centering term that keeps rewards near zero:

    L = -log sigmoid(r(x, chosen) - r(x, rejected) - m) + c * (r(chosen) + r(rejected))^2

The model is ``AutoModelForSequenceClassification`` with ``num_labels=1``, initialised from the
latest policy checkpoint (SFT) unless ``reward.init_from`` says otherwise; TRL reads the score at
the last token that is not the pad token. On the task suite the pairs are sampled from that
policy and labelled by the verifier; with ``reward.data_path``/``data.path`` they come from a file.

Evaluation: held-out pairwise accuracy, mean reward of chosen and rejected, the AUC with which
the reward separates chosen from rejected responses, and the reward model's mean score of the
starting policy's samples (for the end-of-run table).

    python -m alignment.run +recipe=sft_rm_ppo
    python -m alignment.run +recipe=reward reward.init_from=outputs/sft_then_dpo/sft
"""

from __future__ import annotations

from typing import Any

from transformers import AutoModelForSequenceClassification
from trl import RewardConfig as TRLRewardConfig
from trl import RewardTrainer

from alignment.config import RewardConfig
from alignment.data.pairs import preference_data
from alignment.evaluate import pair_metrics, policy_reward_score
from alignment.modeling import lora
from alignment.modeling.loading import load_reward_model
from alignment.records import StageResult
from alignment.scale import checkpoints
from alignment.stages.common import Lazy, StageContext, load_policy, padding_free, place, require_policy_start, zero3_creation
from alignment.stages.trl_stage import Prepared, TRLStage, run_trl_stage, trainer_kwargs


def train_reward(cfg: RewardConfig, ctx: StageContext) -> StageResult:
    """Run the reward stage described by ``cfg``."""
    return run_trl_stage(REWARD, cfg, ctx)


def prepare(cfg: RewardConfig, ctx: StageContext, tokenizer) -> Prepared:
    require_policy_start(ctx)
    if ctx.start.adapter:  # found out before sampling pairs
        lora.check_task(ctx.start.adapter, task=lora.SEQ_CLS)
    # On the suite the pairs are sampled from the policy, which is kept to score it afterwards.
    policy = Lazy(lambda: padding_free(load_policy(ctx, tokenizer, trainable=False), ctx))
    data = preference_data(ctx.cfg, cfg, tokenizer=tokenizer, sampling_policy=policy,
                           journal=checkpoints.sampling_dir(ctx.stage_dir, ctx.inputs_key))  # kept across a preemption
    model, reward_tokenizer = load_reward_model(ctx.start.path, ctx.cfg.model, zero3=zero3_creation(ctx))  # ZeRO-3: created partitioned
    model = place(lora.attach(padding_free(model, ctx), ctx.cfg, task=lora.SEQ_CLS, adapter=ctx.start.adapter))
    return Prepared(model=model, tokenizer=reward_tokenizer, data=data, extras={"policy": policy.value})


def build_trainer(cfg: RewardConfig, ctx: StageContext, prepared: Prepared, **overrides: Any) -> RewardTrainer:
    """TRL's RewardTrainer as this stage runs it; ``overrides`` replace trainer arguments (the
    benchmark's step count). Each [chosen; rejected] batch runs padding-free with the prompt
    shared by its pair (``padding_free`` in ``prepare``)."""
    rows = prepared.data.train
    if "prompt_ids" in rows.column_names:  # sampled pairs carry their token ids: TRL takes whole sequences as they are
        rows = rows.map(lambda row: {"chosen_ids": row["prompt_ids"] + row["chosen_ids"], "rejected_ids": row["prompt_ids"] + row["rejected_ids"]},
                        remove_columns=[c for c in rows.column_names if c not in ("chosen_ids", "rejected_ids")])
    train = rows.add_column("margin", [cfg.margin] * len(rows)) if cfg.margin else rows
    args = TRLRewardConfig(**{**trainer_kwargs(cfg, ctx), **overrides}, center_rewards_coefficient=cfg.center_rewards_coefficient)
    return RewardTrainer(model=prepared.model, args=args, train_dataset=train, processing_class=prepared.tokenizer)


def evaluate(cfg: RewardConfig, ctx: StageContext, prepared: Prepared, model) -> dict[str, Any]:
    model = lora.unwrap(model)  # scoring reads model.score
    data, tokenizer, metrics = prepared.data, prepared.tokenizer, {}
    if data.eval_pairs is not None:
        metrics.update(pair_metrics(model, tokenizer, data.eval_pairs, batch_size=ctx.cfg.eval.batch_size))
    policy = prepared.extras["policy"]
    if policy is not None:
        # The reward model's view of the policy it started from, for the end-of-run comparison.
        metrics["parent_policy_score"] = policy_reward_score(policy, tokenizer, model, data.held_out, cfg=ctx.cfg.eval,
                                                             seed=ctx.cfg.seed + 3)
    return metrics


REWARD = TRLStage(prepare=prepare, build_trainer=build_trainer, evaluate=evaluate, loader=AutoModelForSequenceClassification)
