"""The `score` stage: every sample graded 1/0 in the answer format its source declares (`make score RECIPE=NAME`).

Grading runs in one-CPU Ray tasks of `score.shard_rows` rows on every node (shards under
`${paths.data}/corpus_shards/`) and writes the training corpus `${paths.data}/corpus.parquet` (with `score` and
`pred`).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from omegaconf import DictConfig

from data_prep.streaming import (
    combine_shards,
    mean_list_length,
    read_shard,
    run_shards,
    summary,
)
from dqo_verl.data.io import write_parquet_atomic
from dqo_verl.data.shards import shard_path, shard_ranges
from dqo_verl.reward.formats import answer_formats, check_sources
from dqo_verl.reward.grading import grade_many
from dqo_verl.workers.groups import init_ray


def score_samples(df: pd.DataFrame, formats: list[str], workers: int | None = None) -> pd.DataFrame:
    """Copy of `df` with `score` and `pred` from (response, reward_model.ground_truth, answer format)."""
    rows = [(r, rm["ground_truth"], f) for r, rm, f in zip(df["response"], df["reward_model"], formats)]
    results = grade_many(rows, workers)
    return df.assign(score=[r["score"] for r in results], pred=[r["pred"] for r in results])


def grade_shard(batch: dict[str, np.ndarray], samples: str, folder: str) -> dict[str, np.ndarray]:
    """Ray Data task: grade rows [start, stop) of the samples file in this process, write them as a shard."""
    start, stop = int(batch["start"][0]), int(batch["stop"][0])
    t0 = time.time()
    shard = read_shard(samples, start, stop)
    scored = score_samples(shard, answer_formats(shard, samples), workers=0)
    t1 = time.time()
    write_parquet_atomic(scored, shard_path(Path(folder), start))
    tokens = int(shard["response_ids"].map(len).sum())
    return summary(stop - start, tokens, t0, t1)


def score(cfg: DictConfig) -> Path:
    """The `score` stage."""
    data = Path(cfg.paths.data)
    samples = data / "samples.parquet"
    check_sources(samples)
    ranges = shard_ranges(pq.ParquetFile(samples).metadata.num_rows, cfg.score.shard_rows)
    init_ray(cfg)
    report = run_shards(
        grade_shard,
        ranges,
        data / "corpus_shards",
        desc="score",
        unit="resp",
        tasks=cfg.score.workers,
        fn_kwargs={"samples": str(samples)},
    )
    if report.shards:
        print(f"[score] {report.line()}")
    out = data / "corpus.parquet"
    rows = combine_shards(data / "corpus_shards", ranges, out)
    table = pq.read_table(out, columns=["uid", "score"]).to_pandas()
    per_prompt = table.groupby("uid")["score"].mean()
    mean_length = mean_list_length(out, "response_ids")
    print(
        f"[score] {rows} responses of {per_prompt.size} prompts: positive rate {table['score'].mean():.3f}, "
        f"all correct {(per_prompt == 1).mean():.1%} / all wrong {(per_prompt == 0).mean():.1%} of prompts, "
        f"mean length {mean_length:.1f} tokens -> {out}"
    )
    return out


if __name__ == "__main__":  # `python -m data_prep.score +recipe=NAME`: this stage (and what it needs) alone
    from dqo_verl.pipeline.runner import stage_command

    stage_command("score")()
