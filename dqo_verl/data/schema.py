"""The corpus contract: the columns a training corpus has, and their checks.

One parquet row per (prompt, response) (docs/design.md, "Data"). The trainer needs `prompt_ids`, `response_ids`
(token id lists) and `score` (outcome reward); `segment_ends` (response token indices where a step ends),
`process_rewards` (one per segment end) and `ref_logprobs` (one per response token) are optional. A bad row is
one `RowError` naming the file, row and field.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from dqo_verl.config.errors import RowError

REQUIRED_COLUMNS = ("prompt_ids", "response_ids", "score")

LIST_COLUMNS = ("prompt_ids", "response_ids", "segment_ends", "process_rewards", "ref_logprobs")


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
            raise RowError(path, row, column, problem) from exc
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
    problem raises RowError.

    Token ids must lie in [0, vocab_size) when `vocab_size` is given (the model's embedding rows): an id
    outside it would fail inside a worker, mid-run. None is allowed in the optional list columns (that row has none).
    """

    def fail(row: int, column: str, problem: str):
        raise RowError(path, offset + row, column, problem)

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
    """A corpus has its required columns and at least one row (else RowError)."""
    for column in required:
        if column not in columns:
            raise RowError(path, None, column, f"missing column (have: {', '.join(columns)})")
    if rows == 0:
        raise RowError(path, None, "response_ids", "the corpus has no rows")


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
