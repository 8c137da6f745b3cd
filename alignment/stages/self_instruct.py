"""Self-Instruct (Wang et al. 2022; how Alpaca's data was made): the policy writes its own SFT data.

Each round, for ``instructions_per_round`` prompts:

1. draw ``seeds_per_prompt`` instructions from the seed pool and, once some were kept,
   ``generated_per_prompt`` from the kept ones; shuffle them into a numbered list, "Come up with a
   series of tasks: Task 1: ... Task 8: ...", ending with the next number ("Task 9:");
2. the policy (the stage's start: ``self_instruct.init_from``, the chain's latest policy, or
   ``model.*``) continues it, as a chat user turn through its chat template, batched on the
   stage's device at ``temperature``; the first line of its reply is the candidate instruction;
3. each candidate meets the filters of alignment/data/instruction_filters.py (length, keywords, a
   first character that is no letter, exact duplicates, ROUGE-L to the pool) and is rejected for
   the first that applies; the survivors of the round join the pool at once, so later candidates
   of the round must differ from them too;
4. the survivors are answered by the same policy (``answer_temperature``, 0 greedy). An answer cut at
   ``answer_max_new_tokens`` or empty drops its instruction; so does a wrong answer to an instruction
   that states a task-suite instance (alignment/data/suite/parse.py), checked by the suite's
   verifier when ``verify_answers``. A dropped instruction leaves the pool again;
5. the kept pairs are appended to ``<stage>/data.jsonl`` as SFT rows, then the round is committed
   (alignment/data/generated.py), so a killed stage resumes at the round it was in, with no row
   duplicated or lost.

Rounds run until ``n_instructions`` are kept (a last round's surplus is counted and dropped) or
``max_rounds`` have run. Every candidate has exactly one outcome, so the record's counts add up:
candidates = kept + the rejections by reason. The stage trains nothing: its checkpoint is its
parent's, recorded by path and hash (nothing copied), and it is no policy stage, so the next stage
starts where it would have without it: a following ``sft`` trains ``model.*`` on the seed data
plus these rows.

    python -m alignment.run +recipe=sft                      # the toy needs an SFT policy to write
    python -m alignment.run +recipe=self_instruct_then_sft self_instruct.init_from=outputs/sft/sft
"""

from __future__ import annotations

import logging
import random
import re
import sys
from typing import Any, Optional

from alignment.config import SelfInstructConfig
from alignment.data.generated import SFT_ROWS, RowJournal, output_record
from alignment.data.instruction_filters import InstructionPool, diversity, text_rejection
from alignment.data.stage_data import Messages, StageData, prompt_data, user_turn
from alignment.data.suite import verify
from alignment.data.suite.parse import parse_instruction
from alignment.modeling.generation import Generation, generate
from alignment.records import StageResult
from alignment.stages.common import (
    SavedCheckpoint, StageContext, load_policy, require_policy_start, seed_everything, stage_result, stage_tokenizer,
)

log = logging.getLogger(__name__)

DATA_FILE = "data.jsonl"
PROMPT_HEADER = "Come up with a series of tasks:"
# Every outcome but "kept", in the order a candidate meets them.
REASONS = ("unfinished", "too_short", "too_long", "keyword", "bad_start", "duplicate", "similar", "answer_unfinished",
           "answer_empty", "wrong_answer", "surplus")
SAMPLES = 12  # kept and rejected instructions shown in the record
_TASK_MARK = re.compile(r"Task\s*\d+\s*[:.)]", re.IGNORECASE)
_LINE_END = re.compile(r"\n|" + _TASK_MARK.pattern, re.IGNORECASE)


def train_self_instruct(cfg: SelfInstructConfig, ctx: StageContext) -> StageResult:
    """Write up to ``cfg.n_instructions`` instruction/answer rows; see the module docstring."""
    seed_everything(ctx)
    require_policy_start(ctx)
    tokenizer = stage_tokenizer(ctx)
    seeds, data = seed_instructions(cfg, ctx, tokenizer)
    policy = load_policy(ctx, tokenizer, trainable=False)
    journal = RowJournal(ctx.stage_dir / DATA_FILE, inputs_key=ctx.inputs_key)
    rows, progress = journal.resume()
    if rows or progress:
        log.info("[%s] resuming after round %d with %d rows", ctx.stage, progress["rounds"], len(rows))
    progress = progress or {"rounds": 0, "candidates": 0, "rejected": {r: 0 for r in REASONS}, "answers_verified": 0,
                            "answers_verified_correct": 0, "rejected_samples": {}}
    pool = InstructionPool(seeds[: cfg.n_seeds or len(seeds)], known=seeds)
    for row in rows:
        pool.add(row["messages"][0]["content"])
    while len(pool.kept) < cfg.n_instructions and progress["rounds"] < cfg.max_rounds:
        batch = write_round(cfg, pool=pool, policy=policy, tokenizer=tokenizer, progress=progress, seed=ctx.cfg.seed)
        rows += batch
        progress["rounds"] += 1
        journal.append(batch, total_rows=len(rows), progress=progress)
        log.info("[%s] round %d: %d of %d candidates kept, %d of %d instructions", ctx.stage, progress["rounds"], len(batch),
                 cfg.instructions_per_round, len(rows), cfg.n_instructions)
    if len(rows) < cfg.n_instructions:
        log.warning("[%s] %d of %d instructions kept after max_rounds=%d rounds", ctx.stage, len(rows), cfg.n_instructions, cfg.max_rounds)
    if not journal.path.exists():  # resumed with no round left to run and the (empty) file removed
        journal.append([], total_rows=0, progress=progress)
    data.counts.update(seed_instructions=len(seeds), seed_pool=len(pool.seeds), rows_written=len(rows), path=str(journal.path))
    saved = SavedCheckpoint(path=ctx.start.path, content_hash=ctx.start.hash)  # the parent, unchanged: nothing is trained or copied
    return stage_result(ctx, cfg, saved=saved, data=data, metrics=round_metrics(rows, pool=pool, progress=progress),
                        outputs={SFT_ROWS: output_record(journal.path, rows=len(rows))})


def seed_instructions(cfg: SelfInstructConfig, ctx: StageContext, tokenizer) -> tuple[list[str], StageData]:
    """Every instruction of the seed data (the suite's training prompts or ``data_path``, read and
    checked as PPO and GRPO read prompts): each prompt's last user turn."""
    messages, _, data = prompt_data(ctx.cfg.data, cfg, stage=ctx.stage, n_prompts=sys.maxsize, max_prompt_tokens=cfg.max_seed_tokens,
                                    min_prompts=cfg.seeds_per_prompt, seed=ctx.cfg.seed, tokenizer=tokenizer)
    return [next(m["content"] for m in reversed(chat) if m["role"] == "user") for chat in messages], data


def writing_prompt(demonstrations: list[str]) -> Messages:
    """The numbered list of tasks, ending with the number the policy should fill in."""
    lines = [f"Task {i}: {' '.join(text.split())}" for i, text in enumerate(demonstrations, start=1)]
    return user_turn(PROMPT_HEADER + "\n\n" + "\n".join(lines) + f"\nTask {len(demonstrations) + 1}:")


def candidate_instruction(reply: Generation) -> tuple[str, bool]:
    """(the instruction a reply writes, whether it is complete): the reply's first line after a
    leading "Task 9:", up to the next task number. A reply cut at max_new_tokens before the line
    ended is incomplete."""
    text = reply.text.lstrip()
    echoed = _TASK_MARK.match(text)
    text = text[echoed.end():].lstrip() if echoed else text
    end = _LINE_END.search(text)
    return (text[: end.start()].strip(), True) if end else (text.strip(), reply.ended)


def write_round(cfg: SelfInstructConfig, *, pool: InstructionPool, policy, tokenizer, progress: dict[str, Any], seed: int) -> list[dict]:
    """One round: write, filter, answer, check. Returns the kept SFT rows; ``progress`` counts every outcome."""
    round_index = progress["rounds"]
    rng = random.Random(f"self_instruct:{seed}:{round_index}")
    prompts = []
    for _ in range(cfg.instructions_per_round):
        shown = rng.sample(pool.seeds, min(cfg.seeds_per_prompt, len(pool.seeds)))
        shown += rng.sample(pool.kept, min(cfg.generated_per_prompt, len(pool.kept)))
        rng.shuffle(shown)
        prompts.append(writing_prompt(shown))
    replies = generate(policy, tokenizer, prompts, num_samples=1, temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens,
                       batch_size=cfg.instructions_per_round, seed=seed * 100_003 + 2 * round_index)
    kept_before, survivors = len(pool.kept), []
    for [reply] in replies:
        progress["candidates"] += 1
        text, complete = candidate_instruction(reply)
        reason = None if complete else "unfinished"
        reason = reason or text_rejection(text, min_words=cfg.min_words, max_words=cfg.max_words)
        detail = ""
        if reason is None:
            reason, score, member = pool.rejection(text, threshold=cfg.rouge_threshold)
            detail = f"ROUGE-L {score:.2f} to {member!r}" if reason == "similar" else ""
        if reason:
            _reject(progress, text or reply.text, reason, detail)
        else:
            pool.add(text)
            survivors.append(text)
    answers = generate(policy, tokenizer, [user_turn(t) for t in survivors], num_samples=1, temperature=cfg.answer_temperature,
                       max_new_tokens=cfg.answer_max_new_tokens, batch_size=cfg.instructions_per_round,
                       seed=seed * 100_003 + 2 * round_index + 1) if survivors else []
    rows = []
    for text, [answer] in zip(survivors, answers):
        reason, detail = answer_rejection(text, answer, verify_answers=cfg.verify_answers, progress=progress)
        if reason is None and kept_before + len(rows) >= cfg.n_instructions:
            reason, detail = "surplus", f"{cfg.n_instructions} instructions were kept already"
        if reason:
            pool.remove(text)
            _reject(progress, text, reason, detail)
        else:
            rows.append({"messages": user_turn(text) + [{"role": "assistant", "content": answer.text.strip()}]})
    return rows


def answer_rejection(instruction: str, answer: Generation, *, verify_answers: bool, progress: dict[str, Any]) -> tuple[Optional[str], str]:
    """Why an answered instruction is dropped (and a detail), or (None, "")."""
    if not answer.ended:
        return "answer_unfinished", f"answer cut at {answer.num_tokens} tokens: {answer.text[:60]!r}"
    if not answer.text.strip():
        return "answer_empty", ""
    example = parse_instruction(instruction) if verify_answers else None
    if example is None:
        return None, ""
    progress["answers_verified"] += 1
    if verify(example, answer.text):
        progress["answers_verified_correct"] += 1
        return None, ""
    return "wrong_answer", f"answered {answer.text.strip()!r}, the {example.family} task's answer is {example.answer!r}"


def _reject(progress: dict[str, Any], text: str, reason: str, detail: str) -> None:
    progress["rejected"][reason] += 1
    samples = progress["rejected_samples"].setdefault(reason, [])
    if len(samples) < 3:
        samples.append({"instruction": text, "reason": reason, "detail": detail})


def round_metrics(rows: list[dict], *, pool: InstructionPool, progress: dict[str, Any]) -> dict[str, Any]:
    """What result.json records: outcomes by reason, diversity against the seed pool's own, samples."""
    kept = [r["messages"][0]["content"] for r in rows]
    families = [e.family if e else "none" for e in map(parse_instruction, kept)]
    seeds = diversity(pool.seeds, seeds=[])
    step = max(1, len(rows) // SAMPLES)
    samples = progress["rejected_samples"]  # up to 3 per reason: the first of each reason, then the second, ...
    rejected = [s for rank in range(3) for reason in REASONS for s in samples.get(reason, [])[rank:rank + 1]]
    return {
        "candidates_generated": progress["candidates"],
        "instructions_kept": len(rows),
        **{f"rejected_{reason}": n for reason, n in progress["rejected"].items()},
        "rounds": progress["rounds"],
        "pool_size": len(pool),
        "answers_verified": progress["answers_verified"],
        "answers_verified_correct": progress["answers_verified_correct"],
        "kept_suite_tasks": sum(f != "none" for f in families),
        "kept_by_family": {f: families.count(f) for f in sorted(set(families))},
        **diversity(kept, seeds=pool.seeds),
        **{f"seed_pool_{k}": v for k, v in seeds.items() if k != "mean_max_rouge_l_to_seeds"},
        "samples_kept": [{"instruction": r["messages"][0]["content"], "answer": r["messages"][1]["content"]} for r in rows[::step][:SAMPLES]],
        "samples_rejected": rejected[:SAMPLES],
    }
