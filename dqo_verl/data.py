"""The offline corpus: read, check and batch it in verl's left/right-padded layout.

One parquet row per (prompt, response) (docs/design.md, "Data"). The trainer needs `prompt_ids`,
`response_ids` (token id lists) and `score` (outcome reward); `segment_ends` (response token
indices where a step ends), `process_rewards` (one per segment end) and `ref_logprobs` (one per
response token) are optional.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from tensordict import TensorDict
from verl.utils import tensordict_utils as tu

from dqo_verl import algo
from dqo_verl.cli import InputError

REQUIRED_COLUMNS = ("prompt_ids", "response_ids", "score")
# rows per parquet row group in what we write: a trainer reading an update's rows decodes the groups they lie in
ROW_GROUP_ROWS = 256
LIST_COLUMNS = ("prompt_ids", "response_ids", "segment_ends", "process_rewards", "ref_logprobs")


class CorpusError(InputError):
    """Bad corpus input: names the file, the row and the field."""

    def __init__(self, path, row, field: str, problem: str):
        where = f"{path}" + (f", row {row}" if row is not None else "")
        super().__init__(f"{where}, field '{field}': {problem}")


def _first(bad) -> int | None:
    """Index of the first True, or None."""
    hits = np.flatnonzero(np.asarray(bad, dtype=bool))
    return int(hits[0]) if len(hits) else None


def _as_arrow(df: pd.DataFrame, path) -> pa.Table:
    """The checked columns of `df` as an arrow table; a column of mixed kinds of value names its first odd row."""
    columns = {}
    for column in [c for c in (*LIST_COLUMNS, "score") if c in df.columns]:
        values = df[column]
        try:
            columns[column] = pa.array(values, from_pandas=False)
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError, OverflowError) as exc:
            if column == "score":
                row = _first(values.map(lambda s: not isinstance(s, (int, float, np.number)) or isinstance(s, bool)))
                problem = f"expected a number, got {type(values.iloc[row]).__name__}"
            else:
                is_list = values.map(lambda v: isinstance(v, (list, tuple, np.ndarray))).to_numpy(dtype=bool)
                row = _first(~is_list & ~values.isna().to_numpy(dtype=bool))
                problem = f"expected a list, got {type(values.iloc[row]).__name__}" if row is not None else None
                if row is None:
                    row, problem = _first(is_list), "expected a list of numbers"
            raise CorpusError(path, row, column, problem) from exc
    return pa.table(columns)


def _array(table: pa.Table, column: str) -> pa.Array:
    chunks = table[column].chunks
    return pa.concat_arrays(chunks) if chunks else pa.array([], table.schema.field(column).type)


def _is_list_type(typ: pa.DataType) -> bool:
    return pa.types.is_list(typ) or pa.types.is_large_list(typ) or pa.types.is_fixed_size_list(typ)


def _lengths(values: pa.Array) -> np.ndarray:
    """Each row's list length; -1 for a null row."""
    return pc.list_value_length(values).fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)


def _flat(values: pa.Array) -> tuple[pa.Array, np.ndarray]:
    """All entries of a list array, concatenated, and the row of each entry."""
    return pc.list_flatten(values), pc.list_parent_indices(values).to_numpy(zero_copy_only=False)


def validate_table(table: pa.Table, path, vocab_size: int | None = None, offset: int = 0) -> None:
    """Vectorised checks of corpus rows (the first is corpus row `offset`; `check_columns` first): the first
    problem raises CorpusError.

    Token ids must lie in [0, vocab_size) when `vocab_size` is given (the model's embedding rows): an id
    outside it would fail inside a worker, mid-run. None is allowed in the optional list columns (that row has none).
    """

    def fail(row: int, column: str, problem: str):
        raise CorpusError(path, offset + row, column, problem)

    cols = {c: _array(table, c) for c in (*LIST_COLUMNS, "score") if c in table.column_names}
    for column in LIST_COLUMNS:
        if column not in cols:
            continue
        values = cols[column]
        if column in ("prompt_ids", "response_ids") and (row := _first(values.is_null())) is not None:
            fail(row, column, "expected a list, got NoneType")
        if not (_is_list_type(values.type) or pa.types.is_null(values.type)):
            row = _first(values.is_valid())
            fail(row, column, f"expected a list, got {type(values[row].as_py()).__name__}")
        if (
            _is_list_type(values.type)
            and not (pa.types.is_integer(values.type.value_type) or pa.types.is_floating(values.type.value_type))
            and len(pc.list_flatten(values))
        ):
            fail(_first(_lengths(values) > 0), column, "expected a list of numbers")
    n = {}
    for column in ("prompt_ids", "response_ids"):
        values = cols[column]
        n[column] = _lengths(values)
        if (row := _first(n[column] == 0)) is not None:
            fail(row, column, "empty token list")
        ids, row_of = _flat(values)
        if not pa.types.is_integer(ids.type):
            whole = pc.equal(ids, pc.floor(ids)).to_numpy(zero_copy_only=False)
            fail(
                int(row_of[i]) if (i := _first(~whole)) is not None else _first(n[column] > 0),
                column,
                "token ids must be integers",
            )
        ids = ids.to_numpy(zero_copy_only=False)
        out_of_range = (ids < 0) | (ids >= vocab_size) if vocab_size is not None else ids < 0
        if (i := _first(out_of_range)) is not None:
            limit = f"[0, {vocab_size})" if vocab_size is not None else "[0, vocab size)"
            fail(int(row_of[i]), column, f"token id {int(ids[i])} outside the vocabulary {limit}")
    if "score" in cols:
        scores = cols["score"]
        if (row := _first(scores.is_null())) is not None:  # how parquet stores pandas' NaN
            fail(row, "score", "reward is missing (null or nan)")
        if not (pa.types.is_integer(scores.type) or pa.types.is_floating(scores.type)):
            fail(0, "score", f"expected a number, got {type(scores[0].as_py()).__name__}")
        values = scores.to_numpy(zero_copy_only=False).astype(np.float64)
        if (row := _first(~np.isfinite(values))) is not None:
            fail(row, "score", f"reward is {values[row]}")
    response_len = n["response_ids"]
    ends_len = _lengths(cols["segment_ends"]) if "segment_ends" in cols else np.full(len(table), -1)
    if "segment_ends" in cols and _is_list_type(cols["segment_ends"].type):
        ends, row_of = _flat(cols["segment_ends"])
        ends = ends.to_numpy(zero_copy_only=False)
        if (i := _first((ends < 0) | (ends >= response_len[row_of]))) is not None:
            row = int(row_of[i])
            fail(
                row,
                "segment_ends",
                f"index outside the response (length {response_len[row]}): {cols['segment_ends'][row].as_py()}",
            )
    if "process_rewards" in cols:
        rewards = cols["process_rewards"]
        given = _lengths(rewards)
        if (row := _first((given >= 0) & (given != ends_len))) is not None:
            fail(row, "process_rewards", "needs one reward per segment_ends entry")
        if _is_list_type(rewards.type):
            flat, row_of = _flat(rewards)
            if (i := _first(~np.isfinite(flat.to_numpy(zero_copy_only=False).astype(np.float64)))) is not None:
                row = int(row_of[i])
                fail(row, "process_rewards", f"non-finite reward in {rewards[row].as_py()}")
    if "ref_logprobs" in cols:
        logps = cols["ref_logprobs"]
        given = _lengths(logps)
        if (row := _first((given >= 0) & (given != response_len))) is not None:
            fail(row, "ref_logprobs", f"{given[row]} values for {response_len[row]} response tokens")
        if _is_list_type(logps.type):
            flat, row_of = _flat(logps)
            if (i := _first(~np.isfinite(flat.to_numpy(zero_copy_only=False).astype(np.float64)))) is not None:
                fail(int(row_of[i]), "ref_logprobs", "non-finite log-probability")


def validate_corpus(df: pd.DataFrame, path, required=REQUIRED_COLUMNS, vocab_size: int | None = None) -> None:
    """`validate_table` on a frame (see there); a column of mixed kinds of value names its first odd row."""
    check_columns(list(df.columns), len(df), path, required)
    validate_table(_as_arrow(df, path), path, vocab_size)


def check_columns(columns: list[str], rows: int, path, required: tuple[str, ...] = REQUIRED_COLUMNS) -> None:
    """A corpus has its required columns and at least one row (else CorpusError)."""
    for column in required:
        if column not in columns:
            raise CorpusError(path, None, column, f"missing column (have: {', '.join(columns)})")
    if rows == 0:
        raise CorpusError(path, None, "response_ids", "the corpus has no rows")


def apply_length_limits(
    df: pd.DataFrame, max_prompt_length: int, max_response_length: int, overlong: str
) -> tuple[pd.DataFrame, dict]:
    """Drop rows whose prompt is too long; truncate or drop rows whose response is too long.

    A truncated response keeps its first `max_response_length` tokens, as if sampling had stopped
    there: it has no final answer, so its outcome reward becomes 0 and later segment ends go.
    """
    if overlong not in ("truncate", "drop"):
        raise ValueError(f"data.overlong must be 'truncate' or 'drop', got {overlong!r}")
    prompt_long = df["prompt_ids"].map(len) > max_prompt_length
    response_long = df["response_ids"].map(len) > max_response_length
    df = df[~prompt_long]
    response_long = response_long[~prompt_long]
    stats = {"prompt_too_long_dropped": int(prompt_long.sum()), "response_too_long": int(response_long.sum())}
    if overlong == "drop":
        df = df[~response_long]
    elif response_long.any():
        df = df.copy()
        for idx in df.index[response_long]:
            df.at[idx, "response_ids"] = list(df.at[idx, "response_ids"][:max_response_length])
            if "score" in df.columns:
                df.at[idx, "score"] = 0.0
            if "ref_logprobs" in df.columns and df.at[idx, "ref_logprobs"] is not None:
                df.at[idx, "ref_logprobs"] = list(df.at[idx, "ref_logprobs"][:max_response_length])
            if "segment_ends" in df.columns and df.at[idx, "segment_ends"] is not None:
                keep = [i for i, e in enumerate(df.at[idx, "segment_ends"]) if e < max_response_length]
                df.at[idx, "segment_ends"] = [df.at[idx, "segment_ends"][i] for i in keep]
                if "process_rewards" in df.columns and df.at[idx, "process_rewards"] is not None:
                    df.at[idx, "process_rewards"] = [df.at[idx, "process_rewards"][i] for i in keep]
    return df.reset_index(drop=True), stats


def write_parquet_atomic(df: pd.DataFrame, path: str | os.PathLike, metadata: dict | None = None) -> None:
    """Write parquet (row groups of ROW_GROUP_ROWS rows) to a temp file in the same folder, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pandas(df, preserve_index=False)
    if metadata:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), **metadata})
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        pq.write_table(table, tmp, row_group_size=ROW_GROUP_ROWS)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    """Write `obj` as indented JSON to a temp file in the same folder, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def parquet_metadata(path: str | os.PathLike) -> dict:
    """Schema metadata of a parquet file as str -> str."""
    meta = pq.read_schema(path).metadata or {}
    return {k.decode(): v.decode() for k, v in meta.items()}


@dataclass
class BatchSpec:
    """How corpus rows become training tensors."""

    pad_token_id: int
    granularity: str = "token"
    use_process_rewards: bool = False


def _pad(seqs: list, width: int, value, left: bool, dtype) -> torch.Tensor:
    out = torch.full((len(seqs), width), value, dtype=dtype)
    for i, s in enumerate(seqs):
        s = torch.tensor(np.asarray(s), dtype=dtype)
        if left:
            out[i, width - len(s) :] = s
        else:
            out[i, : len(s)] = s
    return out


def build_batch(rows: pd.DataFrame, spec: BatchSpec) -> TensorDict:
    """verl left/right-padded batch (prompts left-, responses right-padded) plus DQO fields.

    Tensor fields: prompts, responses, input_ids, attention_mask, position_ids, response_mask,
    ref_logprobs (0 where absent), rewards (outcome on the last token, process rewards at segment
    ends when enabled), action_ends (bool, per `spec.granularity`). Non-tensor: temperature = 1.
    """
    prompts = list(rows["prompt_ids"])
    responses = list(rows["response_ids"])
    plen, rlen = max(map(len, prompts)), max(map(len, responses))
    prompt_ids = _pad(prompts, plen, spec.pad_token_id, True, torch.long)
    response_ids = _pad(responses, rlen, spec.pad_token_id, False, torch.long)
    prompt_mask = _pad([[1] * len(p) for p in prompts], plen, 0, True, torch.long)
    response_mask = _pad([[1] * len(r) for r in responses], rlen, 0, False, torch.long)
    attention_mask = torch.cat([prompt_mask, response_mask], dim=1)
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)

    b = len(rows)
    lengths = response_mask.sum(dim=1)
    rewards = torch.zeros(b, rlen, dtype=torch.float32)
    if "score" in rows.columns:
        rewards[torch.arange(b), lengths - 1] = torch.as_tensor(rows["score"].to_numpy(dtype=np.float32))
    seg_mask = torch.zeros(b, rlen, dtype=torch.bool)
    if "segment_ends" in rows.columns:
        for i, ends in enumerate(rows["segment_ends"]):
            if ends is not None and len(ends):
                seg_mask[i, torch.tensor(np.asarray(ends), dtype=torch.long)] = True
    if spec.use_process_rewards:
        if "process_rewards" not in rows.columns:
            raise ValueError("algorithm.use_process_rewards=true but the corpus has no process_rewards column")
        for i, (ends, prs) in enumerate(zip(rows["segment_ends"], rows["process_rewards"])):
            if prs is not None and len(prs):
                idx = torch.tensor(np.asarray(ends), dtype=torch.long)
                rewards[i].index_add_(0, idx, torch.tensor(np.asarray(prs), dtype=torch.float32))
    if "ref_logprobs" in rows.columns:
        ref_logprobs = _pad(
            [np.asarray(x, dtype=np.float32) for x in rows["ref_logprobs"]], rlen, 0.0, False, torch.float32
        )
    else:
        ref_logprobs = torch.zeros(b, rlen, dtype=torch.float32)
    action_ends = algo.compute_action_ends(
        response_mask, spec.granularity, seg_mask if spec.granularity == "step" else None
    )
    return tu.get_tensordict(
        {
            "prompts": prompt_ids,
            "responses": response_ids,
            "input_ids": torch.cat([prompt_ids, response_ids], dim=1),
            "attention_mask": attention_mask,
            "position_ids": position_ids,
            "response_mask": response_mask,
            "ref_logprobs": ref_logprobs,
            "rewards": rewards,
            "action_ends": action_ends,
        },
        non_tensor_dict={"temperature": 1.0},
    )


def epoch_batches(
    num_rows: int, batch_size: int, seed: int, epoch: int, shuffle: bool = True, unit_rows: int = 1
) -> list[np.ndarray]:
    """Row indices of each update in `epoch`: `batch_size` units of `unit_rows` consecutive rows (a DPO pair, ...)
    in an order fixed by (seed, epoch); a last partial batch is dropped."""
    units = num_rows // unit_rows
    order = np.random.default_rng([seed, epoch]).permutation(units) if shuffle else np.arange(units)
    rows = (order[:, None] * unit_rows + np.arange(unit_rows)).reshape(-1)
    size = batch_size * unit_rows
    return [rows[i * size : (i + 1) * size] for i in range(units // batch_size)]


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
