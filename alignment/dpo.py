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
from typing import Any, Sequence

import torch
from datasets import Dataset
from trl import DPOConfig as TRLDPOConfig
from trl import DPOTrainer

from alignment.data import HeldOut, StageData, load_suite, preference_file_data, suite_held_out
from alignment.evaluate import evaluate_policy
from alignment.inference import generate, response_logps
from alignment.pairs import sample_pairs
from alignment.records import StageResult
from alignment.sft import ctx_result
from alignment.stage import StageContext, StageError, load_policy, save_checkpoint, seed_everything, train_metrics, trainer_kwargs


def train_dpo(cfg, ctx: StageContext) -> StageResult:
    """Run the DPO stage described by ``cfg`` (an ``alignment.config.DPOConfig``)."""
    seed_everything(ctx)
    if ctx.start.path is None:
        raise StageError("dpo needs a trained policy to start from: run it after sft, or set dpo.init_from=<stage or HF dir>")
    model, tokenizer = load_policy(ctx)
    reference = copy.deepcopy(model).eval().requires_grad_(False)
    data = _preference_data(cfg, ctx, model, tokenizer)

    losses = {"loss_type": [cfg.loss_type]}
    if cfg.sft_loss_weight > 0:
        losses = {"loss_type": [cfg.loss_type, "sft"], "loss_weights": [1.0, cfg.sft_loss_weight]}
    args = TRLDPOConfig(**trainer_kwargs(cfg, ctx), beta=cfg.beta, **losses)
    trainer = DPOTrainer(model=model, ref_model=reference, args=args, train_dataset=data.train, processing_class=tokenizer)
    output = trainer.train()

    checkpoint, checkpoint_hash = save_checkpoint(trainer.model, tokenizer, ctx)
    metrics = train_metrics(output, trainer.state.log_history)
    if ctx.cfg.eval.enabled:
        held = data.held_out
        metrics.update(
            evaluate_policy(trainer.model, tokenizer, cfg=ctx.cfg.eval, examples=held.examples, unseen=held.unseen, prompts=held.prompts, seed=ctx.cfg.seed)
        )
        metrics.update(_preference_metrics(trainer.model, reference, tokenizer, data.eval_pairs, beta=cfg.beta, batch_size=ctx.cfg.eval.batch_size))
        metrics["kl_to_parent"] = _kl_to_reference(trainer.model, reference, tokenizer, held, ctx)
    return ctx_result(ctx, cfg, checkpoint=checkpoint, checkpoint_hash=checkpoint_hash, data=data, metrics=metrics)


def _preference_data(cfg, ctx: StageContext, model, tokenizer) -> StageData:
    path = cfg.data_path or ctx.cfg.data.path
    if path is not None:
        return preference_file_data(ctx.cfg.data, path=path, seed=ctx.cfg.seed)
    suite = load_suite(ctx.cfg.data.suite)
    common = {"cfg": cfg.pairs, "max_new_tokens": ctx.cfg.eval.max_new_tokens, "batch_size": ctx.cfg.eval.batch_size}
    train_rows, train_counts = sample_pairs(model, tokenizer, suite.train[: cfg.pairs.n_prompts], seed=ctx.cfg.seed, **common)
    held = suite_held_out(suite)
    eval_rows, eval_counts = sample_pairs(model, tokenizer, held.examples, seed=ctx.cfg.seed + 1, **common)
    if not train_rows:
        raise StageError("dpo: the parent policy's samples gave no preference pair (every sample correct?); raise dpo.pairs.n_prompts")
    from alignment.data import fingerprint_rows

    return StageData(
        train=Dataset.from_list(train_rows),
        held_out=held,
        fingerprint=f"pairs:{fingerprint_rows(train_rows)}",
        counts={"source": "suite:on_policy", "train": train_counts, "eval": eval_counts},
        eval_pairs=Dataset.from_list(eval_rows) if eval_rows else None,
    )


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


def _kl_to_reference(policy, reference, tokenizer, held: HeldOut, ctx: StageContext) -> float:
    """Monte-Carlo KL(pi || pi_ref) per response: mean of log pi(y) - log pi_ref(y), y ~ pi."""
    prompts: Sequence = [[{"role": "user", "content": e.prompt}] for e in held.examples] or held.prompts
    prompts = list(prompts)[: ctx.cfg.eval.n_prompts] if ctx.cfg.eval.n_prompts else list(prompts)
    if not prompts:
        return float("nan")
    samples = generate(
        policy, tokenizer, prompts, num_samples=1, temperature=1.0, max_new_tokens=ctx.cfg.eval.max_new_tokens,
        batch_size=ctx.cfg.eval.batch_size, seed=ctx.cfg.seed + 2,
    )
    responses = [group[0].text for group in samples]
    with torch.no_grad():
        diff = response_logps(policy, tokenizer, prompts, responses, batch_size=ctx.cfg.eval.batch_size) - response_logps(
            reference, tokenizer, prompts, responses, batch_size=ctx.cfg.eval.batch_size
        )
    return float(diff.mean())
