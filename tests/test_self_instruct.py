"""Self-Instruct: ROUGE-L on hand-worked numbers, each filter on hand-made candidates, the suite
parser, the row journal's resume, config mistakes; then the stage in a recipe (the counts add up,
SFT trains on seed plus generated rows) and a stage killed with SIGKILL that resumes row for row.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from alignment.data.generated import RowJournal, read_rows
from alignment.data.instruction_filters import KEYWORDS, InstructionPool, diversity, normalise, text_rejection
from alignment.data.rouge import lcs_length, rouge_l, rouge_tokens
from alignment.data.suite import build_suite, get_family
from alignment.data.suite.parse import parse_instruction
from alignment.errors import StageError
from alignment.modeling.generation import Generation
from alignment.records import read_result
from alignment.run import compose_config
from alignment.stages.self_instruct import REASONS, answer_rejection, candidate_instruction, writing_prompt
from conftest import TINY


# ---- ROUGE-L -------------------------------------------------------------------------------

def test_rouge_l_identical_is_one_and_disjoint_is_zero():
    assert rouge_l("Sort the digits: 3 1 2", "sort THE digits 3, 1, 2.") == 1.0  # case and punctuation are separators
    assert rouge_l("Reverse: abc", "Add: 3 5") == 0.0
    assert rouge_l("", "Add: 3 5") == 0.0 and rouge_l("!!", "?") == 0.0  # no tokens: 0, as rouge_score


def test_rouge_l_partial_overlap_by_hand():
    """[add, up, 3, and, 5] against [add, 3, 5]: LCS [add, 3, 5] = 3, P = 3/5, R = 3/3,
    F = 2 * 0.6 * 1 / (0.6 + 1) = 0.75; symmetric."""
    assert rouge_tokens("Add up: 3 and 5") == ["add", "up", "3", "and", "5"]
    assert rouge_l("Add up: 3 and 5", "Add: 3 5") == pytest.approx(0.75)
    assert rouge_l("Add: 3 5", "Add up: 3 and 5") == pytest.approx(0.75)


def test_rouge_l_counts_order():
    """[reverse, abc] against [abc, reverse]: the LCS keeps order, so it is 1 token long; P = R =
    1/2, F = 0.5. [a, b, c, d] against [b, d, a, c]: LCS 2 (b, d or b, c or a, c), F = 0.5."""
    assert rouge_l("Reverse: abc", "abc reverse") == pytest.approx(0.5)
    assert lcs_length(list("abcd"), list("bdac")) == 2
    assert rouge_l("a b c d", "b d a c") == pytest.approx(0.5)


# ---- the filters ---------------------------------------------------------------------------

@pytest.mark.parametrize("text", ["Draw a cat", "Plot these numbers", "Describe the IMAGE", "Please go  to the shop",
                                  "Summarise the files", "Make a flowchart of it", "Compose music for a film"])
def test_keyword_filter_rejects_the_papers_words(text):
    assert text_rejection(text, min_words=1, max_words=150) == "keyword"


@pytest.mark.parametrize("text", ["Open the drawer", "Mapping: x to y", "A profile of Ada", "Where did it go today"])
def test_keyword_filter_matches_whole_words_only(text):
    assert text_rejection(text, min_words=1, max_words=150) is None


def test_keyword_list_is_the_papers():
    assert len(KEYWORDS) == 18 and "go to" in KEYWORDS and "flowchart" in KEYWORDS


@pytest.mark.parametrize("text, reason", [
    ("Add", "too_short"), ("Add these two", None), ("word " * 6, "too_long"),
    ("1. Sort these", "bad_start"), ('"Quoted" task here', "bad_start"), ("¿Qué hora es?", "bad_start"), ("Éte there now", "bad_start"),
    ("Sort: 3 1 2", None),
])
def test_length_and_first_character_filters(text, reason):
    assert text_rejection(text, min_words=2, max_words=5) == reason


def test_duplicates_are_normalised_and_similar_ones_measured_against_the_pool():
    pool = InstructionPool(["Add: 3 5", "Reverse: abc"], known=["Upper case: xyz"])
    assert normalise("  ADD:  3 5. ") == "add: 3 5"
    assert pool.rejection("add: 3   5.", threshold=0.7)[0] == "duplicate"
    assert pool.rejection("Upper case: xyz", threshold=0.7)[0] == "duplicate"  # known seed data, outside the pool
    reason, score, member = pool.rejection("Add up: 3 5", threshold=0.7)  # [add, up, 3, 5] vs [add, 3, 5]: F = 6/7
    assert (reason, member) == ("similar", "Add: 3 5") and score == pytest.approx(6 / 7)
    assert pool.rejection("Add up: 3 5", threshold=0.9)[0] is None
    pool.add("Count letters: abcdef")
    assert pool.rejection("Count the letters: abcdef", threshold=0.7)[0] == "similar" and len(pool) == 3
    pool.remove("Count letters: abcdef")
    assert pool.rejection("Count the letters: abcdef", threshold=0.7)[0] is None and len(pool) == 2


def test_diversity_by_hand():
    """[add, 3, 5], [add, 4, 5]: 4 distinct of 6 unigrams, 4 of 4 bigrams, one first word; the
    nearest seed of each ("Add: 3 5") has ROUGE-L 1 and 2/3."""
    figures = diversity(["Add: 3 5", "Add: 4 5"], seeds=["Add: 3 5", "Reverse: abc"])
    assert figures["distinct_1"] == pytest.approx(4 / 6) and figures["distinct_2"] == 1.0
    assert figures["distinct_first_words"] == 1
    assert figures["mean_max_rouge_l_to_seeds"] == pytest.approx((1 + 2 / 3) / 2)


def _reply(text: str, ended: bool = True) -> Generation:
    return Generation(text, tuple(range(len(text) + ended)), ended)


def test_the_candidate_is_the_first_line_without_an_echoed_task_number():
    assert candidate_instruction(_reply("Task 9: Sort: 3 1 2\nTask 10: Add: 1 2", ended=False)) == ("Sort: 3 1 2", True)
    assert candidate_instruction(_reply(" Reverse: abc Task 10: x", ended=False)) == ("Reverse: abc", True)
    assert candidate_instruction(_reply("Task 9:\n\nCount letters: abc\nok")) == ("Count letters: abc", True)
    assert candidate_instruction(_reply("Reverse: ab", ended=False)) == ("Reverse: ab", False)  # cut at max_new_tokens
    assert candidate_instruction(_reply("Reverse: ab", ended=True)) == ("Reverse: ab", True)


def test_the_writing_prompt_numbers_the_tasks():
    [turn] = writing_prompt(["Add: 3 5", "Reverse:\nabc"])
    assert turn == {"role": "user", "content": "Come up with a series of tasks:\n\nTask 1: Add: 3 5\nTask 2: Reverse: abc\nTask 3:"}


def test_answers_are_verified_where_the_instruction_is_a_suite_task():
    progress = {"answers_verified": 0, "answers_verified_correct": 0}
    assert answer_rejection("Reverse: abc", _reply("cba."), verify_answers=True, progress=progress) == (None, "")
    reason, detail = answer_rejection("Reverse: abc", _reply("abc"), verify_answers=True, progress=progress)
    assert reason == "wrong_answer" and "'cba'" in detail
    assert progress == {"answers_verified": 2, "answers_verified_correct": 1}
    assert answer_rejection("Reverse: abc", _reply("abc"), verify_answers=False, progress=progress)[0] is None
    assert answer_rejection("Write a haiku", _reply("any words"), verify_answers=True, progress=progress)[0] is None
    assert answer_rejection("Write a haiku", _reply("cut", ended=False), verify_answers=True, progress=progress)[0] == "answer_unfinished"
    assert answer_rejection("Write a haiku", _reply("  "), verify_answers=True, progress=progress)[0] == "answer_empty"


# ---- the suite parser ----------------------------------------------------------------------

def test_every_suite_prompt_parses_back_to_its_example():
    suite = build_suite(seed=0, n_train=140, n_eval=70)
    for example in suite.train + suite.eval_all():
        assert parse_instruction(example.prompt) == example


def test_parser_widens_arguments_where_the_rule_holds_and_refuses_the_rest():
    assert parse_instruction("add: 120 7").answer == "127"  # phrasing words in any case, larger numbers
    assert parse_instruction("Sort: 9 2 2 1").answer == "1 2 2 9"
    assert parse_instruction("Is the first bigger: 5 5") is None  # compare has no ties
    assert parse_instruction("Reverse: ABC") is None  # words are lowercase, as the family draws them
    assert parse_instruction("Reverse: abc please") is None and parse_instruction("Write a poem") is None
    assert parse_instruction(get_family("repeat").templates[7].format(w="ok")).answer == "ok,ok"


# ---- the row journal -----------------------------------------------------------------------

def test_journal_resume_cuts_an_uncommitted_batch_and_restarts_for_other_inputs(tmp_path):
    path = tmp_path / "data.jsonl"
    journal = RowJournal(path, inputs_key="k1")
    assert journal.resume() == ([], {})
    journal.append([{"n": 1}, {"n": 2}], total_rows=2, progress={"rounds": 1})
    with open(path, "a", encoding="utf-8") as handle:  # killed after writing a batch, before committing it
        handle.write('{"n": 3}\n{"n": 4')
    rows, progress = RowJournal(path, inputs_key="k1").resume()
    assert rows == [{"n": 1}, {"n": 2}] and progress == {"rounds": 1} and read_rows(path) == rows
    journal.append([{"n": 3}], total_rows=3, progress={"rounds": 2})
    assert RowJournal(path, inputs_key="k1").resume() == ([{"n": 1}, {"n": 2}, {"n": 3}], {"rounds": 2})
    assert RowJournal(path, inputs_key="k2").resume() == ([], {}) and not path.exists()


# ---- config --------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, message", [
    ([], "self_instruct needs a policy"),
    (["self_instruct.init_from=/tmp/s", "self_instruct.rouge_threshold=0"], "rouge_threshold"),
    (["self_instruct.init_from=/tmp/s", "self_instruct.n_seeds=3"], "n_seeds=3"),
    (["self_instruct.init_from=/tmp/s", "self_instruct.min_words=5", "self_instruct.max_words=4"], "max_words"),
    (["self_instruct.init_from=/tmp/s", "self_instruct.instructions_per_round=0"], "instructions_per_round"),
    (["self_instruct.init_from=/tmp/s", "launcher.nproc_per_node=2"], "one process"),
])
def test_config_mistakes_stop_before_anything_loads(overrides, message):
    with pytest.raises(StageError, match=message):
        compose_config(["+recipe=self_instruct_then_sft", *overrides])


def test_after_an_sft_stage_the_chains_policy_writes():
    assert compose_config(["+recipe=self_instruct_then_sft", "stages=[sft,self_instruct]"]).stages == ["sft", "self_instruct"]


# ---- the stage -----------------------------------------------------------------------------

# A writer trained a little, and filters loose enough that the 1-layer toy's text gets through.
WRITER = ["sft.max_steps=80"]
SELF_INSTRUCT = ["self_instruct.n_instructions=12", "self_instruct.max_rounds=5", "self_instruct.instructions_per_round=32",
                 "self_instruct.min_words=1", "self_instruct.max_new_tokens=16", "self_instruct.answer_max_new_tokens=16"]


@pytest.fixture
def writer(run_recipe, tmp_path) -> Path:
    run_recipe("sft", *WRITER, output_dir=tmp_path / "writer")
    return tmp_path / "writer" / "sft" / "sft"


@pytest.mark.integration
def test_self_instruct_then_sft_counts_add_up_and_sft_trains_on_seed_plus_generated(run_recipe, writer, tmp_path):
    _, (si, sft) = run_recipe("self_instruct_then_sft", f"self_instruct.init_from={writer}", *SELF_INSTRUCT)
    m = si.metrics
    assert m["candidates_generated"] == m["instructions_kept"] + sum(m[f"rejected_{r}"] for r in REASONS)
    assert m["candidates_generated"] == 32 * m["rounds"] and m["instructions_kept"] >= 1
    assert m["pool_size"] == 175 + m["instructions_kept"]
    rows = read_rows(Path(si.outputs["sft_rows"]["path"]))
    assert len(rows) == m["instructions_kept"] == si.outputs["sft_rows"]["rows"]
    assert all([t["role"] for t in r["messages"]] == ["user", "assistant"] for r in rows)
    # Its checkpoint is its parent's, recorded, not copied.
    parent = read_result(writer)
    assert (si.checkpoint, si.checkpoint_hash, si.parent_stage) == (parent.checkpoint, parent.checkpoint_hash, "sft")
    assert not (tmp_path / "out" / "self_instruct_then_sft" / "self_instruct" / "checkpoint").exists()
    # SFT: the suite's 256 demonstrations plus every generated row; evaluated on the suite's held-out prompts.
    assert sft.data["rows_from_seed"] == 256 and sft.data["rows_generated"] == len(rows)
    assert sft.parent_checkpoint is None and "gold_accuracy_sampled" in sft.metrics
    # The same command again skips both stages (the written file verified).
    run_recipe("self_instruct_then_sft", f"self_instruct.init_from={writer}", *SELF_INSTRUCT)
    pipeline = json.loads((tmp_path / "out" / "self_instruct_then_sft" / "pipeline.json").read_text())
    assert [r["skipped"] for r in pipeline["results"]] == [True, True]
    # Other generated data: the SFT stage's data fingerprint changes, and it reruns.
    _, (si2, sft2) = run_recipe("self_instruct_then_sft", f"self_instruct.init_from={writer}", *SELF_INSTRUCT, "self_instruct.temperature=1.0")
    assert si2.outputs["sft_rows"]["sha256"] != si.outputs["sft_rows"]["sha256"]
    assert sft2.inputs_parts["data"] != sft.inputs_parts["data"] and sft2.inputs_parts["config"] == sft.inputs_parts["config"]


def _command(out: Path, writer: Path) -> list[str]:
    return [sys.executable, "-m", "alignment.run", "+recipe=self_instruct", f"output_dir={out}", *TINY, f"self_instruct.init_from={writer}",
            *SELF_INSTRUCT, "self_instruct.n_instructions=200", "self_instruct.max_rounds=12"]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}


@pytest.mark.integration
def test_a_killed_stage_resumes_without_a_duplicated_or_lost_row(writer, tmp_path):
    plain = subprocess.run(_command(tmp_path / "plain", writer), env=_env(), capture_output=True, text=True)
    assert plain.returncode == 0, plain.stderr[-3000:]
    out = tmp_path / "killed"
    stage_dir = out / "self_instruct" / "self_instruct"
    proc = subprocess.Popen(_command(out, writer), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (stage_dir / "data.jsonl.state.json").exists():
        assert proc.poll() is None, "the run ended before its first round was committed"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    assert read_result(stage_dir) is None
    committed = json.loads((stage_dir / "data.jsonl.state.json").read_text())
    assert committed["progress"]["rounds"] < 12
    with open(stage_dir / "data.jsonl", "a", encoding="utf-8") as handle:  # as if killed between a batch and its commit
        handle.write('{"messages": [{"role": "user", "content": "half a batch"}]}\n')
    resumed = subprocess.run(_command(out, writer), env=_env(), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming after round {committed['progress']['rounds']}" in resumed.stdout + resumed.stderr
    reference = read_rows(tmp_path / "plain" / "self_instruct" / "self_instruct" / "data.jsonl")
    assert read_rows(stage_dir / "data.jsonl") == reference and len(reference) >= 2
    assert read_result(stage_dir).metrics == read_result(tmp_path / "plain" / "self_instruct" / "self_instruct").metrics
