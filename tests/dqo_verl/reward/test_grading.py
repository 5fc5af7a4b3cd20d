"""Outcome grading by answer format: GSM8K numbers, boxed answers with math-verify, adversarial inputs;
scoring a corpus by the answer format each row's source declares."""

import os
import time

import pandas as pd
import pytest

from data_prep.score import score_samples
from dqo_verl.config.errors import InputError
from dqo_verl.reward import grading
from dqo_verl.reward.formats import answer_formats
from dqo_verl.reward.grading import extract_gsm8k_answer, grade, grade_many, last_boxed, normalize_answer

MATH = "DigitalLearningGmbH/MATH-lighteval"


@pytest.mark.parametrize(
    "response,truth,score,pred",
    [
        ("2+2=4\n\n#### 4", "4", 1.0, "4"),
        ("#### 1,234", "1234", 1.0, "1234"),
        ("#### $12.50", "12.5", 1.0, "12.50"),
        ("#### 3 #### 5", "5", 1.0, "5"),
        ("#### 7", "8", 0.0, "7"),
        ("the answer is 4", "4", 0.0, None),
        ("#### -3", "-3", 1.0, "-3"),
        ("####", "0", 0.0, None),
        ("#### 5.000", "5", 1.0, "5.000"),
    ],
)
def test_gsm8k_grading(response, truth, score, pred):
    assert grade(response, truth, "gsm8k") == {"score": score, "pred": pred}


def test_last_boxed_matches_braces_and_takes_the_last():
    assert last_boxed(r"first \boxed{1} then \boxed{\frac{a}{b^{2}}} end") == r"\frac{a}{b^{2}}"
    assert last_boxed(r"\fbox{7}") == "7"
    assert last_boxed(r"so \boxed 5.") == "5."
    assert last_boxed("no box") is None and last_boxed(r"\boxed{unclosed") is None
    assert extract_gsm8k_answer("x #### 42 apples") == "42"


@pytest.mark.parametrize(
    "pred,truth",
    [
        (r"\frac{1}{2}", "0.5"),
        (r"\dfrac{1}{2}", r"\frac12"),
        (r"\frac{\sqrt{2}}{2}", r"\sqrt{2}/2"),
        (r"2\sqrt{3}", r"\sqrt{12}"),
        ("0.25", r"\frac{1}{4}"),
        (r"50\%", "50"),
        (r"10\text{ cm}", "10"),
        (r"\text{(C)}", "C"),
        ("(C)", "C"),
        ("x=5", "5"),
        (r"x = -\frac{3}{2}", "-1.5"),
        (r"[0, 1)", "[0,1)"),
        (r"(-\infty, 3]", r"(-\infty,3]"),
        ("(1, 2)", "(1,2)"),
        (r"\{2, 1\}", r"\{1,2\}"),
        (r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}", r"\begin{pmatrix}1\\2\end{pmatrix}"),
        ("1,000", "1000"),
        (r"\$5", "5"),
        (r"90^\circ", "90"),
        (r"\left( 3, \frac{\pi}{2} \right)", r"\left(3,\frac{\pi}{2}\right)"),
    ],
)
def test_math_equivalent_answers(pred, truth):
    assert grade(rf"... so the answer is \boxed{{{pred}}}.", truth, "boxed") == {"score": 1.0, "pred": pred}


@pytest.mark.parametrize(
    "pred,truth",
    [
        ("3", "4"),
        (r"\frac{1}{3}", "0.33"),
        ("2x", "2"),
        ("(1,2)", "(2,1)"),
        ("B", "C"),
        (r"\sqrt{2}", "2"),
        ("[0,1]", "[0,1)"),
    ],
)
def test_math_different_answers(pred, truth):
    assert grade(rf"\boxed{{{pred}}}", truth, "boxed")["score"] == 0.0


def test_boxed_answers_need_a_box():
    assert grade(r"\boxed{204}", "204", "boxed")["score"] == 1.0
    assert grade(r"\boxed{\frac{3}{4}}", r"\frac34", "boxed")["score"] == 1.0
    assert grade("The answer is 204.", "204", "boxed") == {"score": 0.0, "pred": None}


@pytest.mark.parametrize(
    "pred",
    [
        "{" * 2000 + "1" + "}" * 2000,
        r"\frac{" * 300 + "1" + "}{2}" * 300,
        "9^{9^{9^{9^{9}}}}",
        "10^{10^{10}}",
        "2^{1000000000}",
        "100000!",
        r"\sqrt{" * 500 + "2" + "}" * 500,
        "x" * 50000,
        "(((" * 3000,
    ],
)
def test_adversarial_answers_are_fast_and_never_raise(pred):
    start = time.perf_counter()
    out = grade(rf"\boxed{{{pred}}}", "1", "boxed")
    assert time.perf_counter() - start < 5.0
    assert out["score"] == 0.0


def test_grade_never_raises_on_junk_but_refuses_an_unknown_format():
    for args in (
        (None, "1", "boxed"),
        (r"\boxed{1}", None, "boxed"),
        (None, "1", "gsm8k"),
        ("", "", "gsm8k_or_last_number"),
    ):
        out = grade(*args)
        assert out["score"] == 0.0
    with pytest.raises(ValueError, match="unknown answer format 'openai/gsm8k'"):
        grade("#### 1", "1", "openai/gsm8k")


def test_normalize_answer():
    assert normalize_answer(r"\dfrac{1}{2}.") == r"\frac{1}{2}"
    assert normalize_answer(r"\left(1, 2\right)") == "(1,2)"
    assert normalize_answer("3.50") == "3.5" and normalize_answer(".5") == "0.5"


def test_a_corpus_is_scored_in_the_format_its_sources_declare():
    df = pd.DataFrame(
        {
            "response": [r"\boxed{\frac12}", "#### 7", r"\boxed{3}", "#### 1,000", "so 9", "so 9"] * 20,
            "reward_model": [{"ground_truth": t} for t in ("0.5", "7", "4", "1000", "9", "9")] * 20,
            "data_source": [MATH, "openai/gsm8k", "aime24", "synthetic_arith", "reasoning_gym/chain_sum", "gsm8k"] * 20,
        }
    )
    formats = answer_formats(df, "s.parquet")
    assert formats[:6] == ["boxed", "gsm8k", "boxed", "gsm8k", "gsm8k_or_last_number", "gsm8k"]
    scored = score_samples(df, formats, workers=2)
    assert scored["score"].tolist() == [1.0, 1.0, 0.0, 1.0, 1.0, 0.0] * 20
    assert scored["pred"].tolist()[:5] == [r"\frac12", "7", "3", "1000", "9"] and pd.isna(scored["pred"].iloc[5])
    assert "score" not in df.columns


def test_a_source_without_a_declared_format_fails_naming_file_row_and_source():
    df = pd.DataFrame(
        {
            "data_source": ["openai/gsm8k", "my/own_set"],
            "response": ["#### 1"] * 2,
            "reward_model": [{"ground_truth": "1"}] * 2,
        }
    )
    with pytest.raises(InputError) as err:
        answer_formats(df, "samples.parquet")
    message = str(err.value)
    assert message.startswith("samples.parquet, row 1, field 'data_source'") and "'my/own_set'" in message


def test_grading_pool_never_forks_the_caller(monkeypatch):
    """A forked copy of a Ray driver corrupts its gRPC connections (the demo hung in its next GCS call)."""

    def no_fork():
        raise AssertionError("grade_many forked the calling process")

    grading._pool.cache_clear()  # a fresh pool is started under the patch
    monkeypatch.setattr(os, "fork", no_fork)
    assert [
        r["score"] for r in grade_many([("#### 7", "7", "gsm8k"), ("#### 8", "7", "gsm8k")] * 40, workers=2, chunk=16)
    ] == [1.0, 0.0] * 40


def test_generated_tasks_fall_back_to_the_last_number_but_gsm8k_does_not():
    rg = "gsm8k_or_last_number"
    assert grade("5 - 3 = 2, then 2 * 4 = 8.\nThe final answer is 8.", "8", rg) == {"score": 1.0, "pred": "8"}
    assert grade("so it is -1,204 in all", "-1204", rg)["score"] == 1.0
    assert grade("#### 7 (not 8)", "8", rg) == {"score": 0.0, "pred": "7"}  # a '####' line still decides
    assert grade("I cannot tell.", "8", rg) == {"score": 0.0, "pred": None}
    assert grade("The final answer is 8.", "8", "gsm8k") == {"score": 0.0, "pred": None}


def test_a_dead_grading_worker_fails_that_call_and_the_next_starts_afresh():
    import signal
    from concurrent.futures.process import BrokenProcessPool

    rows = [("#### 7", "7", "gsm8k")] * 8
    assert len(grade_many(rows, workers=2, chunk=4)) == 8
    for pid in list(grading._pool(2)._processes):  # the kept pool's workers
        os.kill(pid, signal.SIGKILL)
    with pytest.raises(BrokenProcessPool):
        grade_many(rows, workers=2, chunk=4)
    assert [r["score"] for r in grade_many(rows, workers=2, chunk=4)] == [1.0] * 8


def test_small_batches_are_graded_in_the_calling_process(monkeypatch):
    def no_pool(workers):
        raise AssertionError("a pool was started for a small batch")

    rows = [("#### 7", "7", "gsm8k"), ("#### 8", "7", "gsm8k")] * (grading.IN_PROCESS_ROWS // 2)
    monkeypatch.setattr(grading, "_pool", no_pool)
    assert [r["score"] for r in grade_many(rows)] == [1.0, 0.0] * (grading.IN_PROCESS_ROWS // 2)
    with pytest.raises(AssertionError, match="a pool was started"):
        grade_many(rows + rows[:1])  # one more: a pool
    with pytest.raises(AssertionError, match="a pool was started"):
        grade_many(rows[:2], workers=2)  # asked for
