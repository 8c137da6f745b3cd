"""Training and held-out data for each stage, from the built-in suite or from a dataset file.

Suite data comes with exact verifiers (gold accuracy). File data is read by
alignment/data/sources.py, converted once by alignment/data/formats.py (chat messages,
prompt/completion, Alpaca, ShareGPT, TRL explicit/implicit preference, HH-RLHF, UltraFeedback,
ShareGPT preference, or a column mapping) to TRL's conversational form, and checked with the
stage's tokenizer by alignment/data/checks.py before any model loads:

- SFT: ``{"messages": [...]}``;
- preference (reward model, DPO): ``{"prompt": [...], "chosen": [...], "rejected": [...]}``;
- prompts (PPO): ``{"prompt": [...]}``.

A row that fits no shape stops the run with the file, the row number and the fix.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from datasets import Dataset

from alignment.config import DataConfig, StageConfig, SuiteConfig
from alignment.data.checks import check_preference_rows, check_prompt_rows, check_sft_rows
from alignment.data.plain_text import SUITE_SOURCE
from alignment.data.sources import MIXTURE, converted_rows, file_fingerprint, fingerprint_rows, stage_data, stage_source
from alignment.data.suite import Example, Suite, build_suite, chatter, suite_fingerprint
from alignment.errors import StageError

Messages = list[dict[str, str]]


def user_turn(prompt: str) -> Messages:
    return [{"role": "user", "content": prompt}]


def example_split(seen: Sequence[Example], unseen: Sequence[Example]) -> list[Example]:
    """Interleave seen and unseen held-out examples so a prefix (n_prompts) keeps both."""
    out: list[Example] = []
    for i in range(max(len(seen), len(unseen))):
        out.extend(x[i] for x in (seen, unseen) if i < len(x))
    return out


@dataclass
class HeldOut:
    """What a stage is evaluated on: verified suite examples, or plain prompts from a file."""

    examples: list[Example] = field(default_factory=list)
    unseen: frozenset[Example] = frozenset()
    prompts: list[list[dict[str, str]]] = field(default_factory=list)


@dataclass
class StageData:
    train: Dataset
    held_out: HeldOut
    fingerprint: str
    counts: dict[str, Any]
    eval_pairs: Optional[Dataset] = None  # DPO: held-out preference pairs


_SUITES: dict[tuple, Suite] = {}


def load_suite(cfg: SuiteConfig) -> Suite:
    """Build (once per process) the suite the config describes."""
    key = (cfg.seed, cfg.n_train, cfg.n_eval, tuple(cfg.families or ()))
    if key not in _SUITES:
        _SUITES[key] = build_suite(seed=cfg.seed, n_train=cfg.n_train, n_eval=cfg.n_eval, families=cfg.families or None)
    return _SUITES[key]


def suite_demonstrations(suite: Suite, *, chatter_rate: float, seed: int) -> tuple[list[dict[str, Any]], int]:
    """SFT rows for the suite's training prompts; a share ``chatter_rate`` wraps the answer in
    filler (drawn with its own RNG, so which rows are chatty is reproducible)."""
    rng = random.Random(f"demo-chatter:{seed}")
    rows, n_chatty = [], 0
    for example in suite.train:
        answer = example.answer
        if rng.random() < chatter_rate:
            answer, n_chatty = chatter(example, rng), n_chatty + 1
        rows.append({"messages": user_turn(example.prompt) + [{"role": "assistant", "content": answer}]})
    return rows, n_chatty


def suite_held_out(suite: Suite) -> HeldOut:
    return HeldOut(examples=example_split(suite.eval_seen, suite.eval_unseen), unseen=frozenset(suite.eval_unseen))


def source_fingerprint(cfg: DataConfig, stage_cfg: StageConfig) -> str:
    """A cheap fingerprint of the data a stage reads, known before anything is loaded."""
    data_cfg = stage_data(cfg, stage_cfg)
    path = stage_source(data_cfg, stage_cfg.data_path)
    if path is None:
        return "suite:" + suite_fingerprint(load_suite(cfg.suite))
    if path == MIXTURE:
        def member(s):
            return f"suite:{suite_fingerprint(load_suite(cfg.suite))}" if s.path == SUITE_SOURCE else file_fingerprint(s.path)
        return "mixture:" + "|".join(f"{member(s)}*{s.weight}" for s in data_cfg.sources)
    return file_fingerprint(path)


def sft_data(cfg: DataConfig, *, data_path: Optional[str], seed: int, tokenizer=None, max_seq_tokens: int = 0) -> StageData:
    """SFT rows; file rows are converted and, given a tokenizer, checked (alignment/data/checks.py)."""
    path = stage_source(cfg, data_path)
    if path is None:
        suite = load_suite(cfg.suite)
        rows, n_chatty = suite_demonstrations(suite, chatter_rate=cfg.suite.demo_chatter_rate, seed=cfg.suite.seed)
        return StageData(
            train=Dataset.from_list(rows),
            held_out=suite_held_out(suite),
            fingerprint=f"suite:{suite_fingerprint(suite)}:chatter={cfg.suite.demo_chatter_rate}",
            counts={"source": "suite", "rows": len(rows), "chatty_demonstrations": n_chatty},
        )
    members = {s.path for s in cfg.sources} if path == MIXTURE else set()
    suite = load_suite(cfg.suite) if SUITE_SOURCE in members else None
    suite_rows = (lambda: suite_demonstrations(suite, chatter_rate=cfg.suite.demo_chatter_rate, seed=cfg.suite.seed)[0]) if suite else None
    rows, train, held, counts = _checked_file_rows(cfg, path=path, kind="sft", seed=seed, tokenizer=tokenizer, max_seq_tokens=max_seq_tokens,
                                                   suite_rows=suite_rows)
    if suite is not None:  # the suite's own held-out split (verified), none of the mixture's rows
        train, held_out = rows, suite_held_out(suite)
        counts.update(train_rows=len(train), eval_rows=0)
    else:
        held_out = HeldOut(prompts=[r["messages"][:-1] for r in held if r.get("messages")])
    if any(r.get("text") for r in train):  # plain text beside conversations: every row gets both columns
        counts["plain_text_rows"] = sum(1 for r in train if r.get("text"))
        train = [{"messages": r.get("messages"), "text": r.get("text")} for r in train]
    return StageData(
        train=Dataset.from_list(train),
        held_out=held_out,
        fingerprint=f"file:{fingerprint_rows(rows)}",
        counts=counts,
    )


def preference_file_data(cfg: DataConfig, *, path: str, seed: int, tokenizer=None, max_seq_tokens: int = 0) -> StageData:
    """Preference pairs from a file; given a tokenizer, degenerate pairs are dropped and counted."""
    rows, train, held, counts = _checked_file_rows(cfg, path=path, kind="preference", seed=seed, tokenizer=tokenizer,
                                                   max_seq_tokens=max_seq_tokens)
    return StageData(
        train=Dataset.from_list(train),
        held_out=HeldOut(prompts=[r["prompt"] for r in held]),
        fingerprint=f"file:{fingerprint_rows(rows)}",
        counts=counts,
        eval_pairs=Dataset.from_list(held) if held else None,
    )


def _checked_file_rows(cfg: DataConfig, *, path: str, kind: str, seed: int, tokenizer, max_seq_tokens: int, suite_rows=None):
    """Converted rows, checked when a tokenizer is given, split into train and held-out."""
    rows, formats = converted_rows(cfg, path=path, kind=kind, seed=seed, suite_rows=suite_rows)
    if tokenizer is not None:
        check = check_sft_rows if kind == "sft" else check_preference_rows
        rows, report = check(rows, tokenizer=tokenizer, max_seq_tokens=max_seq_tokens, over_length=cfg.over_length,
                             max_drop_share=cfg.max_drop_share, source=path)
        formats["checks"] = report.to_dict()
    train, held = _split(rows, cfg=cfg, seed=seed)
    unit = "rows" if kind == "sft" else "pairs"
    counts = {"source": path, "rows_read": formats.pop("rows"), f"train_{unit}": len(train), f"eval_{unit}": len(held), **formats}
    return rows, train, held, counts


def _split(rows: list[dict], *, cfg: DataConfig, seed: int) -> tuple[list[dict], list[dict]]:
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_eval = min(cfg.max_eval_rows, int(round(len(rows) * cfg.eval_fraction)))
    held = sorted(order[:n_eval])
    keep = sorted(order[n_eval:])
    return [rows[i] for i in keep], [rows[i] for i in held]


def prompt_data(cfg: DataConfig, stage_cfg: StageConfig, *, stage: str, n_prompts: int, max_prompt_tokens: int, min_prompts: int,
                seed: int, tokenizer) -> tuple[list[Messages], list[Optional[Example]], StageData]:
    """Prompts to sample from for an RL stage (PPO, GRPO, RLOO): the suite's training prompts, or a
    prompt file checked like every file; each one's suite example (None for a file: no
    verifier), and the held-out set. Fewer than ``min_prompts`` prompts is an error."""
    data_cfg = stage_data(cfg, stage_cfg)
    path = stage_source(data_cfg, stage_cfg.data_path)
    if path is None:
        suite = load_suite(cfg.suite)
        examples: list[Optional[Example]] = list(suite.train[:n_prompts])
        messages = [user_turn(e.prompt) for e in examples]
        held = suite_held_out(suite)
        counts: dict[str, Any] = {"source": "suite", "prompts": len(examples)}
    else:
        rows, formats = converted_rows(data_cfg, path=path, kind="prompt", seed=seed)
        rows, report = check_prompt_rows(rows, tokenizer=tokenizer, max_prompt_tokens=max_prompt_tokens,
                                         over_length=cfg.over_length, source=path)
        messages = [r["prompt"] for r in rows][:n_prompts]
        examples = [None] * len(messages)
        held = HeldOut(prompts=messages[: cfg.max_eval_rows])
        counts = {"source": path, "prompts": len(messages), "rows_read": formats.pop("rows"), **formats, "checks": report.to_dict()}
    if len(messages) < min_prompts:
        raise StageError(f"{stage}: {len(messages)} prompts, fewer than the {min_prompts} one step needs; add prompts or lower {stage}'s batch size")
    data = StageData(train=None, held_out=held, fingerprint=f"prompts:{fingerprint_rows(messages)}", counts=counts)  # type: ignore[arg-type]
    return messages, examples, data
