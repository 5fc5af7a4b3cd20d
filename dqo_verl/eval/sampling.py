"""Sampled answers, graded: `n` samples of every prompt on the rollout group, each graded in its source's answer
format; greedy decoding is sampling at temperature 0.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from dqo_verl.reward.formats import answer_format
from dqo_verl.reward.grading import grade_many
from dqo_verl.workers.rollout import RolloutGroup, sample_seed

GREEDY = {"temperature": 0.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0}


def grade_answers(
    prompts: pd.DataFrame, uids: list[int], texts: list[str], workers: int | None, desc: str
) -> list[dict]:
    """Grade each text as an answer to prompt row `uid`, in its source's answer format."""
    return grade_many(
        [
            (text, prompts.iloc[u]["reward_model"]["ground_truth"], answer_format(prompts.iloc[u]["data_source"]))
            for u, text in zip(uids, texts)
        ],
        workers,
        desc=desc,
    )


def sample_and_grade(
    group: RolloutGroup,
    prompts: pd.DataFrame,
    n: int,
    seed: int,
    params: dict,
    workers: int | None = None,
    desc: str = "grading",
) -> list[dict]:
    """`n` samples of every prompt (rows with `prompt_ids`), graded: one dict per sample, in (prompt, sample) order."""
    requests = [(uid, j) for uid in range(len(prompts)) for j in range(n)]
    outs = group.generate(
        [prompts.iloc[u]["prompt_ids"] for u, _ in requests], [sample_seed(seed, u, j) for u, j in requests], params
    )
    graded = grade_answers(prompts, [u for u, _ in requests], [o["response"] for o in outs], workers, desc)
    return [
        {
            "uid": u,
            "sample": j,
            "response": o["response"],
            "response_ids": list(o["response_ids"]),
            "finish_reason": o["finish_reason"],
            # log pi(y|x) of the sample under the policy that wrote it (the engines' raw per-token log-probs)
            "loglik": float(np.sum(o["logprobs"])) if o.get("logprobs") is not None else float("nan"),
            **g,
        }
        for (u, j), o, g in zip(requests, outs, graded)
    ]


def greedy_accuracy(group: RolloutGroup, prompts: pd.DataFrame, max_tokens: int, workers: int | None = None) -> float:
    """Greedy accuracy of the group's model on `prompts`."""
    results = sample_and_grade(group, prompts, 1, 0, {**GREEDY, "max_tokens": max_tokens}, workers)
    return float(np.mean([r["score"] for r in results]))
