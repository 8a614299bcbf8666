"""RULER's default task list runs without essay or QA files (and says what it left out), and the tasks follow the
official RULER (NVIDIA/RULER: scripts/data/synthetic/constants.py, scripts/synthetic.yaml, the generators and
scripts/eval/synthetic/constants.py)."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest
from typer.testing import CliRunner

from longforge.cli import app
from longforge.config import RULER_NEEDS, RulerSpec
from longforge.errors import LongforgeError
from longforge.eval.prompts import PromptFormat
from longforge.eval.ruler import SYNTHETIC, TASKS, Resources, build_task, load_squad, make_sample
from longforge.eval.ruler import templates as T
from longforge.eval.ruler.run import left_out_line
from longforge.recipe import parse_recipe
from longforge.runner import preflight

pytestmark = pytest.mark.usefixtures("one_thread")

SELF_CONTAINED = ["niah_single_1", "niah_multikey_2", "niah_multikey_3", "vt", "cwe", "fwe"]
FMT = PromptFormat()


def test_the_default_is_every_task_the_given_files_allow() -> None:
    assert RulerSpec().task_list() == SELF_CONTAINED
    assert RulerSpec().left_out() == {"niah_single_2": "essays", "niah_single_3": "essays", "niah_multikey_1": "essays",
                                      "niah_multivalue": "essays", "niah_multiquery": "essays", "qa_1": "squad",
                                      "qa_2": "hotpotqa"}
    assert RulerSpec(essays="e.txt").task_list() == SYNTHETIC and RulerSpec(essays="e.txt").left_out() == {
        "qa_1": "squad", "qa_2": "hotpotqa"}
    assert RulerSpec(squad="s.json").task_list() == [*SELF_CONTAINED, "qa_1"]
    assert RulerSpec(tasks=["niah_single_2"]).left_out() == {}  # a list the user gave is theirs: nothing left out
    assert left_out_line(RulerSpec().left_out()) == (
        "RULER: left out niah_single_2, niah_single_3, niah_multikey_1, niah_multivalue, niah_multiquery, qa_1, qa_2: "
        "they need essays (`eval.ruler.essays`, --essays) / SQuAD (`eval.ruler.squad`, --squad) / HotpotQA "
        "(`eval.ruler.hotpotqa`, --hotpotqa)")
    assert left_out_line({"qa_2": "hotpotqa"}) == "RULER: left out qa_2: it needs HotpotQA (`eval.ruler.hotpotqa`, --hotpotqa)"


def test_the_schema_and_the_tasks_agree_on_which_file_each_task_needs() -> None:
    assert {t: d.needs for t, d in TASKS.items() if d.needs} == {t: f for f, ts in RULER_NEEDS.items() for t in ts}


def test_longforge_eval_runs_the_default_ruler_tasks_and_says_what_it_left_out(model_dir: Path, tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """It used to fail: `error: RULER task(s) niah_single_2, ... need essays`."""
    monkeypatch.setenv("LONGFORGE_QUIET", "0")
    res = CliRunner().invoke(app, ["eval", str(model_dir), "--out", str(tmp_path / "r"), "--tasks", "ruler",
                                   "--ruler-lengths", "400", "--samples", "1", "--target-length", "256", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    said = " ".join(res.output.split())  # the terminal wraps long lines
    assert said.count(left_out_line(RulerSpec().left_out())) == 1
    assert "left out (no file given): niah_single_2, niah_single_3" in said  # and the RULER table says so
    ruler = json.loads((tmp_path / "r" / "ruler.json").read_text())
    assert ruler["tasks"] == SELF_CONTAINED and set(ruler["left_out"]) == set(RulerSpec().left_out())
    assert {s["task"] for s in ruler["samples"]} <= set(SELF_CONTAINED) and ruler["samples"]
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["ruler"]["left_out"] == ruler["left_out"]
    # A task the user names still needs its file: one sentence, before any work.
    res = CliRunner().invoke(app, ["eval", str(model_dir), "--out", str(tmp_path / "s"), "--tasks", "ruler",
                                   "--ruler-tasks", "niah_single_1,niah_single_2", "--ruler-lengths", "400",
                                   "--target-length", "256", "--device", "cpu"])
    assert isinstance(res.exception, LongforgeError) and "RULER task(s) niah_single_2 need essays" in str(res.exception)
    assert not (tmp_path / "s" / "ruler.json").exists()


def test_a_recipe_with_ruler_defaults_passes_its_checks(micro_recipe: dict, tmp_path: Path) -> None:
    micro_recipe["eval"]["ruler"] = {"lengths": [400], "samples": 1}
    assert preflight(parse_recipe(micro_recipe), tmp_path / "run") == 64
    micro_recipe["eval"]["ruler"]["tasks"] = ["qa_1"]
    with pytest.raises(LongforgeError, match="RULER task\\(s\\) qa_1 need squad"):
        preflight(parse_recipe(micro_recipe), tmp_path / "run")


def test_templates_and_answer_prefixes_are_ruler_s() -> None:
    """Word for word scripts/data/synthetic/constants.py (May 2025: the VT prefix says "assigned")."""
    ruler = {
        "niah": ("Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. "
                 "I will quiz you about the {type_needle_v} afterwards.\n{context}\nWhat are all the special magic "
                 "{type_needle_v} for {query} mentioned in the provided text?",
                 " The special magic {type_needle_v} for {query} mentioned in the provided text are"),
        "variable_tracking": ("Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
                              "{context}\nQuestion: Find all variables that are assigned the value {query} in the text above.",
                              " Answer: According to the chain(s) of variable assignment in the text above, {num_v} "
                              "variables are assigned the value {query}, they are: "),
        "common_words_extraction": ("Below is a numbered list of words. In these words, some appear more often than "
                                    "others. Memorize the ones that appear most often.\n{context}\nQuestion: What are the "
                                    "10 most common words in the above list?",
                                    " Answer: The top 10 words that appear most often in the list are:"),
        "freq_words_extraction": ("Read the following coded text and track the frequency of each coded word. Find the "
                                  "three most frequently appeared coded words. {context}\nQuestion: Do not provide any "
                                  "explanation. Please ignore the dots '....'. What are the three most frequently "
                                  "appeared words in the above coded text?",
                                  " Answer: According to the coded text above, the three most frequently appeared words are:"),
        "qa": ("Answer the question based on the given documents. Only give me the answer and do not output any other "
               "words.\n\nThe following are given documents.\n\n{context}\n\nAnswer the question based on the given "
               "documents. Only give me the answer and do not output any other words.\n\nQuestion: {query}", " Answer:"),
    }
    ours = {"niah": (T.NIAH_TEMPLATE, T.NIAH_PREFIX), "variable_tracking": (T.VT_TEMPLATE, T.VT_PREFIX),
            "common_words_extraction": (T.CWE_TEMPLATE, T.CWE_PREFIX), "freq_words_extraction": (T.FWE_TEMPLATE, T.FWE_PREFIX),
            "qa": (T.QA_TEMPLATE, T.QA_PREFIX)}
    assert ours == ruler
    assert T.NIAH_NEEDLE == "One of the special magic {type_needle_v} for {key} is: {value}."


def test_answer_budgets_parameters_and_metrics_are_ruler_s() -> None:
    budgets = {"niah": 128, "vt": 30, "cwe": 120, "fwe": 50, "qa": 32}  # tokens_to_generate
    assert {t: d.max_new_tokens for t, d in TASKS.items()} == {t: budgets[d.family] for t, d in TASKS.items()}
    assert {t: d.metric for t, d in TASKS.items()} == {t: "string_match_part" if d.family == "qa" else "string_match_all"
                                                       for t, d in TASKS.items()}
    niah = {t: (d.params["haystack"], d.params["key"], d.params["value"], d.params["k"], d.params["v"], d.params["q"])
            for t, d in TASKS.items() if d.family == "niah"}
    assert niah == {  # synthetic.yaml (num_needle_k is raised to num_needle_q, as RULER's niah.py does)
        "niah_single_1": ("noise", "words", "numbers", 1, 1, 1), "niah_single_2": ("essay", "words", "numbers", 1, 1, 1),
        "niah_single_3": ("essay", "words", "uuids", 1, 1, 1), "niah_multikey_1": ("essay", "words", "numbers", 4, 1, 1),
        "niah_multikey_2": ("needle", "words", "numbers", 1, 1, 1), "niah_multikey_3": ("needle", "uuids", "uuids", 1, 1, 1),
        "niah_multivalue": ("essay", "words", "numbers", 1, 4, 1), "niah_multiquery": ("essay", "words", "numbers", 4, 1, 4)}
    assert TASKS["vt"].params == {"chains": 1, "hops": 4} and TASKS["cwe"].params == {"num_cw": 10}
    assert TASKS["fwe"].params["alpha"] == 2.0


@pytest.mark.parametrize("task", ["niah_single_1", "vt", "fwe"])
def test_prompt_and_answer_budget_fit_the_length_together(task: str, tokenizer) -> None:
    """RULER fits `prompt + tokens_to_generate <= max_seq_length`, so the answer stays within the tested length."""
    length = 2000
    prompts, skipped = build_task(task, tokenizer, [length], 2, seed=0, res=Resources(), fmt=FMT)
    assert not skipped and prompts
    for p in prompts:
        assert length - TASKS[task].max_new_tokens - 70 <= len(p.ids) <= length - TASKS[task].max_new_tokens


def test_noise_haystacks_are_ruler_s_paragraphs_one_a_line() -> None:
    s = make_sample("niah_single_1", 20, 0, 4096, 0, Resources())
    context = s.user.split("afterwards.\n", 1)[1].rsplit("\nWhat is", 1)[0]
    lines = context.split("\n")
    assert len(lines) == 21 and Counter(lines)[T.NOISE_BLOCK] == 20
    assert re.fullmatch(r"One of the special magic numbers for [a-z]+-[a-z]+ is: \d{7}\.", next(x for x in lines if x != T.NOISE_BLOCK))
    s = make_sample("niah_multikey_2", 12, 0, 4096, 0, Resources())
    context = s.user.split("afterwards.\n", 1)[1].rsplit("\nWhat is", 1)[0]
    assert len(context.split("\n")) == 13 and all(x.startswith("One of the special magic numbers for ") for x in context.split("\n"))


def test_variable_tracking_is_ruler_s() -> None:
    """Statements on their own lines without a full stop; a worked example (3-letter names) and a blank line first."""
    s = make_sample("vt", 30, 0, 4096, 0, Resources())
    example, main = s.user.split("\n\nMemorize and track", 1)
    main = "Memorize and track" + main
    lines = main.split("\n\n", 1)[1].rsplit("\nQuestion:", 1)[0].split("\n")
    statements = [x for x in lines if x.startswith("VAR ")]
    assert len(lines) == 35 and Counter(lines)[T.NOISE_BLOCK] == 30
    assert statements[0] == f"VAR {s.answers[0]} = {s.meta['value']}"
    assert statements[1:] == [f"VAR {b} = VAR {a} " for a, b in zip(s.answers, s.answers[1:])]
    assert re.search(r"they are:  [A-Z]{3} [A-Z]{3} [A-Z]{3} [A-Z]{3} [A-Z]{3}$", example)  # RULER: prefix + " " + names
    assert example.count(T.NOISE_BLOCK) == 15 and re.search(r"\nVAR [A-Z]{3} = \d{5}\n", example)


def test_cwe_example_and_question_are_one_line_apart() -> None:
    s = make_sample("cwe", 30, 0, 4096, 0, Resources())
    assert re.search(r"\d+\. \w+\nBelow is a numbered list of words\.", s.user)
    assert "\n\nBelow is a numbered list" not in s.user


def test_fwe_vocabulary_grows_with_the_length_as_ruler_s() -> None:
    """RULER's vocab_size: (max_seq_length - tokens_to_generate) // 50 coded words."""
    for length in (1050, 4096):
        s = make_sample("fwe", 200_000, 0, length, 0, Resources())
        coded = s.user[s.user.index("coded words.") + 12: s.user.index("\nQuestion")].split()
        assert len(set(coded)) == (length - 50) // 50


def test_squad_questions_come_in_order_with_their_article_s_paragraphs_first(tmp_path: Path, tokenizer) -> None:
    squad = {"data": [{"title": f"t{a}", "paragraphs": [
        {"context": f"Article {a} paragraph {p}: keeper {a}{p} lives here.",
         "qas": [{"question": f"Who lives in {a}{p}?", "answers": [{"text": f"keeper {a}{p}"}], "is_impossible": False}]}
        for p in range(6)]} for a in range(10)]}
    (tmp_path / "squad.json").write_text(json.dumps(squad))
    data = load_squad(tmp_path / "squad.json")
    res = Resources(qa={"squad": data})
    for i in range(3):
        s = make_sample("qa_1", 4, 0, 4096, i, res)
        assert s.meta["question"] == f"Who lives in 0{i}?"  # question i, as RULER's index
        docs = re.findall(r"Document \d+:\nArticle (\d+) paragraph", s.user)
        assert len(docs) == 5 and set(docs) == {"0"}  # the gold paragraph and 4 of its article's others
    s = make_sample("qa_1", 12, 0, 4096, 0, res)
    docs = re.findall(r"Document \d+:\nArticle (\d+) paragraph (\d+)", s.user)
    assert sum(a == "0" for a, _ in docs) == 6 and len(docs) == 13  # all 6 of its article, then other articles'
