"""Check a recipe's datasets without training: convert every row, run the checks, print a report.

    python -m alignment.validate +recipe=sft_then_dpo data=/data/sft.jsonl dpo.data_path=/data/pairs.json

Takes the same overrides as ``alignment.run``. For each stage that reads a file it prints rows
read, kept, dropped by reason, truncated and token-length percentiles, using the tokenizer the
chain starts from (``model.tokenizer_name_or_path``, ``model.name_or_path`` or the embedded one).
Exits 1 when the data would stop the run, 2 when the config is invalid, 0 otherwise.
"""

from __future__ import annotations

import sys

from alignment.config import ConfigError
from alignment.data import DataError, preference_file_data, prompt_file_rows, sft_data, stage_data, stage_source
from alignment.embedded import build_tokenizer
from alignment.run import compose_config
from alignment.stage import StageError


def _tokenizer(cfg):
    ref = cfg.model.tokenizer_name_or_path or cfg.model.name_or_path
    if ref is None:
        return build_tokenizer()
    from transformers import AutoTokenizer

    from alignment import embedded

    tokenizer = AutoTokenizer.from_pretrained(ref)
    tokenizer.chat_template = cfg.model.chat_template or tokenizer.chat_template or embedded.CHAT_TEMPLATE
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def validate_stage(cfg, stage: str, tokenizer) -> str:
    stage_cfg = getattr(cfg, stage)
    data_cfg = stage_data(cfg.data, stage_cfg)
    path = stage_source(data_cfg, stage_cfg.data_path)
    if path is None:
        return f"[{stage}] built-in task suite: generated and exact, nothing to check"
    common = {"seed": cfg.seed, "tokenizer": tokenizer, "max_seq_tokens": stage_cfg.max_seq_tokens}
    if stage == "sft":
        data = sft_data(data_cfg, data_path=path, **common)
    elif stage == "ppo":
        prompts = prompt_file_rows(data_cfg, path=path)
        return f"[{stage}] {path}: {len(prompts)} prompts"
    else:
        data = preference_file_data(data_cfg, path=path, **common)
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
        tokenizer = _tokenizer(cfg)
    except (ConfigError, StageError) as err:
        print(f"alignment.validate: config error: {err}", file=sys.stderr)
        return 2
    failed = False
    for stage in cfg.stages:
        try:
            print(validate_stage(cfg, stage, tokenizer), flush=True)
        except DataError as err:
            print(f"[{stage}] FAILS: {err}", flush=True)
            failed = True
    print("data would stop the run" if failed else "data ok", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
