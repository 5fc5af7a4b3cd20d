"""The value model's verifier metrics against brute force and hand-made examples."""

import itertools
import random

import pytest

from dqo_verl.verifier import auroc, first_below, processbench_f1, step_drop_auroc


def brute_auroc(scores, labels):
    pairs = [(p, n) for p, n in itertools.product(range(len(scores)), repeat=2) if labels[p] and not labels[n]]
    return sum(1.0 if scores[p] > scores[n] else 0.5 if scores[p] == scores[n] else 0.0 for p, n in pairs) / len(pairs)


def test_auroc_equals_the_pairwise_count_ties_included():
    assert auroc([0.9, 0.8, 0.3, 0.1], [1, 0, 1, 0]) == 0.75  # 3 of the 4 (positive, negative) pairs ordered
    rng = random.Random(0)
    for _ in range(50):
        n = rng.randint(2, 30)
        scores = [round(rng.random(), 1) for _ in range(n)]  # many ties
        labels = [rng.random() < 0.4 for _ in range(n)]
        labels[0], labels[1] = True, False
        assert auroc(scores, labels) == pytest.approx(brute_auroc(scores, labels), abs=1e-12)
    with pytest.raises(ValueError, match="both classes"):
        auroc([0.1, 0.2], [1, 1])


def test_first_error_step_and_processbench_f1():
    assert first_below([0.9, 0.6, 0.4, 0.2], 0.5) == 2 and first_below([0.9, 0.6], 0.5) == -1
    # two correct responses (one flagged wrongly), two erroneous (one step found exactly)
    scores = processbench_f1(predicted=[-1, 1, 2, 1], truth=[-1, -1, 2, 0])
    assert scores == {"erroneous_accuracy": 0.5, "correct_accuracy": 0.5, "f1": 0.5}
    assert processbench_f1([0, -1], [0, -1])["f1"] == 1.0 and processbench_f1([1, 0], [0, -1])["f1"] == 0.0


def test_step_drop_auroc_scores_the_first_wrong_steps_against_the_correct_ones():
    start = [0.5, 0.5, 0.5]
    steps = [[0.6, 0.7], [0.55, 0.2, 0.1], [0.58, 0.9]]
    truth = [-1, 1, 0]  # a correct response; wrong at step 1 (V drops 0.35); wrong at step 0 (V drops -0.08)
    # negatives: drops -0.1, -0.1 (response 0), -0.05 (response 1, step 0); response 1's step 2 is past its error
    assert step_drop_auroc(start, steps, truth) == pytest.approx((3 + 2) / 6)
