"""The `corpus` stage: N samples per prompt from the rollout engines (`make corpus RECIPE=NAME`).

It streams on Ray Data over every node of the cluster (`streaming.py`; docs/design.md, "Streaming data stages"):
it reads `${paths.data}/prompts.parquet` and writes `${paths.data}/samples.parquet`, one row per (prompt, sample)
with `prompt_ids`, `response_ids`, `response`, `finish_reason`, `logprobs` (the sampled tokens' log-probs) and the
prompt's verl fields. Shards of `rollout.shard_prompts` prompts go to a pool of engine actors; each shard is
written atomically under `${paths.data}/samples_shards/`, and a killed run restarts with the shards it has, so no
row is lost or duplicated. Every sample's seed is fixed by (rollout seed, prompt, sample), so the corpus does not
depend on the number of engines or on which engine made a shard.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.compute as pc
import pyarrow.parquet as pq
from omegaconf import DictConfig

from data_prep.streaming import (
    EngineActor,
    combine_shards,
    mean_list_length,
    read_shard,
    run_on_engines,
    summary,
)
from dqo_verl.data.io import write_parquet_atomic
from dqo_verl.data.shards import shard_path, shard_ranges
from dqo_verl.workers.rollout import sample_seed

PROMPT_FIELDS = ("data_source", "prompt", "ability", "reward_model", "extra_info")


def sample_rows(prompts: pd.DataFrame, first_uid: int, n: int, seed: int, params: dict, engine) -> list[dict]:
    """The n samples of each prompt of a shard (uids from `first_uid`), rows ordered by (prompt, sample)."""
    requests = [(row, k) for row in range(len(prompts)) for k in range(n)]
    ids = [prompts.iloc[row]["prompt_ids"] for row, _ in requests]
    outs = engine.generate(ids, [sample_seed(seed, first_uid + row, k) for row, k in requests], params)
    rows = []
    for (row, k), out in zip(requests, outs):
        src = prompts.iloc[row]
        rows.append(
            {
                **{f: src[f] for f in PROMPT_FIELDS if f in src},
                "uid": first_uid + row,
                "sample": k,
                "prompt_ids": list(src["prompt_ids"]),
                **out,
            }
        )
    return rows


class SampleShards(EngineActor):
    """Ray Data actor: the samples of one shard of prompts at a time, written as that shard's file."""

    def __init__(self, rollout: dict, model: str, params: dict, prompts: str, n: int, seed: int):
        super().__init__(rollout, model)
        self.prompts, self.n, self.seed, self.params = prompts, n, seed, params

    def __call__(self, batch: dict[str, np.ndarray], folder: str) -> dict[str, np.ndarray]:
        start, stop = int(batch["start"][0]), int(batch["stop"][0])
        t0 = time.time()
        rows = sample_rows(read_shard(self.prompts, start, stop), start, self.n, self.seed, self.params, self)
        t1 = time.time()
        write_parquet_atomic(pd.DataFrame(rows), shard_path(Path(folder), start))
        return summary(stop - start, sum(len(r["response_ids"]) for r in rows), t0, t1)


def run(cfg: DictConfig) -> Path:
    """The `corpus` stage."""
    data = Path(cfg.paths.data)
    prompts = data / "prompts.parquet"
    n_prompts = pq.ParquetFile(prompts).metadata.num_rows
    r = cfg.rollout
    ranges = shard_ranges(n_prompts, r.shard_prompts)
    print(f"[corpus] {n_prompts} prompts x {r.n} samples")
    run_on_engines(
        cfg, "corpus", SampleShards, ranges, data / "samples_shards", "prompt", prompts=str(prompts), n=r.n, seed=r.seed
    )
    out = data / "samples.parquet"
    rows = combine_shards(data / "samples_shards", ranges, out, rows_per_unit=r.n)
    table = pq.read_table(out, columns=["uid", "sample", "finish_reason"])
    keys = pc.add(pc.multiply(table["uid"].cast("int64"), r.n), table["sample"].cast("int64"))
    if len(pc.unique(keys)) != rows:
        raise RuntimeError(f"{out}: duplicated (uid, sample) rows; delete {data / 'samples_shards'} and rerun")
    mean_length = mean_list_length(out, "response_ids")
    cut = pc.mean(pc.equal(table["finish_reason"], "length")).as_py() or 0.0
    print(f"[corpus] {rows} samples, mean length {mean_length:.1f} tokens, {cut:.1%} cut at max_tokens -> {out}")
    return out


if __name__ == "__main__":  # `python -m data_prep.corpus +recipe=NAME`: this stage (and what it needs) alone
    from dqo_verl.pipeline.runner import stage_command

    stage_command("corpus")()
