"""The offline corpus: N samples per prompt from the rollout engines (`corpus` stage), graded (`score`).

Both stages stream on Ray Data over every node of the cluster (`streaming.py`; docs/design.md,
"Streaming data stages"). `corpus` (`make corpus RECIPE=NAME`) reads `${paths.data}/prompts.parquet`
and writes `${paths.data}/samples.parquet`: one row per (prompt, sample) with `prompt_ids`,
`response_ids`, `response`, `finish_reason`, `logprobs` (the sampled tokens' log-probs) and the prompt's
verl fields. Shards of `rollout.shard_prompts` prompts go to a pool of engine actors; each shard is
written atomically under `${paths.data}/samples_shards/`, and a killed run restarts with the shards it
has, so no row is lost or duplicated. Every sample's seed is fixed by (rollout seed, prompt, sample), so
the corpus does not depend on the number of engines or on which engine made a shard.

`score` (`make score RECIPE=NAME`) grades every sample 1/0 in the answer format its source declares, in
CPU tasks of `score.shard_rows` rows on every node (shards under `${paths.data}/corpus_shards/`), and
writes the training corpus `${paths.data}/corpus.parquet` (with `score` and `pred`).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.compute as pc
import pyarrow.parquet as pq
from omegaconf import DictConfig
from verl.utils.device import get_device_name

from dqo_verl.budget import check_budget, engine_config
from dqo_verl.cli import InputError
from dqo_verl.data import write_parquet_atomic
from dqo_verl.grading import grade_many
from dqo_verl.prompts import ANSWER_FORMAT_OF, answer_format
from dqo_verl.rollout import engine_name, sample_seed, sampling_params
from dqo_verl.streaming import (
    EngineActor,
    StageReport,
    combine_shards,
    mean_list_length,
    read_shard,
    run_shards,
    shard_path,
    shard_ranges,
    summary,
)
from dqo_verl.workers import engines_per_node, init_ray

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


def run_on_engines(
    cfg: DictConfig, stage: str, actor: type, ranges: list[tuple[int, int]], folder: Path, unit: str, **kwargs
) -> StageReport:
    """Stream the missing shards of `ranges` through a pool of `actor`s, engines on policy.model.path
    (rollout.engines_per_node on each of trainer.nnodes); `kwargs` go to the actor with the rollout
    section and sampling parameters. Nothing starts (not even Ray) when every shard exists."""
    if all(shard_path(folder, start).exists() for start, _ in ranges):
        return StageReport()
    model = {"policy.model.path": cfg.policy.model.path}
    budget = check_budget(cfg, stage, ["data.max_prompt_length", "rollout.max_tokens"], model)
    init_ray(cfg)
    rollout = {**engine_config(cfg, budget), "engine": engine_name(cfg.rollout.backend)}
    # tp > 1: the engine's own Ray executor places its tp GPU workers; the actor needs none itself
    gpus = 1 if get_device_name() != "cpu" and rollout["tensor_parallel_size"] == 1 else 0
    engines = engines_per_node(cfg) * cfg.trainer.nnodes
    print(f"[{stage}] {len(ranges)} shards on {engines} {rollout['engine']} engine(s)")
    report = run_shards(
        actor,
        ranges,
        folder,
        desc=stage,
        unit=unit,
        actors=engines,
        num_gpus=gpus,
        fn_constructor_kwargs=dict(
            rollout=rollout, model=cfg.policy.model.path, params=sampling_params(cfg.rollout), **kwargs
        ),
    )
    print(f"[{stage}] {report.line()}")
    return report


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


def unknown_source(path, row: int, source) -> InputError:
    return InputError(
        f"{path}, row {row}, field 'data_source': no answer format is declared for source "
        f"{source!r} (known: {', '.join(sorted(ANSWER_FORMAT_OF))}, reasoning_gym/<task>)"
    )


def answer_formats(df: pd.DataFrame, path) -> list[str]:
    """The answer format of every row's data_source; a source that declares none is an InputError."""
    formats = [answer_format(src) for src in df["data_source"]]
    if None in formats:
        row = formats.index(None)
        raise unknown_source(path, row, df["data_source"].iloc[row])
    return formats


def check_sources(path: Path) -> None:
    """Every data_source of a parquet file declares an answer format (reads that column only)."""
    sources = pq.read_table(path, columns=["data_source"]).column(0)
    for source in pc.unique(sources).to_pylist():
        if answer_format(source) is None:
            raise unknown_source(path, pc.index(sources, source).as_py(), source)


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
