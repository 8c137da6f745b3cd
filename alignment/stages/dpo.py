"""Direct preference optimisation against the frozen parent policy (Rafailov et al., 2023).

Loss per batch, with r(y) = beta * (log pi(y|x) - log pi_ref(y|x)) summed over y's tokens and
w = ``dpo.sft_loss_weight``:

    L = mean over pairs of -log sigmoid(r(chosen) - r(rejected))
        + w * mean over every chosen token t of the batch of -log pi(t | prefix)

The second term is RPO's (Pang et al. 2024): the negative log-likelihood of the chosen responses,
averaged per token, on by default (w = 1) because plain DPO on near-miss pairs also lowers the
chosen answer's likelihood; ``dpo.sft_loss_weight=0`` is plain DPO, where every pair costs ln 2 at
the start (pi == pi_ref). Wraps TRL's ``DPOTrainer`` (loss types ``[loss_type, "sft"]``). On the
task suite the pairs are sampled from the parent policy and labelled by the verifier, or by the
chain's reward model (``dpo.pair_labeler``); with ``data_path``/``data.path`` they are read from a file.

After training the policy is evaluated like every stage, plus on held-out pairs: implicit
reward accuracy (share of pairs with r(chosen) > r(rejected)) and margin, and the KL from the
parent policy, estimated on the policy's own samples of the held-out prompts.

    python -m alignment.run +recipe=sft_then_dpo
    python -m alignment.run +recipe=dpo dpo.init_from=outputs/sft_then_dpo/sft dpo.beta=0.2
"""

from __future__ import annotations

import copy
from typing import Any, Optional

from transformers import AutoModelForCausalLM
from trl import DPOConfig as TRLDPOConfig
from trl import DPOTrainer

from alignment.config import DPOConfig
from alignment.errors import StageError
from alignment.data.pairs import Scorer, preference_data
from alignment.evaluate import evaluate_held_out, kl_to_reference, policy_reward_score, preference_metrics
from alignment.modeling import compact_head, lora
from alignment.modeling.loading import load_reward_model
from alignment.modeling.scoring import score_responses
from alignment.records import StageResult
from alignment.scale import checkpoints
from alignment.scale.distributed import is_zero3, unsharded
from alignment.stages.common import Lazy, StageContext, find_reward_model, load_policy, padding_free, place, require_policy_start
from alignment.stages.trl_stage import Prepared, TRLStage, run_trl_stage, trainer_kwargs


def train_dpo(cfg: DPOConfig, ctx: StageContext) -> StageResult:
    """Run the DPO stage described by ``cfg``."""
    return run_trl_stage(DPO, cfg, ctx)


def prepare(cfg: DPOConfig, ctx: StageContext, tokenizer) -> Prepared:
    require_policy_start(ctx)
    policy = Lazy(lambda: padding_free(load_policy(ctx, tokenizer), ctx))  # pairs are sampled from the policy being trained
    labeler = Lazy(lambda: _reward_labeler(cfg, ctx, tokenizer))
    data = preference_data(ctx.cfg, cfg, tokenizer=tokenizer, sampling_policy=policy, scorer=lambda: labeler()[0],
                           journal=checkpoints.sampling_dir(ctx.stage_dir, ctx.inputs_key))  # kept across a preemption
    model = policy()
    inputs, reward_model = {}, None
    if labeler.value is not None and labeler.value[0] is not None:
        _, reward_model, reward_start = labeler.value
        inputs["reward_model"] = reward_start.record()
    return Prepared(model=model, tokenizer=tokenizer, data=data, inputs=inputs,
                    extras={"reference": reference_model(cfg, ctx, model, tokenizer), "reward_model": reward_model})


def precompute_reference(cfg: DPOConfig) -> bool:
    """Whether the reference log-probs are computed once before training (``dpo.precompute_ref_log_probs``)."""
    return cfg.num_epochs > 1 if cfg.precompute_ref_log_probs is None else cfg.precompute_ref_log_probs


def reference_model(cfg: DPOConfig, ctx: StageContext, model, tokenizer):
    """The frozen reference DPO trains against, or None when TRL needs no second model: with
    LoRA it computes the reference on this same model through a frozen copy of the starting
    adapter (for a fresh adapter, zero: the base); with precomputed log-probs it reads the
    policy once before training. Under ZeRO-3 (a partitioned policy) it is loaded again,
    partitioned too; TRL's DPOTrainer then wraps it in a ZeRO-3 inference engine
    (trl.models.utils.prepare_deepspeed), so each rank holds 1/world of it."""
    if lora.is_peft(model) or precompute_reference(cfg):
        return None
    if is_zero3(model):
        return padding_free(load_policy(ctx, tokenizer, trainable=False, sharded=True), ctx).eval().requires_grad_(False)
    return copy.deepcopy(model).eval().requires_grad_(False)


def build_trainer(cfg: DPOConfig, ctx: StageContext, prepared: Prepared, **overrides: Any) -> DPOTrainer:
    """TRL's DPOTrainer as this stage runs it; ``overrides`` replace trainer arguments (the
    benchmark's step count). Each [chosen; rejected] batch runs padding-free with the prompt
    shared by its pair (``padding_free`` in ``prepare``); the LM head scores completion tokens only."""
    losses = {"loss_type": [cfg.loss_type]}
    if cfg.sft_loss_weight > 0:
        losses = {"loss_type": [cfg.loss_type, "sft"], "loss_weights": [1.0, cfg.sft_loss_weight]}
    args = TRLDPOConfig(**{**trainer_kwargs(cfg, ctx), **overrides}, beta=cfg.beta,
                        precompute_ref_log_probs=precompute_reference(cfg), **losses)
    trainer = DPOTrainerOnIds(model=prepared.model, ref_model=prepared.extras["reference"], args=args, train_dataset=prepared.data.train,
                              processing_class=prepared.tokenizer)
    compact_head.score_labelled_only(trainer)  # TRL's fused LM head, on labelled positions only
    return trainer


def evaluate(cfg: DPOConfig, ctx: StageContext, prepared: Prepared, policy) -> dict[str, Any]:
    """Gold accuracy, implicit-reward accuracy on held-out pairs, KL to the parent, and the
    reward model's score when one labelled the pairs."""
    tokenizer, data, eval_cfg = prepared.tokenizer, prepared.data, ctx.cfg.eval
    reference = prepared.extras["reference"]
    if reference is None:  # LoRA: the adapter-disabled model; precomputed: the parent, loaded again
        reference = (lora.ReferenceView(prepared.model) if lora.is_peft(prepared.model)
                     else padding_free(load_policy(ctx, tokenizer, trainable=False), ctx))
    reference = place(unsharded(reference, ctx.start.path, loader=AutoModelForCausalLM))
    held = data.held_out
    metrics = evaluate_held_out(policy, tokenizer, held, cfg=eval_cfg, seed=ctx.cfg.seed)
    metrics.update(preference_metrics(policy, reference, tokenizer, data.eval_pairs, beta=cfg.beta, batch_size=eval_cfg.batch_size))
    metrics["kl_to_parent"] = kl_to_reference(policy, reference, tokenizer, held, cfg=eval_cfg, seed=ctx.cfg.seed + 2)
    reward_model = prepared.extras["reward_model"]
    if reward_model is not None:  # the proxy's view beside gold accuracy
        metrics["reward_model_score"] = policy_reward_score(policy, tokenizer, reward_model, held, cfg=eval_cfg, seed=ctx.cfg.seed + 3)
        train_counts = data.counts.get("train", {})
        metrics["pair_label_agreement"] = train_counts.get("agrees_with_verifier", 0) / max(1, train_counts.get("pairs", 0))
    return metrics


DPO = TRLStage(prepare=prepare, build_trainer=build_trainer, evaluate=evaluate, loader=AutoModelForCausalLM)


class DPOTrainerOnIds(DPOTrainer):
    """TRL's DPOTrainer, taking rows that already carry their token ids (``prompt_ids``,
    ``chosen_ids``, ``rejected_ids``, as sampled pairs do) as they are: TRL would render their
    text with the chat template and tokenize it again, which with BPE is not the sequence that
    was sampled. Text rows (a pairs file) go through TRL's own tokenization. Overrides TRL's
    private ``_prepare_dataset`` (alignment/compat.py checks its signature at start-up)."""

    _COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        if not set(self._COLUMNS) <= set(dataset.column_names):
            return super()._prepare_dataset(dataset, processing_class, args, dataset_name)
        dataset = dataset.select_columns(list(self._COLUMNS))
        if args.max_length is not None and args.truncation_mode == "keep_start":  # as TRL: a prompt that fills max_length teaches nothing
            dataset = dataset.filter(lambda row: len(row["prompt_ids"]) < args.max_length)
        return dataset


def _reward_labeler(cfg: DPOConfig, ctx: StageContext, tokenizer) -> tuple[Optional[Scorer], Any, Any]:
    """(scorer, reward model, its start point) when a reward model labels the sampled pairs
    (``dpo.pair_labeler``), else (None, None, None): the verifier labels them."""
    use_reward = cfg.pair_labeler == "reward" or (cfg.pair_labeler == "auto" and (cfg.reward_from or "reward" in ctx.previous))
    if not use_reward:
        return None, None, None
    reward_start = find_reward_model(cfg.reward_from, ctx, key="dpo.reward_from")
    reward_model, reward_tokenizer = load_reward_model(reward_start.path, ctx.cfg.model)
    if reward_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise StageError(f"dpo: the reward model {reward_start.path} uses another tokenizer than the policy, so it cannot score the "
                         f"policy's token ids; train it from the same base")
    reward_model = place(padding_free(reward_model, ctx))

    def scorer(prompt_ids, reply_ids):
        return score_responses(reward_model, prompt_ids, reply_ids, pad_token_id=reward_tokenizer.pad_token_id,
                               batch_size=cfg.pairs.batch_size).tolist()

    return scorer, reward_model, reward_start
