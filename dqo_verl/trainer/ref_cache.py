"""Reference log-probs of a training set, computed once and cached beside the corpus in shards.

pi_ref is frozen and the corpus is fixed, so log pi_ref(a_t|s_t) of every response token is computed
once and written to `<corpus stem>[.<method rows>].ref/part-<first row>.parquet` (or under
`data.ref_cache_dir`): shards of `ref.shard_rows` training rows, each written atomically with the
fingerprint of what it was made from (the corpus file, the reference model, the length limits, the row
count). A later run with the same reuses every shard; a stopped run keeps the shards it finished and
computes only the rest; anything else is recomputed. Shard i's row j is training row i * shard_rows + j.

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

from dqo_verl.data.io import parquet_metadata, write_parquet_atomic
from dqo_verl.data.shards import SHARD_GLOB, shard_path
from dqo_verl.data.trainset import ParquetRows, TrainSet
from dqo_verl.trainer.batches import BatchSpec, build_batch
from dqo_verl.workers.groups import Group, Role, ranks, release, start_groups


def cache_dir(config: DictConfig, corpus_path: Path, tag: str | None = None) -> Path:
    """Where the cache of `corpus_path` lives (`tag`: a method's own rows, e.g. DPO pairs, in a folder of their own)."""
    configured = config.data.get("ref_cache_dir")
    stem = corpus_path.stem + (f".{tag}" if tag else "")
    return Path(configured).expanduser() if configured else corpus_path.with_name(stem + ".ref")


def fingerprint(config: DictConfig, corpus_path: Path, rows: int, tag: str | None = None) -> dict[str, str]:
    """What the cached log-probs depend on (stored in every shard's parquet metadata)."""
    st = corpus_path.stat()
    d = config.data
    stamp = {
        "dqo.ref_model": model_id(config.ref.path),
        "dqo.corpus": f"{corpus_path.resolve()}:{st.st_size}:{st.st_mtime_ns}",
        "dqo.limits": f"{d.max_prompt_length}:{d.max_response_length}:{d.overlong}",
        "dqo.train_rows": f"{rows}:{config.ref.shard_rows}",
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


def log_probs(
    rows: TrainSet, index: np.ndarray, group: Group, micro_batch: int, config: DictConfig, pad_token_id: int, bar
) -> list[np.ndarray]:
    """log pi(a_t|s_t) of every response token of training rows `index` by `group`'s model, one array per row."""
    unit = ranks(config) * micro_batch  # every rank needs whole micro-batches
    chunk = max(unit, config.ref.batch_size // unit * unit)
    spec = BatchSpec(pad_token_id=pad_token_id)
    out: list[np.ndarray] = []
    for start in range(0, len(index), chunk):
        part = index[start : start + chunk]
        frame = rows.read(part, with_ref=False)
        pad = (-len(frame)) % unit  # repeat a row to fill the last micro-batches; its outputs are dropped
        batch = build_batch(pd.concat([frame, frame.iloc[[0] * pad]]) if pad else frame, spec)
        td = left_right_2_no_padding(batch)
        result = group.infer(td, f"computing reference log-probs of rows {part[0]}..", calculate_entropy=False)
        lp = no_padding_2_padding(tu.get(result, "log_probs"), td).float()
        lengths = batch["response_mask"].sum(dim=1).tolist()
        out.extend(lp[i, : lengths[i]].numpy().copy() for i in range(len(frame)))
        bar.update(len(frame))
    return out


def attach_ref_logprobs(
    rows: TrainSet,
    corpus_path: Path,
    config: DictConfig,
    pool,
    policy: Group | None,
    reference: Role,
    pad_token_id: int,
    tag: str | None = None,
) -> Path:
    """Point `rows.ref` at the cached reference log-probs of every training row, computing missing shards first.

    `policy` is the started policy group (None if there is none); `reference` the reference model's role,
    started only when the reference is not the initial policy. Returns the cache folder.
    """
    folder = cache_dir(config, corpus_path, tag)
    stamp = fingerprint(config, corpus_path, len(rows), tag)
    size = config.ref.shard_rows
    starts = list(range(0, len(rows), size))
    done = {s for s in starts if shard_path(folder, s).exists() and _matches(shard_path(folder, s), stamp)}
    for stale in set(folder.glob(SHARD_GLOB)) - {shard_path(folder, s) for s in done}:
        stale.unlink()  # another corpus's, model's or layout's
    todo = [s for s in starts if s not in done]
    if not todo:
        print(f"[ref] reusing cached reference log-probs: {folder}")
    else:
        kept = f" ({len(done)} of {len(starts)} shards already cached)" if done else ""
        if policy is not None and reference_is_initial_policy(config):
            print(f"[ref] computing reference log-probs of {len(rows)} responses with the initial policy{kept}")
            _compute(
                rows,
                todo,
                folder,
                stamp,
                policy,
                config.policy.engine.infer_micro_batch_size_per_gpu,
                config,
                pad_token_id,
            )
        else:
            print(f"[ref] computing reference log-probs of {len(rows)} responses with {config.ref.path}{kept}")
            groups = start_groups(pool, {"ref": reference}, config.checkpoint)
            try:
                micro = reference.config.engine.infer_micro_batch_size_per_gpu
                _compute(rows, todo, folder, stamp, groups["ref"], micro, config, pad_token_id)
            finally:
                release(g.worker_group for g in groups.values())
        print(f"[ref] wrote {folder}")
    rows.ref = ParquetRows([shard_path(folder, s) for s in starts])
    return folder


def _matches(path: Path, stamp: dict[str, str]) -> bool:
    try:
        meta = parquet_metadata(path)
    except Exception:  # noqa: BLE001 - an unreadable shard is recomputed
        return False
    return all(meta.get(k) == v for k, v in stamp.items())


def _compute(rows, todo, folder, stamp, group, micro_batch, config, pad_token_id) -> None:
    size = config.ref.shard_rows
    done = len(rows) - sum(min(size, len(rows) - s) for s in todo)
    with tqdm(total=len(rows), initial=done, desc="ref log-probs", unit="resp", dynamic_ncols=True) as bar:
        for start in todo:
            index = np.arange(start, min(start + size, len(rows)))
            write_shard(folder, start, log_probs(rows, index, group, micro_batch, config, pad_token_id, bar), stamp)


def write_shard(folder: Path, start: int, logps: list, stamp: dict[str, str]) -> None:
    """The log-probs of training rows start.. as one shard, written atomically with the fingerprint."""
    write_parquet_atomic(pd.DataFrame({"ref_logprobs": logps}), shard_path(folder, start), metadata=stamp)
