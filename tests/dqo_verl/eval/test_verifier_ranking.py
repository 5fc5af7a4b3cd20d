"""The verifier evaluation on a hand-made example: within-problem AUROC, best-of-N's chance level, and samples
without an answer ranked last."""

import pandas as pd
import pytest

from dqo_verl.eval.metrics import best_of_n_chance, summarize, within_problem_auroc


def samples():
    # problem 0: V ranks right above wrong; problem 1: V ranks them the wrong way round; problem 2: all wrong.
    # The pooled AUROC sees that problem 0's values are all high: it says "V works"; within problem it is 0.5.
    rows = [
        (0, "a=4 #### 4", "4", 1.0, 0.9),
        (0, "a=4 #### 4", "4", 1.0, 0.9),  # the same right text twice
        (0, "a=5 #### 5", "5", 0.0, 0.8),
        (0, "a=a", None, 0.0, 0.95),  # no answer, the highest value
        (1, "b=7 #### 7", "7", 1.0, 0.1),
        (1, "b=6 #### 6", "6", 0.0, 0.2),
        (1, "b=8 #### 8", "8", 0.0, 0.3),
        (1, "b=9 #### 9", "9", 0.0, 0.3),
        (2, "c=1 #### 1", "1", 0.0, 0.5),
        (2, "c=2 #### 2", "2", 0.0, 0.4),
        (2, "c=1 #### 1", "1", 0.0, 0.5),
        (2, "c=3 #### 3", "3", 0.0, 0.4),
    ]
    df = pd.DataFrame(rows, columns=["uid", "response", "pred", "score", "value"])
    return df.assign(model="m", dataset="d", decoding="sample x4", seed=0, sample=df.groupby("uid").cumcount())


def test_within_problem_auroc_averages_the_problems_with_both_labels():
    got, n = within_problem_auroc(samples(), "value")
    # problem 0: right {0.9, 0.9} vs wrong {0.8, 0.95}: pairs 0.9>0.8 twice, 0.9<0.95 twice -> 0.5
    # problem 1: right {0.1} vs wrong {0.2, 0.3, 0.3}: 0
    assert n == 2 and got == pytest.approx((0.5 + 0.0) / 2)


def test_best_of_n_chance_is_a_random_score_per_distinct_answered_text():
    # problem 0: answered texts {a=4, a=5}: 1/2; problem 1: 1 of 4; problem 2: {c=1, c=2, c=3}: 0
    assert best_of_n_chance(samples()) == pytest.approx((1 / 2 + 1 / 4 + 0) / 3)
    assert samples()["score"].mean() == pytest.approx(3 / 12)  # the mean of the samples is another number


def test_summary_reports_pooled_and_within_problem_auroc_and_the_chance_beside_best_of_n():
    df = samples()
    # best-of-4 by V with the no-answer sample ranked last picks row 0 (right), row 4.. (1: 0.3 wrong), (2: 0.5)
    best = pd.concat([df.iloc[[0]], df.iloc[[6]], df.iloc[[8]]]).assign(decoding="best-of-4 (V)")
    s = summarize(pd.concat([df, best]), pass_k=[1])["m"]
    pooled = s["d sample x4"]
    assert pooled["value_auroc"] > 0.5 and pooled["value_auroc_within"] == pytest.approx(0.25)
    assert pooled["problems_mixed"] == 2
    assert s["d best-of-4 (V)"]["accuracy"] == pytest.approx(1 / 3)
    assert s["d best-of-4 (V)"]["chance"] == pytest.approx((1 / 2 + 1 / 4) / 3)
