"""On-policy preference pairs on the task suite, labelled by the exact verifier.

For each prompt the policy samples ``samples_per_prompt`` responses; correct ones become
*chosen*, incorrect ones *rejected*. Pairs built this way sit where the policy actually puts its
probability mass, which is what makes DPO help: a quick trial with offline pairs whose rejected
answer was a corrupted copy of the gold answer lowered greedy accuracy (65% -> 51%), because it
pushed down responses the policy never produced. When no sample is correct the gold answer may
stand in as chosen (``gold_when_no_correct``); prompts whose samples are all correct carry no
preference and are skipped. Every outcome is counted.
"""

from __future__ import annotations

import random
from collections import Counter
from typing import Any, Sequence

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from alignment.config import PairsConfig
from alignment.evaluate import user_turn
from alignment.inference import generate
from alignment.suite import Example, verify


def sample_pairs(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    *,
    cfg: PairsConfig,
    max_new_tokens: int,
    batch_size: int,
    seed: int,
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Conversational DPO rows (prompt/chosen/rejected message lists) and how they came about."""
    samples = generate(
        model,
        tokenizer,
        [user_turn(e.prompt) for e in examples],
        num_samples=cfg.samples_per_prompt,
        temperature=cfg.temperature,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        seed=seed,
    )
    rng = random.Random(seed)
    rows: list[dict[str, Any]] = []
    counts: Counter[str] = Counter(prompts=len(examples))
    for example, group in zip(examples, samples):
        texts = list(dict.fromkeys(g.text for g in group))  # distinct, in sampled order
        correct = [t for t in texts if verify(example, t)]
        wrong = [t for t in texts if not verify(example, t)]
        if not wrong:
            counts["skipped_all_correct"] += 1
            continue
        if not correct:
            if not cfg.gold_when_no_correct:
                counts["skipped_none_correct"] += 1
                continue
            correct = [example.answer]
            counts["gold_as_chosen"] += 1
        rng.shuffle(wrong)
        for i, rejected in enumerate(wrong[: cfg.max_pairs_per_prompt]):
            chosen = correct[i % len(correct)]
            rows.append(
                {
                    "prompt": user_turn(example.prompt),
                    "chosen": [{"role": "assistant", "content": chosen}],
                    "rejected": [{"role": "assistant", "content": rejected}],
                }
            )
    counts["pairs"] = len(rows)
    return rows, dict(counts)
