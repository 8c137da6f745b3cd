"""What the online-RL stages (GRPO, RLOO) share: prompts, rewards, the pre-flight, TRL's
arguments, and evaluation. grpo.py and rloo.py say only which TRL trainer and which knobs.

Both sample ``num_generations`` replies per prompt from the current policy, score each with the
weighted sum of ``<stage>.rewards`` (alignment/rewards/functions.py) and raise the log-probability
of replies that beat their group's baseline. Generation is HF ``generate`` inside TRL on CPU, or
vLLM colocated on a GPU with ``<stage>.use_vllm=true``. Dropout is off in every forward (TRL's
``disable_dropout``), so the old and new log-probs of the first update agree. The policy's
forwards are not repacked: TRL feeds these trainers left-padded prompts with their attention
mask, which padding-free packing leaves alone anyway.

Before the first update the pre-flight (alignment/rewards/preflight.py) runs every reward on the
starting policy's samples and the reference answers, and stops a reward that cannot teach.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, PreTrainedTokenizerBase, Trainer

from alignment.config import OnlineRLConfig
from alignment.data.sources import text_windows
from alignment.data.stage_data import prompt_data
from alignment.errors import StageError
from alignment.evaluate import evaluate_held_out, kl_to_reference, policy_reward_score
from alignment.modeling import lora
from alignment.modeling.loading import load_reward_model
from alignment.modeling.scoring import plain_text_nll, policy_forward
from alignment.rewards.functions import build_rewards, reward_model_reward
from alignment.rewards.preflight import run_preflight
from alignment.scale.distributed import gathered, on_rank_zero, unsharded, world_size
from alignment.stages.common import StageContext, find_reward_model, load_policy, place, require_policy_start
from alignment.stages.trl_stage import Prepared, trainer_kwargs


def max_prompt_tokens(cfg: OnlineRLConfig) -> int:
    return cfg.max_seq_tokens - cfg.max_new_tokens


def prepare(cfg: OnlineRLConfig, ctx: StageContext, tokenizer: PreTrainedTokenizerBase) -> Prepared:
    """Prompts (checked before any model loads), the rewards, the policy; then the pre-flight."""
    require_policy_start(ctx)
    messages, examples, data = prompt_data(ctx.cfg.data, cfg, stage=ctx.stage, n_prompts=cfg.n_prompts, max_prompt_tokens=max_prompt_tokens(cfg),
                                           min_prompts=max(1, cfg.sequences_per_step(world_size()) // cfg.num_generations), seed=ctx.cfg.seed,
                                           tokenizer=tokenizer)
    columns: dict[str, list] = {"example_index": list(range(len(messages)))}
    references = [e.answer for e in examples] if all(e is not None for e in examples) else None
    if references is not None:
        columns["answer"] = references
    data.train = Dataset.from_dict({"prompt": messages, **columns})

    inputs, reward_model, scorer = {}, None, None
    if any(r.name == "reward_model" for r in cfg.rewards):
        reward_start = find_reward_model(cfg.reward_from, ctx, key=f"{ctx.stage}.reward_from")
        reward_model, reward_tokenizer = load_reward_model(reward_start.path, ctx.cfg.model)
        if reward_tokenizer.get_vocab() != tokenizer.get_vocab():
            raise StageError(f"{ctx.stage}: the reward model {reward_start.path} uses another tokenizer than the policy, so it "
                             f"cannot score the policy's token ids; train it from the same base")
        reward_model = place(reward_model).eval().requires_grad_(False)
        scorer = reward_model_reward(reward_model, tokenizer, batch_size=ctx.cfg.eval.batch_size)
        inputs["reward_model"] = reward_start.record()
    rewards = build_rewards(cfg.rewards, stage=ctx.stage, examples=examples, reward_model=scorer)

    policy = load_policy(ctx, tokenizer)
    if cfg.preflight:
        n = min(cfg.preflight_prompts, len(messages))
        with gathered(policy):  # created partitioned under ZeRO-3: whole while rank 0 samples
            data.counts["preflight"] = on_rank_zero(lambda: run_preflight(
                rewards, policy=policy, tokenizer=tokenizer, prompts=messages[:n], columns={k: v[:n] for k, v in columns.items()},
                references=references[:n] if references is not None else None, num_generations=cfg.num_generations,
                temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens, batch_size=ctx.cfg.eval.batch_size,
                seed=ctx.cfg.seed + 5, stage=ctx.stage))
    return Prepared(model=policy, tokenizer=tokenizer, data=data, inputs=inputs,
                    extras={"rewards": rewards, "reward_model": reward_model})


def build_trainer(cfg: OnlineRLConfig, ctx: StageContext, prepared: Prepared, *, trainer_class: type, config_class: type,
                  specific: dict[str, Any], overrides: dict[str, Any]) -> Trainer:
    """The TRL trainer with the shared arguments, the stage's own (``specific``) and the caller's ``overrides``."""
    shared = trainer_kwargs(cfg, ctx)
    del shared["max_length"], shared["dataset_num_proc"]  # not TRL online-trainer arguments: prompts were cut when checked
    rewards = prepared.extras["rewards"]
    args = config_class(
        **{**shared, **overrides},
        num_generations=cfg.num_generations,
        temperature=cfg.temperature,
        max_completion_length=cfg.max_new_tokens,
        beta=cfg.beta,
        epsilon=cfg.epsilon,
        epsilon_high=cfg.epsilon_high,
        num_iterations=cfg.num_iterations,
        reward_weights=[r.weight for r in rewards],
        disable_dropout=True,
        use_vllm=cfg.use_vllm,
        vllm_mode="colocate",
        vllm_gpu_memory_utilization=cfg.vllm_gpu_memory_utilization,
        **specific,
    )
    if cfg.ptx_coef > 0:  # PPO-ptx's pre-training term, added to TRL's loss (with_pretraining_term)
        windows = text_windows(cfg.ptx_text, prepared.tokenizer, max_tokens=cfg.ptx_window_tokens)
        trainer_class = with_pretraining_term(trainer_class, windows, coef=cfg.ptx_coef, batch_size=cfg.ptx_batch_size,
                                              pad_token_id=prepared.tokenizer.pad_token_id, seed=ctx.cfg.seed)
    return trainer_class(model=prepared.model, reward_funcs=[r.fn for r in rewards], args=args,
                         train_dataset=prepared.data.train, processing_class=prepared.tokenizer)


def with_pretraining_term(trainer_class: type, windows: list[list[int]], *, coef: float, batch_size: int, pad_token_id: int,
                          seed: int) -> type:
    """``trainer_class`` whose loss adds ``coef`` x the language-modelling loss of ``batch_size``
    plain-text windows per call. The windows are drawn from a generator seeded by (seed, optimiser
    step, call within the step), so a run resumed from a mid-stage checkpoint draws the same ones."""

    class WithPretrainingTerm(trainer_class):
        _ptx_step, _ptx_call = -1, 0

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
            if self.state.global_step != self._ptx_step:
                self._ptx_step, self._ptx_call = self.state.global_step, 0
            self._ptx_call += 1
            generator = torch.Generator().manual_seed(hash((seed, self._ptx_step, self._ptx_call)) % (1 << 62))
            drawn = [windows[i] for i in torch.randint(len(windows), (batch_size,), generator=generator).tolist()]
            ptx = plain_text_nll(lambda packed: policy_forward(model, packed, temperature=1.0)[0], drawn, pad_token_id=pad_token_id,
                                 device=self.accelerator.device)
            self._metrics["train" if model.training else "eval"]["ptx_loss"].append(float(ptx.detach()))
            return loss + coef * ptx

    WithPretrainingTerm.__name__ = f"{trainer_class.__name__}WithPretrainingTerm"
    return WithPretrainingTerm


def evaluate(cfg: OnlineRLConfig, ctx: StageContext, prepared: Prepared, policy) -> dict[str, Any]:
    """Gold accuracy (or response statistics), KL to the starting policy, and the reward model's
    score when one of the rewards is a reward model."""
    tokenizer, eval_cfg, held = prepared.tokenizer, ctx.cfg.eval, prepared.data.held_out
    metrics = evaluate_held_out(policy, tokenizer, held, cfg=eval_cfg, seed=ctx.cfg.seed)
    reference = (lora.ReferenceView(prepared.model) if lora.is_peft(prepared.model)
                 else load_policy(ctx, tokenizer, trainable=False))  # beta 0 holds no reference while training
    reference = place(unsharded(reference, ctx.start.path, loader=AutoModelForCausalLM))
    metrics["kl_to_parent"] = kl_to_reference(policy, reference, tokenizer, held, cfg=eval_cfg, seed=ctx.cfg.seed + 2)
    reward_model: Optional[Any] = prepared.extras["reward_model"]
    if reward_model is not None:
        metrics["reward_model_score"] = policy_reward_score(policy, tokenizer, reward_model, held, cfg=eval_cfg, seed=ctx.cfg.seed + 3)
    return metrics

