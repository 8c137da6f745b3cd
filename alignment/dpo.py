"""Direct preference optimisation against the frozen parent policy (Rafailov et al., 2023).

Loss per pair, with r(y) = beta * (log pi(y|x) - log pi_ref(y|x)):

    L = -log sigmoid(r(chosen) - r(rejected))

so at the start, when pi == pi_ref, every pair costs ln 2. Wraps TRL's ``DPOTrainer``. On the
task suite the pairs are sampled from the parent policy and labelled by the verifier
(``alignment.pairs``); with ``data_path``/``data.path`` they are read from a file.

After training the policy is evaluated like every stage, plus on held-out pairs: implicit
reward accuracy (share of pairs with r(chosen) > r(rejected)) and margin, and the KL from the
parent policy, estimated on the policy's own samples of the held-out prompts.

    python -m alignment.run +recipe=sft_then_dpo
    python -m alignment.run +recipe=dpo dpo.init_from=outputs/sft_then_dpo/sft dpo.beta=0.2
"""

from __future__ import annotations

import copy
from typing import Any

from datasets import Dataset
from transformers import AutoModelForCausalLM
from trl import DPOConfig as TRLDPOConfig
from trl import DPOTrainer

from alignment.data import preference_file_data, stage_data, stage_source
from alignment.evaluate import evaluate_policy, kl_to_reference
from alignment.inference import response_logps
from alignment.pairs import suite_preference_data
from alignment.reward import load_reward_model, policy_reward_score, score_responses
from alignment import checkpoints, fused_head, lora
from alignment.distributed import unsharded
from alignment.records import StageResult
from alignment.sft import ctx_result
from alignment.stage import (
    StageContext,
    StageError,
    find_reward_model,
    load_policy,
    load_tokenizer,
    save_checkpoint,
    seed_everything,
    train_metrics,
    trainer_kwargs,
)


def train_dpo(cfg, ctx: StageContext) -> StageResult:
    """Run the DPO stage described by ``cfg`` (an ``alignment.config.DPOConfig``)."""
    seed_everything(ctx)
    if ctx.start.path is None:
        raise StageError("dpo needs a trained policy to start from: run it after sft, or set dpo.init_from=<stage or HF dir>")
    tokenizer = load_tokenizer(ctx)
    data_cfg = stage_data(ctx.cfg.data, cfg)
    path = stage_source(data_cfg, cfg.data_path)
    file_data = None
    if path is not None:  # checked before any model loads
        file_data = preference_file_data(data_cfg, path=path, seed=ctx.cfg.seed, tokenizer=tokenizer, max_seq_tokens=cfg.max_seq_tokens)
    model, tokenizer = load_policy(ctx, tokenizer)
    reference = reference_model(cfg, model)
    reward_model = None
    data = file_data
    if data is None:
        data, reward_model = _sampled_pairs(cfg, ctx, model, tokenizer)

    trainer = build_dpo_trainer(cfg, ctx, model, reference, tokenizer, data.train)
    output = checkpoints.train(trainer, ctx, cfg)

    checkpoint, checkpoint_hash = save_checkpoint(trainer.model, tokenizer, ctx, trainer=trainer)
    metrics = train_metrics(output, trainer.state.log_history)
    if ctx.cfg.eval.enabled:
        policy = unsharded(trainer.model, checkpoint, loader=AutoModelForCausalLM)
        if reference is None:  # LoRA: the adapter-disabled model; precomputed: the parent, loaded again
            reference = lora.ReferenceView(trainer.model) if lora.is_peft(trainer.model) else load_policy(ctx, tokenizer, trainable=False)[0]
        reference = unsharded(reference, ctx.start.path, loader=AutoModelForCausalLM)
        metrics.update(_stage_metrics(cfg, ctx, policy, reference, tokenizer, data, reward_model))
    return ctx_result(ctx, cfg, checkpoint=checkpoint, checkpoint_hash=checkpoint_hash, data=data, metrics=metrics)


def precompute_reference(cfg) -> bool:
    """Whether the reference log-probs are computed once before training (``dpo.precompute_ref_log_probs``)."""
    return cfg.num_epochs > 1 if cfg.precompute_ref_log_probs is None else cfg.precompute_ref_log_probs


def reference_model(cfg, model):
    """The frozen reference DPO trains against, or None when TRL needs no second model: with
    LoRA it computes the reference on this same model through a frozen copy of the starting
    adapter (for a fresh adapter, zero: the base); with precomputed log-probs it reads the
    policy once before training."""
    if lora.is_peft(model) or precompute_reference(cfg):
        return None
    return copy.deepcopy(model).eval().requires_grad_(False)


def build_dpo_trainer(cfg, ctx: StageContext, model, reference, tokenizer, rows, **overrides) -> DPOTrainer:
    """TRL's DPOTrainer as this stage runs it; ``overrides`` replace trainer arguments (the
    benchmark's step count). Each [chosen; rejected] batch runs padding-free with the prompt
    shared by its pair (alignment/packing.py); the LM head scores completion tokens only."""
    losses = {"loss_type": [cfg.loss_type]}
    if cfg.sft_loss_weight > 0:
        losses = {"loss_type": [cfg.loss_type, "sft"], "loss_weights": [1.0, cfg.sft_loss_weight]}
    args = TRLDPOConfig(**{**trainer_kwargs(cfg, ctx), **overrides}, beta=cfg.beta,
                        precompute_ref_log_probs=precompute_reference(cfg), **losses)
    trainer = DPOTrainer(model=model, ref_model=reference, args=args, train_dataset=rows, processing_class=tokenizer)
    fused_head.score_labelled_only(trainer)
    return trainer


def _stage_metrics(cfg, ctx: StageContext, policy, reference, tokenizer, data, reward_model) -> dict[str, Any]:
    """Gold accuracy, implicit-reward accuracy on held-out pairs, KL to the parent, and the
    reward model's score when one labelled the pairs."""
    metrics: dict[str, Any] = {}
    held = data.held_out
    metrics.update(
        evaluate_policy(policy, tokenizer, cfg=ctx.cfg.eval, examples=held.examples, unseen=held.unseen, prompts=held.prompts, seed=ctx.cfg.seed)
    )
    metrics.update(_preference_metrics(policy, reference, tokenizer, data.eval_pairs, beta=cfg.beta, batch_size=ctx.cfg.eval.batch_size))
    metrics["kl_to_parent"] = kl_to_reference(policy, reference, tokenizer, held, cfg=ctx.cfg.eval, seed=ctx.cfg.seed + 2)
    if reward_model is not None:  # the proxy's view beside gold accuracy
        metrics["reward_model_score"] = policy_reward_score(policy, tokenizer, reward_model, held, cfg=ctx.cfg.eval, seed=ctx.cfg.seed + 3)
        train_counts = data.counts.get("train", {})
        metrics["pair_label_agreement"] = train_counts.get("agrees_with_verifier", 0) / max(1, train_counts.get("pairs", 0))
    return metrics


def _sampled_pairs(cfg, ctx: StageContext, model, tokenizer):
    """Pairs sampled from the policy, and the reward model that labelled them (None: the verifier)."""
    use_reward = cfg.pair_labeler == "reward" or (cfg.pair_labeler == "auto" and (cfg.reward_from or "reward" in ctx.previous))
    if not use_reward:
        return suite_preference_data(model, tokenizer, pairs=cfg.pairs, cfg=ctx.cfg), None
    reward_start = find_reward_model(cfg.reward_from, ctx, key="dpo.reward_from")
    ctx.inputs["reward_model"] = {"stage": reward_start.parent_stage, "checkpoint": reward_start.path, "hash": reward_start.hash}
    reward_model, reward_tokenizer = load_reward_model(reward_start.path, ctx=ctx)

    def scorer(prompts, responses):
        return score_responses(reward_model, reward_tokenizer, prompts, responses, batch_size=ctx.cfg.eval.batch_size).tolist()

    return suite_preference_data(model, tokenizer, pairs=cfg.pairs, cfg=ctx.cfg, scorer=scorer), reward_model


def _preference_metrics(policy, reference, tokenizer, pairs: Dataset | None, *, beta: float, batch_size: int) -> dict[str, Any]:
    if pairs is None or len(pairs) == 0:
        return {}
    prompts, chosen, rejected = pairs["prompt"], [c[-1]["content"] for c in pairs["chosen"]], [r[-1]["content"] for r in pairs["rejected"]]
    logp = {
        name: response_logps(model, tokenizer, prompts, responses, batch_size=batch_size)
        for name, model, responses in (
            ("pc", policy, chosen), ("pr", policy, rejected), ("rc", reference, chosen), ("rr", reference, rejected)
        )
    }
    margin = beta * ((logp["pc"] - logp["rc"]) - (logp["pr"] - logp["rr"]))
    return {
        "reward_accuracy": float((margin > 0).float().mean()),
        "reward_margin": float(margin.mean()),
        "eval_pairs": len(pairs),
    }
