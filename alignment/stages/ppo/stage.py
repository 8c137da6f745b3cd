"""PPO against a reward model: the RLHF step of Ziegler et al. (2019) and Ouyang et al. (2022).

TRL 1.x no longer ships PPO, so it is written here in TRL's spirit: the maths are the pure
functions of maths.py, the rollout (sample, score, advantages) is rollout.py, the loop with its
updates and mid-stage checkpoints is loop.py, and the optimiser over policy and value (one
process, several, or DeepSpeed) is engine.py. This module sets the stage up and records it.

Models: the policy starts from the latest policy checkpoint (SFT), a frozen copy of it is the
reference (with LoRA: the same network with its adapters disabled), the reward model comes from
the chain's reward stage (or ``ppo.reward_from``), and the value model starts from the reward
model (``ppo.value_from=reward``) or from the policy. Under ZeRO-3 every one of them is created
partitioned over the ranks: policy and value model train in PPO's DeepSpeed engine, reference and
reward model are ZeRO-3 inference engines (``frozen_engine``), whole only while rank 0 evaluates.

    python -m alignment.run +recipe=sft_rm_ppo
    python -m alignment.run +recipe=sft_rm_ppo ppo.kl_estimator=k3 ppo.adaptive_kl=true ppo.kl_target=0.5
"""

from __future__ import annotations

import copy
from typing import Any, Optional

from transformers import AutoModelForCausalLM

from alignment.config import PPOConfig
from alignment.data.sources import text_windows
from alignment.data.stage_data import prompt_data
from alignment.errors import StageError
from alignment.evaluate import evaluate_held_out, kl_to_reference, policy_reward_score
from alignment.modeling import lora
from alignment.modeling.generation import render_prompts
from alignment.modeling.loading import load_reward_model, load_value_model_from_policy
from alignment.modeling.rollout_engine import rollout_engine
from alignment.records import StageResult
from alignment.scale.distributed import frozen_engine, gathered, on_rank_zero, unsharded
from alignment.stages.common import (
    StageContext,
    find_reward_model,
    load_policy,
    padding_free,
    place,
    require_policy_start,
    save_checkpoint,
    seed_everything,
    stage_result,
    stage_tokenizer,
    zero3_creation,
)
from alignment.stages.ppo.engine import PPOEngine
from alignment.stages.ppo.loop import ppo_loop


def train_ppo(cfg: PPOConfig, ctx: StageContext) -> StageResult:
    """Run the PPO stage described by ``cfg``."""
    seed_everything(ctx)
    require_policy_start(ctx)
    reward_start = find_reward_model(cfg.reward_from, ctx, key="ppo.reward_from")
    tokenizer = stage_tokenizer(ctx)
    messages, examples, data = prompt_data(ctx.cfg.data, cfg, stage="ppo", n_prompts=cfg.n_prompts, max_prompt_tokens=cfg.max_prompt_tokens,
                                           min_prompts=cfg.rollout_batch_size, seed=ctx.cfg.seed, tokenizer=tokenizer)  # checked before models load
    prompts = [ids[-cfg.max_prompt_tokens:] for ids in render_prompts(tokenizer, messages)]  # over-long: keep the end
    # Under ZeRO-3 every model here is created partitioned over the ranks (zero3 set): the policy
    # and value model for PPO's engine, the reference and reward model as ZeRO-3 inference engines.
    zero3 = zero3_creation(ctx)
    policy = padding_free(load_policy(ctx, tokenizer), ctx)  # with model.peft: a PeftModel (fresh, or init_from's adapter)
    if lora.is_peft(policy):
        if ctx.start.adapter:
            lora.add_reference_adapter(policy)  # a continued adapter: the reference is its frozen copy
        reference = lora.ReferenceView(policy)  # no second model: the same weights, adapters disabled
    elif zero3 is not None:
        reference = frozen_engine(padding_free(load_policy(ctx, tokenizer, trainable=False, sharded=True), ctx), zero3)
    else:
        reference = copy.deepcopy(policy).eval().requires_grad_(False)
    reward_model, reward_tokenizer = load_reward_model(reward_start.path, ctx.cfg.model, zero3=zero3)
    if reward_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise StageError(f"ppo: the reward model {reward_start.path} uses another tokenizer than the policy; train it from the same base")
    reward_model = place(padding_free(reward_model, ctx)).eval().requires_grad_(False)
    if zero3 is not None:
        reward_model = frozen_engine(reward_model, zero3)
    value_model = _value_model(cfg, ctx, reward_start.path, zero3=zero3)

    engine = PPOEngine(cfg, ctx, policy=policy, value_model=value_model)
    sampler = rollout_engine(policy, tokenizer, use_vllm=cfg.use_vllm, temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens,
                             max_model_tokens=cfg.max_prompt_tokens + cfg.max_new_tokens,
                             gpu_memory_utilization=cfg.vllm_gpu_memory_utilization)  # HF generate, or vLLM as GRPO uses it
    ptx_windows = text_windows(cfg.ptx_text, tokenizer, max_tokens=cfg.ptx_window_tokens) if cfg.ptx_coef > 0 else []
    history = ppo_loop(cfg, ctx, engine=engine, sampler=sampler, reference=reference, reward_model=reward_model, tokenizer=tokenizer,
                       prompts=prompts, examples=examples, ptx_windows=ptx_windows)

    with engine.whole_policy() as whole:
        saved = save_checkpoint(whole, tokenizer, ctx)
    metrics: dict[str, Any] = {"train_steps": len(history), "history": history, **{f"final/{k}": v for k, v in history[-1].items()}}
    metrics["stopped_early"] = history[-1].get("stopped_early")
    if ctx.cfg.eval.enabled:
        policy = place(unsharded(policy, saved.path, loader=AutoModelForCausalLM))  # ZeRO-3: a whole copy, for rank 0 to evaluate
        held, eval_cfg = data.held_out, ctx.cfg.eval

        def evaluate() -> dict[str, Any]:
            return {**evaluate_held_out(policy, tokenizer, held, cfg=eval_cfg, seed=ctx.cfg.seed),
                    "kl_to_parent": kl_to_reference(policy, reference, tokenizer, held, cfg=eval_cfg, seed=ctx.cfg.seed + 2),
                    "reward_model_score": policy_reward_score(policy, tokenizer, reward_model, held, cfg=eval_cfg, seed=ctx.cfg.seed + 3)}

        # Under ZeRO-3, whole while rank 0 evaluates: the inference engines, or with LoRA the trained
        # engine, whose policy the reference view runs with its adapters disabled.
        lora_reference = engine.ds_engine if isinstance(reference, lora.ReferenceView) else None
        with gathered(reference, reward_model, lora_reference):
            metrics.update(on_rank_zero(evaluate))  # rank 0 evaluates, every rank records
    return stage_result(ctx, cfg, saved=saved, data=data, metrics=metrics, inputs={"reward_model": reward_start.record()})


def _value_model(cfg: PPOConfig, ctx: StageContext, reward_path: str, *, zero3: Optional[dict[str, Any]] = None):
    """PPO's value model, with a trained head (LoRA: adapters and the head); partitioned under ``zero3``."""
    if cfg.value_from == "reward":
        model, _ = load_reward_model(reward_path, ctx.cfg.model, zero3=zero3)
    else:
        model = load_value_model_from_policy(ctx.start.path, zero3=zero3)
    model = padding_free(model, ctx)
    model.config.pad_token_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    return place(lora.unwrap(lora.attach(model, ctx.cfg, task=lora.SEQ_CLS, adapter=None)))  # token_values reads .score
