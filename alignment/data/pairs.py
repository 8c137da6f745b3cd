"""On-policy preference pairs on the task suite, labelled by the exact verifier.

For each prompt the policy samples ``samples_per_prompt`` responses; correct ones become
*chosen*, incorrect ones *rejected*. Pairs built this way sit where the policy actually puts its
probability mass, which is what makes DPO help: a quick trial with offline pairs whose rejected
answer was a corrupted copy of the gold answer lowered greedy accuracy (65% -> 51%), because it
pushed down responses the policy never produced. When no sample is correct the gold answer may
stand in as chosen (``gold_when_no_correct``); prompts whose samples are all correct carry no
preference and are skipped. Every outcome is counted. In a chain with a reward model, DPO can
label its pairs with that model instead (``dpo.pair_labeler``), as large pipelines do.
"""

from __future__ import annotations

import logging
import random
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from datasets import Dataset
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from alignment.config import AlignmentConfig, PairsConfig, TrainConfig
from alignment.data.sources import fingerprint_rows, stage_data, stage_source
from alignment.data.stage_data import StageData, load_suite, preference_file_data, suite_held_out, user_turn
from alignment.data.suite import Example, verify
from alignment.errors import StageError
from alignment.modeling.generation import as_rendered, generate, render_prompts, render_reply, turn_tail
from alignment.scale.distributed import gathered, on_rank_zero


log = logging.getLogger(__name__)

# A reward model as a labeller: (prompt ids, reply ids as rendered) -> one score per reply.
Scorer = Callable[[list[list[int]], list[list[int]]], list[float]]


def preference_data(run_cfg: AlignmentConfig, stage_cfg: TrainConfig, *, tokenizer: PreTrainedTokenizerBase,
                    sampling_policy: Callable[[], PreTrainedModel], scorer: Callable[[], Optional[Scorer]] = lambda: None,
                    journal: Optional[Path] = None) -> StageData:
    """A preference stage's pairs: from its file or mixture when it has one (converted, and checked
    with ``tokenizer`` before any model loads), else sampled on the suite from ``sampling_policy()``
    and labelled by ``scorer()`` (a reward model) or, when that gives None, the verifier. Both
    callables are only called when pairs are sampled. With ``journal`` (a directory) the sampling
    keeps its finished batches there and a rerun after a stop takes them up (``generate``)."""
    data_cfg = stage_data(run_cfg.data, stage_cfg)
    path = stage_source(data_cfg, stage_cfg.data_path)
    if path is not None:
        return preference_file_data(data_cfg, path=path, seed=run_cfg.seed, tokenizer=tokenizer, max_seq_tokens=stage_cfg.max_seq_tokens)
    return suite_preference_data(sampling_policy(), tokenizer, pairs=stage_cfg.pairs, cfg=run_cfg, scorer=scorer(), journal=journal)


def sample_pairs(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    *,
    cfg: PairsConfig,
    seed: int,
    scorer: Optional[Scorer] = None,
    journal: Optional[Path] = None,
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Preference rows and how they came about.

    Each row holds the conversation (prompt/chosen/rejected message lists, for people and for
    the verifier) and the token ids the trainers use (``prompt_ids``/``chosen_ids``/
    ``rejected_ids``): a sampled reply is trained on exactly the tokens that were sampled (plus,
    when it ended, the template's tail after EOS, as the template renders a finished turn), never
    on a decode-and-encode of its text. Labels come from the verifier, or from ``scorer`` (a
    reward model): then the best-scored sample is chosen and lower-scored ones are rejected, and
    the counts record how often that label agrees with the verifier (the gap between proxy and gold).
    """
    prompts = [user_turn(e.prompt) for e in examples]
    started = time.monotonic()
    log.info("sampling pairs: %d prompts x %d replies, up to %d new tokens", len(prompts), cfg.samples_per_prompt, cfg.max_new_tokens)
    samples = generate(model, tokenizer, prompts, num_samples=cfg.samples_per_prompt, temperature=cfg.temperature,
                       max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size, seed=seed, journal=journal)
    tail = turn_tail(tokenizer)
    prompt_ids = render_prompts(tokenizer, prompts)
    groups = []  # per prompt: distinct replies by text, in sampled order, each with its rendered ids
    for group in samples:
        distinct: dict[str, list[int]] = {}
        for generation in group:
            distinct.setdefault(generation.text, as_rendered(generation, tail))
        groups.append(distinct)
    if scorer is not None:
        flat = [(ids, reply) for ids, replies in zip(prompt_ids, groups) for reply in replies.values()]
        flat_scores = iter(scorer([p for p, _ in flat], [r for _, r in flat]))
        scores = [[next(flat_scores) for _ in replies] for replies in groups]
    else:
        scores = [[float(verify(e, text)) for text in replies] for e, replies in zip(examples, groups)]
    rng = random.Random(seed)
    rows: list[dict[str, Any]] = []
    counts: Counter[str] = Counter(prompts=len(examples))
    for example, prompt, ids, replies, score in zip(examples, prompts, prompt_ids, groups, scores):
        texts = list(replies)
        best = max(score)
        chosen = [t for t, s in zip(texts, score) if s == best]
        rejected = sorted((s, t) for t, s in zip(texts, score) if s < best)
        if scorer is None and best == 0.0:  # no sample is correct
            if not cfg.gold_when_no_correct:
                counts["skipped_none_correct"] += 1
                continue
            chosen, rejected = [example.answer], [(0.0, t) for t in texts]
            replies = {**replies, example.answer: render_reply(tokenizer, prompt, example.answer)[1]}
            counts["gold_as_chosen"] += 1
        if not rejected:
            counts["skipped_no_preference"] += 1
            continue
        worst_first = [t for _, t in rejected] if scorer is not None else rng.sample([t for _, t in rejected], len(rejected))
        for i, bad in enumerate(worst_first[: cfg.max_pairs_per_prompt]):
            good = chosen[i % len(chosen)]
            if scorer is not None:
                counts["agrees_with_verifier"] += int(verify(example, good) and not verify(example, bad))
            rows.append({"prompt": prompt, "chosen": [{"role": "assistant", "content": good}],
                         "rejected": [{"role": "assistant", "content": bad}],
                         "prompt_ids": ids, "chosen_ids": replies[good], "rejected_ids": replies[bad]})
    counts["pairs"] = len(rows)
    log.info("sampled %d pairs in %.1f s (%s)", len(rows), time.monotonic() - started,
             ", ".join(f"{k} {v}" for k, v in counts.items() if k != "pairs"))
    return rows, dict(counts)


def suite_preference_data(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, *, pairs: PairsConfig, cfg: AlignmentConfig, scorer: Optional[Scorer] = None,
    journal: Optional[Path] = None,
) -> StageData:
    """Train pairs sampled from ``model`` on the suite's training prompts (labelled by the
    verifier or ``scorer``) and held-out pairs on the eval prompts, always verifier-labelled so
    metrics measure against gold."""
    suite = load_suite(cfg.data.suite)
    held = suite_held_out(suite)
    common = {"cfg": pairs}
    # The held-out pairs cover the prompts evaluation scores (eval.n_prompts), not every held-out
    # prompt: on a real model sampling all of them cost more than the stage's training.
    held_prompts = held.examples[: cfg.eval.n_prompts] if cfg.eval.n_prompts else held.examples
    # Rank 0 samples, every rank receives: ranks never rely on sampling alike (on_rank_zero). A
    # policy created partitioned under ZeRO-3 is whole on every rank meanwhile (gathered).
    with gathered(model):
        train_rows, train_counts = on_rank_zero(lambda: sample_pairs(
            model, tokenizer, suite.train[: pairs.n_prompts], seed=cfg.seed, scorer=scorer, journal=journal / "train" if journal else None,
            **common))
        eval_rows, eval_counts = on_rank_zero(lambda: sample_pairs(model, tokenizer, held_prompts, seed=cfg.seed + 1,
                                                                   journal=journal / "eval" if journal else None, **common))
    if not train_rows:
        raise StageError("the policy's samples gave no preference pair (every sample equal?); raise <stage>.pairs.n_prompts")
    return StageData(
        train=Dataset.from_list(train_rows),
        held_out=held,
        fingerprint=f"pairs:{fingerprint_rows(train_rows)}",
        counts={"source": "suite:on_policy", "labels": "reward_model" if scorer else "verifier", "train": train_counts, "eval": eval_counts},
        eval_pairs=Dataset.from_list(eval_rows) if eval_rows else None,
    )
