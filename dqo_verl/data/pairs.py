"""DPO pairs from a graded corpus (paper A.2): (chosen, rejected) responses of the same prompt."""

from __future__ import annotations

import random

import pandas as pd


def preference_pairs(corpus: pd.DataFrame, seed: int) -> list[tuple[int, int]]:
    """Random (correct, incorrect) row pairs of the same prompt (`uid`), sorted by (uid, rows): the DPO set.

    Every response of a prompt with both labels is in a pair (max(correct, incorrect) pairs per prompt), and
    more random pairs are added until there are at least len(corpus) // 2 where the prompts allow: the paper's
    DPO sets are at least half the DQO trajectory count (Table 8: 1.06-1.36 times half)."""
    rng = random.Random(seed)
    picked, others = set(), []
    for uid, group in corpus.groupby("uid", sort=True):
        good = group.index[group["score"] == 1].tolist()
        bad = group.index[group["score"] == 0].tolist()
        if not good or not bad:
            continue
        rng.shuffle(good), rng.shuffle(bad)
        cover = {(uid, good[i % len(good)], bad[i % len(bad)]) for i in range(max(len(good), len(bad)))}
        picked |= cover
        others.extend((uid, g, b) for g in sorted(good) for b in sorted(bad) if (uid, g, b) not in cover)
    missing = len(corpus) // 2 - len(picked)
    if missing > 0:
        picked |= set(rng.sample(others, min(missing, len(others))))
    return [(g, b) for _, g, b in sorted(picked)]
