"""The value model's verifier metrics against brute force and hand-made examples."""

import itertools
import random

import numpy as np
import pandas as pd
import pytest

from dqo_verl.eval.verifier import auroc, first_below, main, processbench_f1, step_drop_auroc, verify


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


def test_verify_on_a_hand_made_corpus():
    """Three responses with 3 steps each (segment ends at tokens 1, 3, 5; eos last), V at states 0..6."""
    corpus = pd.DataFrame(
        {
            "response_ids": [[7, 7, 7, 7, 7, 2]] * 3,
            "segment_ends": [[1, 3, 5]] * 3,
            "score": [1.0, 0.0, 0.0],
            "correct_prefix": [3, 1, 0],  # right; wrong from step 1; wrong from step 0
        }
    )
    state_values = [
        np.array([0.5, 0.6, 0.7, 0.8, 0.8, 0.9, 0.0]),  # steps: V(2)=0.7, V(4)=0.8, final V(5)=0.9
        np.array([0.5, 0.6, 0.6, 0.4, 0.3, 0.2, 0.0]),  # 0.6, 0.3, 0.2: below 0.5 after step 1
        np.array([0.5, 0.5, 0.65, 0.5, 0.45, 0.4, 0.0]),  # 0.65, 0.45, 0.4: below 0.5 after step 1, not 0
    ]
    got = verify(corpus, state_values, eos=2, threshold=0.5)
    assert got["final_values"] == [0.9, 0.2, 0.4] and got["outcome_auroc"] == 1.0
    assert (got["erroneous_accuracy"], got["correct_accuracy"], got["f1"]) == (0.5, 1.0, pytest.approx(2 / 3))
    # drops (V before - V after): response 0: -0.2, -0.1, -0.1 (all correct steps); response 1: -0.1 (correct),
    # +0.3 (first wrong); response 2: -0.15 (first wrong): 4 + 1 of the 2 x 4 pairs ordered
    assert got["step_drop_auroc"] == pytest.approx(5 / 8)
    assert got["best_f1"] >= got["f1"]


def test_verifier_command_on_the_tiny_value_model(tiny_models, tiny_corpus, tmp_path):
    corpus = pd.read_parquet(tiny_corpus)
    corpus["segment_ends"] = [list(e) + [len(r) - 1] for e, r in zip(corpus["segment_ends"], corpus["response_ids"])]
    corpus["correct_prefix"] = [0 if s == 0 else len(e) for s, e in zip(corpus["score"], corpus["segment_ends"])]
    path = tmp_path / "corpus_ps.parquet"
    corpus.to_parquet(path)
    result = main([str(tiny_models[1]), "--corpus", str(path), "--out", str(tmp_path / "v"), "--batch-size", "5"])
    assert result["responses"] == 64 and result["correct"] == 32 and 0 <= result["outcome_auroc"] <= 1
    assert (tmp_path / "v" / "verifier.png").read_bytes()[:4] == b"\x89PNG"
    assert "ProcessBench F1" in (tmp_path / "v" / "verifier.md").read_text()
    with pytest.raises(SystemExit, match="no column 'correct_prefix'"):
        main([str(tiny_models[1]), "--corpus", str(tiny_corpus)])
