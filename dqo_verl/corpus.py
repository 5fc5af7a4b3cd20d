"""The offline corpus: N samples per prompt on the rollout worker group (`corpus` stage), graded (`score`).

`corpus` (`make corpus RECIPE=NAME`) reads `${paths.data}/prompts.parquet` and writes
`${paths.data}/samples.parquet`: one row per (prompt, sample) with `prompt_ids`, `response_ids`,
`response`, `finish_reason`, `logprobs` (the sampled tokens' log-probs) and the prompt's verl fields.
Work is done in shards of `rollout.shard_prompts` prompts, each written atomically under
`${paths.data}/samples_shards/`; a killed run restarts with the shards it has, so no row is lost or
duplicated.

`score` (`make score RECIPE=NAME`) grades every sample 1/0 in the answer format its source declares and
writes the training corpus `${paths.data}/corpus.parquet` (with `score` and `pred`).
"""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd
from omegaconf import DictConfig
from tqdm import tqdm

from dqo_verl.budget import check_budget, engine_config
from dqo_verl.cli import InputError
from dqo_verl.data import write_parquet_atomic
from dqo_verl.grading import grade_many
from dqo_verl.prompts import ANSWER_FORMAT_OF, answer_format
from dqo_verl.rollout import RolloutGroup, sample_seed, sampling_params
from dqo_verl.workers import engines_per_node, init_ray

PROMPT_FIELDS = ("data_source", "prompt", "ability", "reward_model", "extra_info")


def generate_samples(
    prompts: pd.DataFrame, group: RolloutGroup, n: int, seed: int, params: dict, shard_dir: Path, shard_prompts: int
) -> pd.DataFrame:
    """All samples, shard by shard (existing shards are reused); rows ordered by (prompt, sample)."""
    shard_dir.mkdir(parents=True, exist_ok=True)
    starts = list(range(0, len(prompts), shard_prompts))
    done = {s for s in starts if (shard_dir / f"shard_{s:08d}.parquet").exists()}
    todo = [s for s in starts if s not in done]
    bar = tqdm(
        total=len(prompts),
        initial=sum(min(shard_prompts, len(prompts) - s) for s in done),
        desc="corpus",
        unit="prompt",
    )
    tokens, t0 = 0, time.perf_counter()
    for start in todo:
        chunk = prompts.iloc[start : start + shard_prompts]
        uids = list(range(start, start + len(chunk)))
        requests = [(uid, k) for uid in uids for k in range(n)]
        ids = [chunk.iloc[uid - start]["prompt_ids"] for uid, _ in requests]
        outs = group.generate(ids, [sample_seed(seed, uid, k) for uid, k in requests], params)
        rows = []
        for (uid, k), out in zip(requests, outs):
            src = chunk.iloc[uid - start]
            rows.append(
                {
                    **{f: src[f] for f in PROMPT_FIELDS if f in src},
                    "uid": uid,
                    "sample": k,
                    "prompt_ids": list(src["prompt_ids"]),
                    **out,
                }
            )
            tokens += len(out["response_ids"])
        write_parquet_atomic(pd.DataFrame(rows), shard_dir / f"shard_{start:08d}.parquet")
        bar.update(len(chunk))
        elapsed = time.perf_counter() - t0
        bar.set_postfix(tok_s=f"{tokens / elapsed:.0f}")
    bar.close()
    frames = [pd.read_parquet(shard_dir / f"shard_{s:08d}.parquet") for s in starts]
    samples = pd.concat(frames, ignore_index=True)
    expected = len(prompts) * n
    if len(samples) != expected or samples[["uid", "sample"]].duplicated().any():
        raise RuntimeError(f"{shard_dir}: {len(samples)} samples for {expected} expected; delete the folder and rerun")
    return samples


def run(cfg: DictConfig) -> Path:
    """The `corpus` stage."""
    data = Path(cfg.paths.data)
    prompts = pd.read_parquet(data / "prompts.parquet")
    r = cfg.rollout
    model = {"policy.model.path": cfg.policy.model.path}
    budget = check_budget(cfg, "corpus", ["data.max_prompt_length", "rollout.max_tokens"], model)
    init_ray(cfg)
    group = RolloutGroup(engine_config(cfg, budget), cfg.policy.model.path, cfg.trainer.nnodes, engines_per_node(cfg))
    print(f"[corpus] {len(prompts)} prompts x {r.n} samples on {group.engines} {group.backend} engine(s)")
    try:
        samples = generate_samples(
            prompts, group, r.n, r.seed, sampling_params(r), data / "samples_shards", r.shard_prompts
        )
    finally:
        group.shutdown()
    out = data / "samples.parquet"
    write_parquet_atomic(samples, out)
    lengths = samples["response_ids"].map(len)
    print(
        f"[corpus] {len(samples)} samples, mean length {lengths.mean():.1f} tokens, "
        f"{(samples['finish_reason'] == 'length').mean():.1%} cut at max_tokens -> {out}"
    )
    return out


def answer_formats(df: pd.DataFrame, path) -> list[str]:
    """The answer format of every row's data_source; a source that declares none is an InputError."""
    formats = [answer_format(src) for src in df["data_source"]]
    if None in formats:
        row = formats.index(None)
        raise InputError(
            f"{path}, row {row}, field 'data_source': no answer format is declared for source "
            f"{df['data_source'].iloc[row]!r} (known: {', '.join(sorted(ANSWER_FORMAT_OF))}, reasoning_gym/<task>)"
        )
    return formats


def score_samples(df: pd.DataFrame, formats: list[str], workers: int | None = None) -> pd.DataFrame:
    """Copy of `df` with `score` and `pred` from (response, reward_model.ground_truth, answer format)."""
    rows = [(r, rm["ground_truth"], f) for r, rm, f in zip(df["response"], df["reward_model"], formats)]
    results = grade_many(rows, workers)
    return df.assign(score=[r["score"] for r in results], pred=[r["pred"] for r in results])


def corpus_stats(corpus: pd.DataFrame) -> dict:
    """Positive rate, per-prompt all-right / all-wrong shares, mean response length."""
    per_prompt = corpus.groupby("uid")["score"].mean()
    return {
        "responses": len(corpus),
        "prompts": int(per_prompt.size),
        "positive_rate": float(corpus["score"].mean()),
        "prompts_all_correct": float((per_prompt == 1).mean()),
        "prompts_all_wrong": float((per_prompt == 0).mean()),
        "mean_response_tokens": float(corpus["response_ids"].map(len).mean()),
    }


def score(cfg: DictConfig) -> Path:
    """The `score` stage."""
    data = Path(cfg.paths.data)
    samples = pd.read_parquet(data / "samples.parquet")
    corpus = score_samples(samples, answer_formats(samples, data / "samples.parquet"), cfg.score.workers)
    out = data / "corpus.parquet"
    write_parquet_atomic(corpus, out)
    s = corpus_stats(corpus)
    print(
        f"[score] {s['responses']} responses of {s['prompts']} prompts: positive rate {s['positive_rate']:.3f}, "
        f"all correct {s['prompts_all_correct']:.1%} / all wrong {s['prompts_all_wrong']:.1%} of prompts, "
        f"mean length {s['mean_response_tokens']:.1f} tokens -> {out}"
    )
    return out
