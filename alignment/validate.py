"""Check a recipe's datasets without training: convert every row, run the checks, print a report.

    python -m alignment.validate +recipe=sft_then_dpo data=/data/sft.jsonl dpo.data_path=/data/pairs.json
    python -m alignment.validate --preflight +recipe=grpo grpo.init_from=outputs/sft_then_grpo/sft

``--preflight`` also runs the reward pre-flight of every GRPO/RLOO stage (alignment/rewards/
preflight.py) on the policy it names (``<stage>.init_from``, else the chain's starting model):
samples are drawn and every reward is scored, nothing is trained.

Takes the same overrides as ``alignment.run``. For each stage that reads a file it prints rows
read, kept, dropped by reason, truncated and token-length percentiles, using the tokenizer the
chain starts from (``model.tokenizer_name_or_path``, ``model.name_or_path`` or the embedded one),
set up exactly as the stages set it up. Exits 1 when the data would stop the run, 2 when the
config is invalid, 0 otherwise.
"""

from __future__ import annotations

import sys
from pathlib import Path

from alignment.config import OnlineRLConfig, PPOConfig, SelfInstructConfig
from alignment.data.sources import stage_data, stage_source
from alignment.data.stage_data import preference_file_data, prompt_data, sft_data
from alignment.errors import ConfigError, DataError
from alignment.modeling.loading import load_tokenizer
from alignment.rewards.preflight import PreflightFailed, describe
from alignment.run import compose_config
from alignment.stages import online_rl
from alignment.stages.common import StageContext, StartPoint, resolve_start, stage_tokenizer


def validate_stage(cfg, stage: str, tokenizer) -> str:
    stage_cfg = getattr(cfg, stage)
    data_cfg = stage_data(cfg.data, stage_cfg)
    path = stage_source(data_cfg, stage_cfg.data_path)
    if path is None:
        return f"[{stage}] built-in task suite: generated and exact, nothing to check"
    if isinstance(stage_cfg, PPOConfig):
        _, _, data = prompt_data(cfg.data, stage_cfg, stage=stage, n_prompts=stage_cfg.n_prompts, max_prompt_tokens=stage_cfg.max_prompt_tokens,
                                 min_prompts=stage_cfg.rollout_batch_size, seed=cfg.seed, tokenizer=tokenizer)
    elif isinstance(stage_cfg, OnlineRLConfig):
        _, _, data = prompt_data(cfg.data, stage_cfg, stage=stage, n_prompts=stage_cfg.n_prompts,
                                 max_prompt_tokens=online_rl.max_prompt_tokens(stage_cfg), min_prompts=1, seed=cfg.seed, tokenizer=tokenizer)
    elif isinstance(stage_cfg, SelfInstructConfig):  # seed instructions, read as the stage reads them
        _, _, data = prompt_data(cfg.data, stage_cfg, stage=stage, n_prompts=sys.maxsize, max_prompt_tokens=stage_cfg.max_seed_tokens,
                                 min_prompts=stage_cfg.seeds_per_prompt, seed=cfg.seed, tokenizer=tokenizer)
    elif stage == "sft":
        data = sft_data(data_cfg, data_path=path, seed=cfg.seed, tokenizer=tokenizer, max_seq_tokens=stage_cfg.max_seq_tokens)
    else:
        data = preference_file_data(data_cfg, path=path, seed=cfg.seed, tokenizer=tokenizer, max_seq_tokens=stage_cfg.max_seq_tokens)
    checks = data.counts.get("checks", {})
    formats = ", ".join(f"{k[len('format:'):]}={v}" for k, v in data.counts.items() if k.startswith("format:"))
    lines = [f"[{stage}] {path} ({formats})", f"  rows read {checks.get('rows_read')}, kept {checks.get('rows_kept')}, "
             f"truncated {checks.get('truncated')}, dropped {checks.get('dropped') or 'none'}",
             f"  tokens per row: {checks.get('token_lengths')}"]
    return "\n".join(lines)


def preflight_stage(cfg, stage: str) -> str:
    """The reward pre-flight of an online-RL stage, on ``<stage>.init_from`` or the chain's starting model."""
    rl = getattr(cfg, stage)
    run_dir = Path(cfg.output_dir).resolve() / cfg.run_name
    if rl.init_from:
        start = resolve_start(rl.init_from, run_dir=run_dir)
    elif cfg.model.name_or_path:
        start = resolve_start(cfg.model.name_or_path, run_dir=run_dir, gguf_file=cfg.model.gguf_file)
    else:
        start = StartPoint(None, None)
    ctx = StageContext(cfg, run_dir, run_dir / stage, stage, start, is_first=True)
    prepared = online_rl.prepare(rl, ctx, stage_tokenizer(ctx))
    lines = [f"[{stage}] reward pre-flight on {start.label}: passed"]
    lines += [f"  {name}: samples {describe(s)}" for name, s in prepared.data.counts["preflight"].items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    preflight = "--preflight" in argv
    argv = [a for a in argv if a != "--preflight"]
    try:
        cfg = compose_config(argv)
        model = cfg.model
        ref = model.tokenizer_name_or_path or model.name_or_path
        tokenizer = load_tokenizer(ref, model, key="model.tokenizer_name_or_path" if model.tokenizer_name_or_path else "model.name_or_path")
    except ConfigError as err:
        print(f"alignment.validate: config error: {err}", file=sys.stderr)
        return 2
    failed = False
    for stage in cfg.stages:
        try:
            print(validate_stage(cfg, stage, tokenizer), flush=True)
        except (DataError, ConfigError) as err:
            print(f"[{stage}] FAILS: {err}", flush=True)
            failed = True
            continue
        if preflight and isinstance(getattr(cfg, stage), OnlineRLConfig):
            try:
                print(preflight_stage(cfg, stage), flush=True)
            except (PreflightFailed, ConfigError) as err:
                print(f"[{stage}] FAILS: {err}", flush=True)
                failed = True
    print(("data or rewards would stop the run" if failed else "data and rewards ok") if preflight else
          ("data would stop the run" if failed else "data ok"), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
