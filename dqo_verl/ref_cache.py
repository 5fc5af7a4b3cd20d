"""Reference log-probs of a training corpus, computed once and cached beside it.

pi_ref is frozen and the corpus is fixed, so log pi_ref(a_t|s_t) of every response token is computed
once and written (atomically) to `<corpus stem>.ref.parquet` next to the corpus, or `data.ref_cache_file`,
with the fingerprint of what it was made from: the corpus file, the reference model and the length
limits. A later run with the same three reuses it; any other is recomputed.

The computing group is the policy's when the reference is the policy's initial model (the usual case,
`ref.path` = `policy.model.path`): before its first update the policy *is* pi_ref. Otherwise a
forward-only reference group starts on the same pool, computes them, and is released.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import DictConfig
from tqdm import tqdm
from verl.utils import tensordict_utils as tu
from verl.workers.utils.padding import left_right_2_no_padding, no_padding_2_padding

from dqo_verl.data import BatchSpec, build_batch, parquet_metadata, write_parquet_atomic
from dqo_verl.workers import Group, Role, ranks, release, start_groups


def cache_path(config: DictConfig, corpus_path: Path, tag: str | None = None) -> Path:
    """Where the cache of `corpus_path` lives (`tag`: a method's own rows, e.g. DPO pairs, in a file of their own)."""
    configured = config.data.get("ref_cache_file")
    stem = corpus_path.stem + (f".{tag}" if tag else "")
    return Path(configured) if configured else corpus_path.with_name(stem + ".ref.parquet")


def fingerprint(config: DictConfig, corpus_path: Path, tag: str | None = None) -> dict[str, str]:
    """What the cached log-probs depend on (stored in the cache's parquet metadata)."""
    st = corpus_path.stat()
    d = config.data
    stamp = {
        "dqo.ref_model": model_id(config.ref.path),
        "dqo.corpus": f"{corpus_path.resolve()}:{st.st_size}:{st.st_mtime_ns}",
        "dqo.limits": f"{d.max_prompt_length}:{d.max_response_length}:{d.overlong}",
    }
    if tag:  # a method's rows are drawn with the run's seed
        stamp["dqo.rows"] = f"{tag}:{config.trainer.seed}"
    return stamp


def model_id(path: str) -> str:
    """A local model folder's absolute path, or a hub name as given."""
    local = Path(path).expanduser()
    return str(local.resolve()) if local.exists() else str(path)


def reference_is_initial_policy(config: DictConfig) -> bool:
    return model_id(config.ref.path) == model_id(config.policy.model.path)


def log_probs(corpus: pd.DataFrame, group: Group, micro_batch: int, config: DictConfig, pad_token_id: int) -> list:
    """log pi(a_t|s_t) of every response token of `corpus` by `group`'s model, one array per row."""
    unit = ranks(config) * micro_batch  # every rank needs whole micro-batches
    chunk = max(unit, config.ref.batch_size // unit * unit)
    spec = BatchSpec(pad_token_id=pad_token_id)
    out: list[np.ndarray] = []
    with tqdm(total=len(corpus), desc="ref log-probs", unit="resp", dynamic_ncols=True) as bar:
        for start in range(0, len(corpus), chunk):
            rows = corpus.iloc[start : start + chunk]
            pad = (-len(rows)) % unit  # repeat a row to fill the last micro-batches; its outputs are dropped
            batch = build_batch(pd.concat([rows, rows.iloc[[0] * pad]]) if pad else rows, spec)
            td = left_right_2_no_padding(batch)
            result = group.infer(td, f"computing reference log-probs of rows {start}..", calculate_entropy=False)
            lp = no_padding_2_padding(tu.get(result, "log_probs"), td).float()
            lengths = batch["response_mask"].sum(dim=1).tolist()
            out.extend(lp[i, : lengths[i]].numpy().copy() for i in range(len(rows)))
            bar.update(len(rows))
    return out


def with_ref_logprobs(
    corpus: pd.DataFrame,
    corpus_path: Path,
    config: DictConfig,
    pool,
    policy: Group | None,
    reference: Role,
    pad_token_id: int,
    tag: str | None = None,
) -> pd.DataFrame:
    """`corpus` with a `ref_logprobs` column: as given, from the cache, or computed now and cached.

    `policy` is the started policy group (None if there is none); `reference` the reference model's role,
    started only when the reference is not the initial policy.
    """
    if "ref_logprobs" in corpus.columns and corpus["ref_logprobs"].notna().all():
        return corpus
    cache = cache_path(config, corpus_path, tag)
    stamp = fingerprint(config, corpus_path, tag)
    if cache.exists():
        if all(parquet_metadata(cache).get(k) == v for k, v in stamp.items()):
            print(f"[ref] reusing cached reference log-probs: {cache}")
            return pd.read_parquet(cache)
        print(f"[ref] {cache} was made for another corpus, reference model or length limits; recomputing")
    if policy is not None and reference_is_initial_policy(config):
        print(f"[ref] computing reference log-probs of {len(corpus)} responses with the initial policy")
        logprobs = log_probs(corpus, policy, config.policy.engine.infer_micro_batch_size_per_gpu, config, pad_token_id)
    else:
        print(f"[ref] computing reference log-probs of {len(corpus)} responses with {config.ref.path}")
        groups = start_groups(pool, {"ref": reference}, config.checkpoint)
        try:
            micro_batch = reference.config.engine.infer_micro_batch_size_per_gpu
            logprobs = log_probs(corpus, groups["ref"], micro_batch, config, pad_token_id)
        finally:
            release(g.worker_group for g in groups.values())
    corpus = corpus.assign(ref_logprobs=logprobs)
    write_parquet_atomic(corpus, cache, metadata=stamp)
    print(f"[ref] wrote {cache}")
    return corpus
