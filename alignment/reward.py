"""Reward model: the policy's transformer with a scalar head, trained on preference pairs.

Bradley-Terry loss per pair (TRL's ``RewardTrainer``), with an optional fixed margin m and an
optional centering term that keeps rewards near zero:

    L = -log sigmoid(r(x, chosen) - r(x, rejected) - m) + c * (r(chosen) + r(rejected))^2

The model is ``AutoModelForSequenceClassification`` with ``num_labels=1``, initialised from the
latest policy checkpoint (SFT) unless ``reward.init_from`` says otherwise; the score is read at
the last non-pad token. On the task suite the pairs are sampled from that policy and labelled by
the verifier; with ``reward.data_path``/``data.path`` they come from a file.

Evaluation: held-out pairwise accuracy, mean reward of chosen and rejected, and on the suite
how well the reward separates verifier-correct from incorrect samples (ROC AUC).

    python -m alignment.run +recipe=sft_rm_ppo
    python -m alignment.run +recipe=reward reward.init_from=outputs/sft_then_dpo/sft
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from datasets import Dataset
from transformers import AutoModelForSequenceClassification, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from trl import RewardConfig as TRLRewardConfig
from trl import RewardTrainer

from alignment.data import StageData, preference_file_data, stage_data, stage_source
from alignment.evaluate import user_turn
from alignment.inference import Messages, generate, render_prompts, response_ids
from alignment.ppo_rollout import pack, sequence_scores
from alignment.pairs import suite_preference_data
from alignment import checkpoints, lora
from alignment.distributed import unsharded, whole_loading
from alignment.records import StageResult
from alignment.sft import ctx_result
from alignment.stage import StageContext, StageError, load_policy, padding_free, load_tokenizer, save_checkpoint, seed_everything, train_metrics, trainer_kwargs


def train_reward(cfg, ctx: StageContext) -> StageResult:
    """Run the reward stage described by ``cfg`` (an ``alignment.config.RewardConfig``)."""
    seed_everything(ctx)
    if ctx.start.path is None:
        raise StageError("reward needs a policy checkpoint to start from: run it after sft, or set reward.init_from")
    if ctx.start.adapter:  # found out before sampling pairs
        lora.check_task(ctx.start.adapter, task=lora.SEQ_CLS)
    data, policy = _pairs(cfg, ctx)
    model, tokenizer = load_reward_model(ctx.start.path, ctx=ctx)
    model = lora.attach(model, ctx.cfg, task=lora.SEQ_CLS, adapter=ctx.start.adapter)
    trainer = build_reward_trainer(cfg, ctx, model, tokenizer, data.train)
    output = checkpoints.train(trainer, ctx, cfg)

    checkpoint, checkpoint_hash = save_checkpoint(trainer.model, tokenizer, ctx, trainer=trainer)
    metrics = train_metrics(output, trainer.state.log_history)
    model = lora.unwrap(unsharded(trainer.model, checkpoint, loader=AutoModelForSequenceClassification))  # scoring reads model.score
    if ctx.cfg.eval.enabled and data.eval_pairs is not None:
        metrics.update(pair_metrics(model, tokenizer, data.eval_pairs, batch_size=ctx.cfg.eval.batch_size))
    if ctx.cfg.eval.enabled and policy is not None:
        # The reward model's view of the policy it started from, for the end-of-run comparison.
        metrics["parent_policy_score"] = policy_reward_score(policy, tokenizer, model, data.held_out,
                                                             cfg=ctx.cfg.eval, seed=ctx.cfg.seed + 3)
    return ctx_result(ctx, cfg, checkpoint=checkpoint, checkpoint_hash=checkpoint_hash, data=data, metrics=metrics)


def build_reward_trainer(cfg, ctx: StageContext, model, tokenizer, rows, **overrides) -> RewardTrainer:
    """TRL's RewardTrainer as this stage runs it; ``overrides`` replace trainer arguments (the
    benchmark's step count). Each [chosen; rejected] batch runs padding-free with the prompt
    shared by its pair (alignment/packing.py)."""
    train = rows.add_column("margin", [cfg.margin] * len(rows)) if cfg.margin else rows
    args = TRLRewardConfig(**{**trainer_kwargs(cfg, ctx), **overrides}, center_rewards_coefficient=cfg.center_rewards_coefficient)
    return RewardTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer)


def load_reward_model(path: str, *, ctx: StageContext) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A sequence-classification model with one output from any causal-LM or reward checkpoint."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        with whole_loading():
            model = AutoModelForSequenceClassification.from_pretrained(
                path, num_labels=1, attn_implementation=ctx.cfg.model.attn_implementation, **lora.load_kwargs(ctx.cfg.model)
            )
    except OSError as err:
        raise StageError(f"could not load a reward model from {path!r} ({err})") from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id  # the score is read at the last non-pad token
    padding_free(model, ctx.cfg.model)
    return model, tokenizer


def score_responses(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Messages],
    responses: Sequence[str],
    *,
    batch_size: int,
) -> torch.Tensor:
    """Reward of each (prompt, response), rendered with the chat template as in training and
    read at the last real token (so a pad token equal to EOS does no harm)."""
    prompt_ids, answer_ids = render_prompts(tokenizer, prompts), response_ids(tokenizer, responses)
    device = next(model.parameters()).device
    scores = []
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for start in range(0, len(prompt_ids), batch_size):
            packed = pack(prompt_ids[start : start + batch_size], answer_ids[start : start + batch_size],
                          pad_token_id=tokenizer.pad_token_id).to(device)
            scores.append(sequence_scores(model, packed).cpu())
    model.train(was_training)
    return torch.cat(scores) if scores else torch.zeros(0)


def policy_reward_score(policy, tokenizer, reward_model, held, *, cfg, seed: int) -> float:
    """Mean reward-model score of a policy's sampled responses on the held-out prompts."""
    prompts = [user_turn(e.prompt) for e in held.examples] or list(held.prompts)
    prompts = prompts[: cfg.n_prompts] if cfg.n_prompts else prompts
    samples = generate(policy, tokenizer, prompts, num_samples=1, temperature=cfg.temperature,
                       max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size, seed=seed)
    scores = score_responses(reward_model, tokenizer, prompts, [s[0].text for s in samples], batch_size=cfg.batch_size)
    return float(scores.mean()) if len(scores) else float("nan")


def pair_metrics(model, tokenizer, pairs: Dataset, *, batch_size: int) -> dict[str, Any]:
    """Pairwise accuracy and mean rewards on held-out pairs, and the correct/incorrect AUC."""
    prompts = pairs["prompt"]
    chosen = score_responses(model, tokenizer, prompts, [c[-1]["content"] for c in pairs["chosen"]], batch_size=batch_size)
    rejected = score_responses(model, tokenizer, prompts, [r[-1]["content"] for r in pairs["rejected"]], batch_size=batch_size)
    return {
        "pairwise_accuracy": float((chosen > rejected).float().mean()),
        "reward_chosen_mean": float(chosen.mean()),
        "reward_rejected_mean": float(rejected.mean()),
        "correct_vs_incorrect_auc": roc_auc(positives=chosen.unique(), negatives=rejected.unique()),
        "eval_pairs": len(pairs),
    }


def roc_auc(*, positives: torch.Tensor, negatives: torch.Tensor) -> float:
    """P(score of a random positive > score of a random negative), ties counting half."""
    if len(positives) == 0 or len(negatives) == 0:
        return float("nan")
    diff = positives[:, None] - negatives[None, :]
    return float(((diff > 0).float() + 0.5 * (diff == 0).float()).mean())


def _pairs(cfg, ctx: StageContext) -> tuple[StageData, PreTrainedModel | None]:
    """The pairs, and on the suite the policy that sampled them (kept to score it afterwards)."""
    data_cfg = stage_data(ctx.cfg.data, cfg)
    path = stage_source(data_cfg, cfg.data_path)
    if path is not None:
        tokenizer = load_tokenizer(ctx)
        return preference_file_data(data_cfg, path=path, seed=ctx.cfg.seed, tokenizer=tokenizer, max_seq_tokens=cfg.max_seq_tokens), None
    policy, tokenizer = load_policy(ctx, trainable=False)
    return suite_preference_data(policy, tokenizer, pairs=cfg.pairs, cfg=ctx.cfg), policy
