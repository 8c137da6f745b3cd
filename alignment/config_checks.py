"""Cross-field config rules, checked once before any model, data or process is loaded or started.

The schema (alignment/config/) already refuses unknown keys and wrong types while Hydra
composes the config; what is left is what a single field cannot say: recipes whose stages cannot
run in that order, values that cannot work, batch algebra over processes, ZeRO and LoRA options
that need each other or a GPU. Every rule raises one error that names the key and the fix.
"""

from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path

import torch

from alignment.config import AlignmentConfig, OnlineRLConfig, PPOConfig, SelfInstructConfig, TrainConfig
from alignment.data.plain_text import SUITE_SOURCE
from alignment.data.sources import MIXTURE, stage_data, stage_source, text_source_documents
from alignment.errors import StageError
from alignment.modeling.lora import qlora_problem
from alignment.rewards.functions import check_reward_specs
from alignment.scale import distributed
from alignment.stages import MODULES, POLICY_STAGES
from alignment.tracking.choose import check_config as check_tracking

# The shortest sequence a stage can train on: a chat-rendered prompt and one response token
# take more than this with any template (the embedded suite's shortest is 20 characters).
MIN_SEQ_TOKENS = 8


def check_config(cfg: AlignmentConfig) -> None:
    """Cross-field rules, checked before any model or data is loaded."""
    _check_model(cfg)
    if not cfg.stages:
        raise StageError("no stages to run: pick a recipe with +recipe=NAME (see README: sft_then_dpo, sft, dpo)")
    unknown = [s for s in cfg.stages if s not in MODULES]
    if unknown:
        raise StageError(f"recipe {cfg.recipe!r}: unknown stage(s) {unknown} in 'stages'; known stages: {sorted(MODULES)}")
    if len(set(cfg.stages)) != len(cfg.stages):
        raise StageError(f"recipe {cfg.recipe!r}: a stage appears twice in 'stages' {list(cfg.stages)}")
    for stage in cfg.stages:
        train = getattr(cfg, stage)
        if train.learning_rate <= 0:
            raise StageError(f"{stage}.learning_rate={train.learning_rate} must be > 0")
        if isinstance(train, TrainConfig):
            for name in ("per_device_batch_size", "gradient_accumulation_steps", "global_batch_size", "max_seq_tokens"):
                if getattr(train, name) is not None and getattr(train, name) <= 0:
                    raise StageError(f"{stage}.{name}={getattr(train, name)} must be > 0")
            if train.max_steps <= 0 and train.num_epochs <= 0:
                raise StageError(f"{stage}: set {stage}.num_epochs > 0 or {stage}.max_steps > 0")
        data_cfg = stage_data(cfg.data, train)
        path = stage_source(data_cfg, train.data_path)
        members = [s.path for s in data_cfg.sources] if path == MIXTURE else [path] if path else []
        if SUITE_SOURCE in members and stage != "sft":
            raise StageError(f"{stage}: the mixture member {SUITE_SOURCE!r} (the task suite's demonstrations) is for SFT only: "
                             f"put the mixture in sft.data_sources, not data.sources")
        for source in members:
            if Path(source).suffix and not Path(source).expanduser().is_file():
                key = f"{stage}.data_path" if train.data_path else f"{stage}.data_sources/data.sources" if path == MIXTURE else "data.path"
                what = "is a directory, not a file" if Path(source).expanduser().is_dir() else "no such file"
                raise StageError(f"{key}: {source}: {what}")
    first = getattr(cfg, cfg.stages[0])
    if cfg.stages[0] in ("dpo", "ppo", "reward", "grpo", "rloo") and not (first.init_from or cfg.model.name_or_path):
        name = cfg.stages[0]
        raise StageError(f"recipe {cfg.recipe!r}: {name} is the first stage, so it needs a policy: set {name}.init_from=<stage dir or HF dir>")
    if "ppo" in cfg.stages and not cfg.ppo.reward_from and "reward" not in cfg.stages[: cfg.stages.index("ppo")]:
        raise StageError(f"recipe {cfg.recipe!r}: ppo needs a reward model: put a reward stage before it or set ppo.reward_from=<reward stage or HF dir>")
    for stage in cfg.stages:
        if isinstance(getattr(cfg, stage), OnlineRLConfig):
            _check_online_rl(cfg, stage)
        if isinstance(getattr(cfg, stage), (OnlineRLConfig, PPOConfig)):
            _check_vllm(getattr(cfg, stage), stage)
            _check_ptx(getattr(cfg, stage), stage)
    if "self_instruct" in cfg.stages:
        _check_self_instruct(cfg)
    if cfg.dpo.pair_labeler not in ("auto", "verifier", "reward"):
        raise StageError(f"dpo.pair_labeler={cfg.dpo.pair_labeler!r}: use auto, verifier or reward")
    if cfg.ppo.lr_scheduler not in ("constant", "linear", "cosine") or not 0 <= cfg.ppo.warmup_ratio < 1:
        raise StageError(f"ppo.lr_scheduler={cfg.ppo.lr_scheduler!r} / ppo.warmup_ratio={cfg.ppo.warmup_ratio}: use constant, linear "
                         f"or cosine, and a warmup ratio in [0, 1)")
    if cfg.ppo.value_from not in ("reward", "policy"):
        raise StageError(f"ppo.value_from={cfg.ppo.value_from!r}: use reward or policy")
    _check_lm_text(cfg)
    _validate_scale_out(cfg)
    check_tracking(cfg)
    if cfg.data.over_length not in ("drop", "truncate", "error"):
        raise StageError(f"data.over_length={cfg.data.over_length!r}: use drop, truncate or error")
    if cfg.eval.samples_per_prompt < 1 or cfg.eval.max_new_tokens < 1:
        raise StageError("eval.samples_per_prompt and eval.max_new_tokens must be >= 1")
    _check_ranges(cfg)


def _check_ranges(cfg: AlignmentConfig) -> None:
    """Values no run can use, refused in seconds instead of after the models load (or never)."""
    if "dpo" in cfg.stages and cfg.dpo.beta <= 0:
        raise StageError(f"dpo.beta={cfg.dpo.beta} must be > 0: it scales the implicit reward beta * log(pi/pi_ref), so 0 "
                         f"trains nothing and a negative value prefers the rejected responses (0.1 is usual)")
    # Where sampling is meant, temperature 0 divides the logits by zero (NaN) and "sampled" would be greedy.
    sampling = [("eval.temperature", cfg.eval.temperature, cfg.eval.enabled), ("ppo.temperature", cfg.ppo.temperature, "ppo" in cfg.stages),
                ("dpo.pairs.temperature", cfg.dpo.pairs.temperature, "dpo" in cfg.stages),
                ("reward.pairs.temperature", cfg.reward.pairs.temperature, "reward" in cfg.stages)]
    for key, value, used in sampling:
        if used and value <= 0:
            raise StageError(f"{key}={value} must be > 0: it is a sampling temperature (1.0 samples the policy as it is; greedy "
                             f"accuracy is reported beside the sampled one already)")
    for stage in cfg.stages:
        train = getattr(cfg, stage)
        if isinstance(train, TrainConfig) and train.max_seq_tokens < MIN_SEQ_TOKENS:
            raise StageError(f"{stage}.max_seq_tokens={train.max_seq_tokens} cannot hold a prompt and a response (every row would "
                             f"be cut to nothing and dropped); use at least {MIN_SEQ_TOKENS}, and enough for your longest rows")
        pairs = getattr(train, "pairs", None)
        if pairs is not None and (pairs.samples_per_prompt < 2 or pairs.max_new_tokens < 1 or pairs.n_prompts < 1):
            raise StageError(f"{stage}.pairs: samples_per_prompt must be >= 2 (a pair needs two replies), max_new_tokens and "
                             f"n_prompts >= 1 (got {pairs.samples_per_prompt}, {pairs.max_new_tokens}, {pairs.n_prompts})")
    if "ppo" in cfg.stages and (cfg.ppo.max_new_tokens < 1 or cfg.ppo.num_rollouts < 1 or cfg.ppo.kl_coef < 0 or cfg.ppo.clip_range <= 0):
        raise StageError(f"ppo: max_new_tokens and num_rollouts must be >= 1, kl_coef >= 0 and clip_range > 0 (got "
                         f"{cfg.ppo.max_new_tokens}, {cfg.ppo.num_rollouts}, {cfg.ppo.kl_coef}, {cfg.ppo.clip_range})")


def planned_world_size(cfg: AlignmentConfig) -> int:
    """Processes the run will have: this job's WORLD_SIZE once launched, else the launcher's plan."""
    if "WORLD_SIZE" in os.environ:
        return distributed.world_size()
    launcher = cfg.launcher
    if launcher.name == "slurm":
        return launcher.nodes * (launcher.gpus_per_node or launcher.cpu_procs_per_node)
    return launcher.nproc_per_node * launcher.nnodes


def batch_plan(cfg: AlignmentConfig) -> list[str]:
    """Each stage's batch algebra as a line a user can check: per device x accumulation x processes."""
    world = planned_world_size(cfg)
    lines = []
    for stage in cfg.stages:
        train = getattr(cfg, stage)
        if isinstance(train, PPOConfig):
            lines.append(f"ppo: {train.rollout_batch_size} prompts per rollout = {train.rollout_batch_size // world} per process x {world} "
                         f"processes; {train.mini_batch_size} rollouts per optimiser step = {train.mini_batch_size // world} per process x {world}")
        elif isinstance(train, SelfInstructConfig):
            lines.append(f"{stage}: {train.instructions_per_round} instructions written per round, in one process")
        else:
            forward, accumulation = train.split_batch(world)
            lines.append(f"{stage}: {forward} per device x {accumulation} accumulation x {world} processes = "
                         f"{forward * accumulation * world} sequences per step")
    return lines


def _nearest_multiple(value: int, of: int) -> int:
    """The multiple of ``of`` nearest ``value`` (never 0)."""
    return max(of, of * round(value / of))


def _check_global_batch(stage: str, train: TrainConfig, world: int) -> None:
    """A global batch that splits evenly over the processes, and accumulation set in one way only."""
    if train.global_batch_size is None:
        return
    if train.gradient_accumulation_steps is not None:
        raise StageError(f"{stage}.gradient_accumulation_steps={train.gradient_accumulation_steps} and {stage}.global_batch_size="
                         f"{train.global_batch_size} are both set: accumulation is derived from the global batch, the processes and "
                         f"{stage}.per_device_batch_size; drop gradient_accumulation_steps (or set {stage}.global_batch_size=null to "
                         f"count the batch per device)")
    if train.global_batch_size % world:
        below, above = world * (train.global_batch_size // world), world * (train.global_batch_size // world + 1)
        raise StageError(f"{stage}.global_batch_size={train.global_batch_size} does not split evenly over {world} processes: set "
                         f"{stage}.global_batch_size to a multiple of {world} ({', '.join(str(b) for b in (below, above) if b)}), or run "
                         f"on a process count that divides it")


def _validate_scale_out(cfg: AlignmentConfig) -> None:
    """Batch-size algebra, ZeRO options, LoRA and the launcher, before anything is launched."""
    launcher, ds = cfg.launcher, cfg.deepspeed
    if launcher.name not in ("local", "slurm"):
        raise StageError(f"launcher.name={launcher.name!r}: use launcher=local or launcher=slurm")
    for key in ("nproc_per_node", "nnodes", "nodes", "cpu_procs_per_node"):
        if getattr(launcher, key) < 1:
            raise StageError(f"launcher.{key}={getattr(launcher, key)} must be >= 1")
    if ds.zero_stage not in (0, 1, 2, 3):
        raise StageError(f"deepspeed.zero_stage={ds.zero_stage}: use 0 (off), 1, 2 or 3 (deepspeed=none|zero1|zero2|zero3|zero3_offload)")
    if ds.offload_params and ds.zero_stage != 3:
        raise StageError(f"deepspeed.offload_params=true needs ZeRO stage 3 (deepspeed.zero_stage is {ds.zero_stage}); use deepspeed=zero3_offload")
    if ds.offload_optimizer and ds.zero_stage == 0:
        raise StageError("deepspeed.offload_optimizer=true needs ZeRO (deepspeed=zero1|zero2|zero3)")
    if ds.zero_stage and importlib.util.find_spec("deepspeed") is None:
        raise StageError(f"deepspeed.zero_stage={ds.zero_stage} needs DeepSpeed, which is not installed: pip install 'alignment[deepspeed]' "
                         f"(or run without ZeRO: deepspeed=none)")
    world = planned_world_size(cfg)
    for stage in cfg.stages:
        train = getattr(cfg, stage)
        if train.save_every_n_steps < 0 or train.keep_checkpoints < 1:
            raise StageError(f"{stage}.save_every_n_steps must be >= 0 and {stage}.keep_checkpoints >= 1")
        if not isinstance(train, TrainConfig):
            continue
        _check_global_batch(stage, train, world)
    _validate_ppo(cfg.ppo, world=world, used="ppo" in cfg.stages)
    if cfg.model.peft not in (None, "lora", "qlora"):
        raise StageError(f"model.peft={cfg.model.peft!r}: use lora, qlora, or leave it unset for full fine-tuning")
    problem = qlora_problem(cfg)
    if problem:  # before anything loads: QLoRA needs a GPU, bitsandbytes and a checkpoint on disk
        raise StageError(problem)


def _check_model(cfg: AlignmentConfig) -> None:
    """A real model under the toy's preset, and GGUF without what it needs."""
    model = cfg.model
    if model.preset == "tiny" and model.name_or_path:
        raise StageError(
            f"model.name_or_path={model.name_or_path} is set, but the model preset is the embedded toy's (model=tiny, the "
            f"default), whose training defaults suit a 0.44M-parameter model only (learning rate 1e-3, 128 tokens, batches of "
            f"32). Pick a preset for a real model: model=hf model.name_or_path={model.name_or_path} (defaults for a real "
            f"model, alignment/config/) or model=smollm2, or your own (README: 'A preset for your own model')")
    if model.gguf_file:
        if not model.name_or_path:
            raise StageError("model.gguf_file is set but model.name_or_path is not: name the directory (or hub repository) that "
                             "holds the GGUF file, e.g. model.name_or_path=/models/smollm2 model.gguf_file=model.Q4_1.gguf")
        if importlib.util.find_spec("gguf") is None:
            raise StageError(f"model.gguf_file={model.gguf_file} needs the gguf package to read the file: pip install 'alignment[gguf]'")


def _validate_ppo(ppo: PPOConfig, *, world: int, used: bool) -> None:
    """PPO's batch shapes: rollouts, mini-batches and micro-batches that divide over the processes."""
    if ppo.rollout_batch_size % ppo.mini_batch_size:
        raise StageError(f"ppo.rollout_batch_size={ppo.rollout_batch_size} must be a multiple of ppo.mini_batch_size={ppo.mini_batch_size}")
    if used and (ppo.rollout_batch_size % world or ppo.mini_batch_size % world):
        raise StageError(
            f"ppo: rollout_batch_size {ppo.rollout_batch_size} and mini_batch_size {ppo.mini_batch_size} must both divide evenly "
            f"over {world} processes (each process samples rollout_batch_size / {world} prompts and trains on "
            f"mini_batch_size / {world} of them per step)"
        )
    per_rank = ppo.mini_batch_size // world
    if ppo.micro_batch_size is not None and (ppo.micro_batch_size < 1 or (used and per_rank % min(ppo.micro_batch_size, per_rank))):
        raise StageError(f"ppo.micro_batch_size={ppo.micro_batch_size} must be >= 1 and divide the {per_rank} rollouts each "
                         f"process trains on per optimiser step (ppo.mini_batch_size {ppo.mini_batch_size} / {world} processes)")
    if ppo.forward_batch_size is not None and ppo.forward_batch_size < 1:
        raise StageError(f"ppo.forward_batch_size={ppo.forward_batch_size} must be >= 1 (rows per scoring forward on each process), "
                         f"or null to score micro_batch_size rows at a time")
    if ppo.max_prompt_tokens < 1:
        raise StageError(f"ppo.max_prompt_tokens={ppo.max_prompt_tokens} must be >= 1")
    if ppo.missing_eos_penalty < 0:
        raise StageError(f"ppo.missing_eos_penalty={ppo.missing_eos_penalty} must be >= 0: it is subtracted from the score of a "
                         f"response that never ends (TRL's convention); a negative value would reward truncation")


def _check_online_rl(cfg: AlignmentConfig, stage: str) -> None:
    """GRPO/RLOO: group sizes that divide the batch, lengths, sampling, and rewards that resolve."""
    rl: OnlineRLConfig = getattr(cfg, stage)
    if rl.num_generations < 2:
        raise StageError(f"{stage}.num_generations={rl.num_generations} must be >= 2: the baseline is the other replies to the same prompt")
    world = planned_world_size(cfg)
    _check_global_batch(stage, rl, world)
    replies = rl.sequences_per_step(world)
    if replies % rl.num_generations:
        raise StageError(f"{stage}: {replies} replies per step over {world} processes "
                         f"is not a multiple of {stage}.num_generations={rl.num_generations} (each prompt's group must be whole); "
                         f"e.g. {stage}.global_batch_size={_nearest_multiple(replies, math.lcm(rl.num_generations, world))}")
    if rl.max_new_tokens < 1 or rl.max_seq_tokens - rl.max_new_tokens < MIN_SEQ_TOKENS:
        raise StageError(f"{stage}: max_seq_tokens={rl.max_seq_tokens} must leave at least {MIN_SEQ_TOKENS} prompt tokens after "
                         f"max_new_tokens={rl.max_new_tokens} (and max_new_tokens >= 1)")
    if rl.temperature <= 0:
        raise StageError(f"{stage}.temperature={rl.temperature} must be > 0: online RL learns from differences between sampled replies")
    if rl.beta < 0 or rl.epsilon <= 0 or (rl.epsilon_high is not None and rl.epsilon_high < rl.epsilon) or rl.num_iterations < 1:
        raise StageError(f"{stage}: beta must be >= 0, epsilon > 0, epsilon_high >= epsilon and num_iterations >= 1 (got "
                         f"{rl.beta}, {rl.epsilon}, {rl.epsilon_high}, {rl.num_iterations})")
    if rl.preflight and rl.preflight_prompts < 1:
        raise StageError(f"{stage}.preflight_prompts={rl.preflight_prompts} must be >= 1 (or set {stage}.preflight=false)")
    has_verifier = stage_source(stage_data(cfg.data, rl), rl.data_path) is None
    has_reward_model = bool(rl.reward_from) or "reward" in cfg.stages[: cfg.stages.index(stage)]
    check_reward_specs(rl.rewards, stage=stage, has_verifier=has_verifier, has_reward_model=has_reward_model)


def _check_lm_text(cfg: AlignmentConfig) -> None:
    """eval.lm_text sources are read now, so a missing file or a row without text stops the run here."""
    if cfg.eval.lm_text_window_tokens < 2 or cfg.eval.lm_text_max_tokens < 2:
        raise StageError(f"eval.lm_text_window_tokens={cfg.eval.lm_text_window_tokens} and eval.lm_text_max_tokens="
                         f"{cfg.eval.lm_text_max_tokens} must be >= 2: a window's first token is context, the rest are scored")
    for path in cfg.eval.lm_text:
        text_source_documents(path)


def _check_ptx(stage_cfg, stage: str) -> None:
    """The pre-training term: a coefficient with text to train on, read now."""
    if stage_cfg.ptx_coef < 0 or stage_cfg.ptx_batch_size < 1 or stage_cfg.ptx_window_tokens < 2:
        raise StageError(f"{stage}: ptx_coef must be >= 0, ptx_batch_size >= 1 and ptx_window_tokens >= 2 (got "
                         f"{stage_cfg.ptx_coef}, {stage_cfg.ptx_batch_size}, {stage_cfg.ptx_window_tokens})")
    if stage_cfg.ptx_coef > 0 and not stage_cfg.ptx_text:
        raise StageError(f"{stage}.ptx_coef={stage_cfg.ptx_coef} needs plain text to train on: set {stage}.ptx_text=[file.txt, ...]")
    if stage_cfg.ptx_coef > 0:
        for path in stage_cfg.ptx_text:
            text_source_documents(path)


def _check_vllm(stage_cfg, stage: str) -> None:
    """vLLM for an online stage's sampling: asked for where it can run."""
    if not 0 < stage_cfg.vllm_gpu_memory_utilization <= 1:
        raise StageError(f"{stage}.vllm_gpu_memory_utilization={stage_cfg.vllm_gpu_memory_utilization} must be in (0, 1]: "
                         f"the share of each GPU the colocated vLLM engine takes")
    if stage_cfg.use_vllm and not torch.cuda.is_available():
        raise StageError(f"{stage}.use_vllm=true needs a CUDA GPU (vLLM generates on the GPU); on CPU leave it false: HF generate is used")
    if stage_cfg.use_vllm and importlib.util.find_spec("vllm") is None:
        raise StageError(f"{stage}.use_vllm=true needs vLLM, which is not installed: pip install 'alignment[vllm]' (or leave it false)")


def _check_self_instruct(cfg: AlignmentConfig) -> None:
    """Self-Instruct: a policy that can write, counts and bounds that can work, one process."""
    si: SelfInstructConfig = cfg.self_instruct
    index = cfg.stages.index("self_instruct")
    if not (si.init_from or cfg.model.name_or_path or set(cfg.stages[:index]) & set(POLICY_STAGES)):
        raise StageError(f"recipe {cfg.recipe!r}: self_instruct needs a policy that can write instructions, and the embedded model "
                         f"is untrained: set self_instruct.init_from=<an SFT stage dir or HF dir> (python -m alignment.run +recipe=sft "
                         f"writes one to outputs/sft/sft), or start from a real model (model=smollm2 ...)")
    counts = {"n_instructions": si.n_instructions, "max_rounds": si.max_rounds, "instructions_per_round": si.instructions_per_round,
              "seeds_per_prompt": si.seeds_per_prompt, "max_new_tokens": si.max_new_tokens,
              "answer_max_new_tokens": si.answer_max_new_tokens, "min_words": si.min_words, "max_seed_tokens": si.max_seed_tokens}
    for key, value in counts.items():
        if value < 1:
            raise StageError(f"self_instruct.{key}={value} must be >= 1")
    if si.generated_per_prompt < 0 or si.n_seeds < 0:
        raise StageError(f"self_instruct.generated_per_prompt={si.generated_per_prompt} and n_seeds={si.n_seeds} must be >= 0 (n_seeds 0: all)")
    if si.n_seeds and si.n_seeds < si.seeds_per_prompt:
        raise StageError(f"self_instruct.n_seeds={si.n_seeds} is smaller than seeds_per_prompt={si.seeds_per_prompt}: each prompt "
                         f"shows seeds_per_prompt distinct seeds from the pool")
    if si.max_words < si.min_words:
        raise StageError(f"self_instruct.max_words={si.max_words} is below min_words={si.min_words}: every instruction would be rejected")
    if not 0 < si.rouge_threshold <= 1:
        raise StageError(f"self_instruct.rouge_threshold={si.rouge_threshold} must be in (0, 1]: an instruction with ROUGE-L at or "
                         f"above it to the pool is rejected (0.7 in the paper; 1 rejects only exact token matches)")
    if si.temperature < 0 or si.answer_temperature < 0:
        raise StageError(f"self_instruct.temperature={si.temperature} and answer_temperature={si.answer_temperature} must be >= 0 (0: greedy)")
    if planned_world_size(cfg) > 1:
        raise StageError("self_instruct runs in one process (it writes one data file): run its recipe with launcher.nproc_per_node=1 "
                         "and launcher.nnodes=1")
