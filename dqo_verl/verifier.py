"""The value model as a verifier: metrics of how well V tells right from wrong (docs/design.md, "Using V").

- outcome verifier: V at the state before a response's final token (its eos; the last state for a cut
  response) scores the response; `auroc` of those scores against the final answer's correctness;
- step verifier (ProcessBench, Zheng et al. 2024): responses split into blank-line steps with the process-score
  stage's labels (a failed response's first wrong step is its `correct_prefix`; a correct response has none,
  -1). The predicted first wrong step is the first step after which V falls below a threshold
  (`first_below`); `processbench_f1` is the harmonic mean of the accuracy on erroneous and on correct
  responses; `step_drop_auroc` scores each step by V's drop across it (V before - V after) against "this is
  the first wrong step" over the steps up to and including it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd


def auroc(scores: Sequence[float], labels: Sequence[bool]) -> float:
    """P(score of a random positive > score of a random negative), ties counting 1/2 (Mann-Whitney U)."""
    s, y = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"auroc needs both classes ({n_pos} positive, {n_neg} negative)")
    ranks = pd.Series(s).rank(method="average").to_numpy()  # tied scores share their mean rank
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def first_below(step_values: Sequence[float], threshold: float) -> int:
    """Index of the first step whose value (V after it) is below `threshold`; -1 when none is."""
    below = np.flatnonzero(np.asarray(step_values, dtype=np.float64) < threshold)
    return int(below[0]) if len(below) else -1


def processbench_f1(predicted: Sequence[int], truth: Sequence[int]) -> dict:
    """ProcessBench's scores of first-error-step predictions (-1 = no error): accuracy on the erroneous
    responses (the exact step), on the correct ones (no step flagged), and their harmonic mean."""
    p, t = np.asarray(predicted), np.asarray(truth)
    erroneous, correct = t >= 0, t < 0
    acc_err = float((p[erroneous] == t[erroneous]).mean()) if erroneous.any() else float("nan")
    acc_cor = float((p[correct] == -1).mean()) if correct.any() else float("nan")
    f1 = 2 * acc_err * acc_cor / (acc_err + acc_cor) if acc_err + acc_cor > 0 else 0.0
    return {"erroneous_accuracy": acc_err, "correct_accuracy": acc_cor, "f1": f1}


def step_drop_auroc(start_values: Sequence[float], step_values: Sequence[Sequence[float]], truth: Sequence[int]):
    """AUROC of V's drop across a step (the value before it - the value after it) for "first wrong step" against
    the correct steps before it (every step of a correct response).

    `start_values[i]`: V after the prompt of response i; `step_values[i][k]`: V after its step k."""
    drops, labels = [], []
    for v0, values, first_wrong in zip(start_values, step_values, truth):
        before = np.concatenate([[v0], np.asarray(values[:-1], dtype=np.float64)])
        drop = before - np.asarray(values, dtype=np.float64)
        last = len(values) if first_wrong < 0 else first_wrong + 1
        drops.extend(drop[:last])
        labels.extend(k == first_wrong for k in range(last))
    return auroc(drops, labels)
