"""The offline corpus (DESIGN §1 step 2): N samples per prompt through the rollout worker group.

`python -m data_prep.corpus +recipe=NAME` (or `make corpus RECIPE=NAME`) reads
`${paths.data}/prompts.parquet` and writes `${paths.data}/samples.parquet`: one row per
(prompt, sample) with `prompt_ids`, `response_ids`, `response`, `finish_reason`, `logprobs`
(the sampled tokens' log-probs) and the prompt's verl fields. Work is done in shards of
`rollout.shard_prompts` prompts, each written atomically under `${paths.data}/samples_shards/`;
a killed run restarts with the shards it has, so no row is lost or duplicated.
"""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from dqo_verl.data import write_parquet_atomic
from dqo_verl.main import entry_point
from dqo_verl.rollout import RolloutGroup, sample_seed

PROMPT_FIELDS = ("data_source", "prompt", "ability", "reward_model", "extra_info")


def sampling_params(rollout: DictConfig) -> dict:
    keys = ("temperature", "top_p", "top_k", "min_p", "max_tokens")
    return {k: rollout[k] for k in keys}


def engines_per_node(cfg: DictConfig) -> int:
    r = cfg.rollout
    return r.engines_per_node or max(1, cfg.trainer.n_gpus_per_node // r.tensor_parallel_size)


def generate_samples(
    prompts: pd.DataFrame, group: RolloutGroup, n: int, seed: int, params: dict, shard_dir: Path, shard_prompts: int
) -> pd.DataFrame:
    """All samples, shard by shard (existing shards are reused); rows ordered by (prompt, sample)."""
    shard_dir.mkdir(parents=True, exist_ok=True)
    starts = list(range(0, len(prompts), shard_prompts))
    done = {s for s in starts if (shard_dir / f"shard_{s:08d}.parquet").exists()}
    todo = [s for s in starts if s not in done]
    bar = tqdm(total=len(prompts), initial=sum(min(shard_prompts, len(prompts) - s) for s in done), desc="corpus", unit="prompt")
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
            rows.append({**{f: src[f] for f in PROMPT_FIELDS if f in src}, "uid": uid, "sample": k,
                         "prompt_ids": list(src["prompt_ids"]), **out})
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
    """The `corpus` stage of a recipe."""
    from dqo_verl.trainer import init_ray

    from data_prep import prompts as prompts_stage
    from data_prep import require

    data = Path(cfg.paths.data)
    prompts = pd.read_parquet(require(data / "prompts.parquet", prompts_stage.prepare, cfg))
    r = cfg.rollout
    init_ray(cfg)
    group = RolloutGroup(OmegaConf.to_container(r, resolve=True), cfg.policy.model.path, cfg.trainer.nnodes, engines_per_node(cfg))
    print(f"[corpus] {len(prompts)} prompts x {r.n} samples on {group.engines} {group.backend} engine(s)")
    try:
        samples = generate_samples(prompts, group, r.n, r.seed, sampling_params(r), data / "samples_shards", r.shard_prompts)
    finally:
        group.shutdown()
    out = data / "samples.parquet"
    write_parquet_atomic(samples, out)
    lengths = samples["response_ids"].map(len)
    print(f"[corpus] {len(samples)} samples, mean length {lengths.mean():.1f} tokens, "
          f"{(samples['finish_reason'] == 'length').mean():.1%} cut at max_tokens -> {out}")
    return out


main = entry_point(run)

if __name__ == "__main__":
    main()
