"""Check a recipe's datasets without training: convert every row, run the checks, print a report.

    python -m alignment.validate +recipe=sft_then_dpo data=/data/sft.jsonl dpo.data_path=/data/pairs.json

Takes the same overrides as ``alignment.run``. For each stage that reads a file it prints rows
read, kept, dropped by reason, truncated and token-length percentiles, using the tokenizer the
chain starts from (``model.tokenizer_name_or_path``, ``model.name_or_path`` or the embedded one),
set up exactly as the stages set it up. Exits 1 when the data would stop the run, 2 when the
config is invalid, 0 otherwise.
"""

from __future__ import annotations

import sys

from alignment.config import PPOConfig
from alignment.data.sources import stage_data, stage_source
from alignment.data.stage_data import preference_file_data, prompt_data, sft_data
from alignment.errors import ConfigError, DataError
from alignment.modeling.loading import load_tokenizer
from alignment.run import compose_config


def validate_stage(cfg, stage: str, tokenizer) -> str:
    stage_cfg = getattr(cfg, stage)
    data_cfg = stage_data(cfg.data, stage_cfg)
    path = stage_source(data_cfg, stage_cfg.data_path)
    if path is None:
        return f"[{stage}] built-in task suite: generated and exact, nothing to check"
    if isinstance(stage_cfg, PPOConfig):
        _, _, data = prompt_data(cfg.data, stage_cfg, seed=cfg.seed, tokenizer=tokenizer)
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


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
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
    print("data would stop the run" if failed else "data ok", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
