"""The rows a method trains on, read from disk an update at a time: the driver never holds the corpus whole.

`ParquetRows` gives random access to the rows of parquet files, decoding only the row groups a request
touches. `scan_corpus` checks a corpus in one streaming pass of vectorised checks (`data.validate_table`)
and keeps what selecting and ordering rows needs: a few numbers per row (`uid`, `score`, lengths), never
token lists. `TrainSet` maps each training row to its corpus row (and the row whose prompt it uses: KTO's
mismatched copies) and reads an update's rows, length-limited, with their reference log-probs from the
sharded cache (`ref_cache.py`). docs/design.md, "Data at scale".
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dqo_verl.config.errors import RowError
from dqo_verl.data.schema import LIST_COLUMNS, apply_length_limits, check_columns, validate_table

# corpus columns a trainer reads (token lists, labels); any others (texts, verl's prompt fields) stay on disk
TRAIN_COLUMNS = ("uid", "score", "finish_reason", *LIST_COLUMNS)
# what to do with responses the sampler cut at its length limit (finish_reason "length"): kept as failures (the
# paper), dropped from the training set, or masked (kept in their batches, out of both losses)
CUT_RESPONSES = ("failure", "drop", "mask")

SCAN_ROWS = 8192  # rows per vectorised validation pass

LARGE_ROW_GROUP = 16384  # a request decodes whole row groups: warn above this many rows in one


class ParquetRows:
    """Random access to the rows of parquet files (in order), decoding only the row groups a request touches."""

    def __init__(self, paths: list[Path]):
        self.paths = [Path(p) for p in paths]
        # pre_buffer's cache of what was read lives as long as the file object: every row group ever read
        self.files = [pq.ParquetFile(p, pre_buffer=False) for p in self.paths]
        self.groups = [(f, g) for f, pf in enumerate(self.files) for g in range(pf.num_row_groups)]
        sizes = [self.files[f].metadata.row_group(g).num_rows for f, g in self.groups]
        self.starts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
        self.largest_group = max(sizes, default=0)
        self.columns = self.files[0].schema_arrow.names if self.files else []

    def __len__(self) -> int:
        return int(self.starts[-1])

    def take(self, rows: np.ndarray, columns: list[str]) -> pa.Table:
        """Rows `rows` (global row numbers, any order, repeats allowed) of `columns`, in the order asked."""
        rows = np.asarray(rows, dtype=np.int64)
        group_of = np.searchsorted(self.starts, rows, side="right") - 1
        parts, picked = [], []
        for g in np.unique(group_of):  # one row group decoded at a time, only the rows asked kept
            mine = np.flatnonzero(group_of == g)
            f, rg = self.groups[g]
            parts.append(self.files[f].read_row_group(rg, columns=columns).take(rows[mine] - self.starts[g]))
            picked.append(mine)
        if not parts:
            return self.files[0].schema_arrow.empty_table().select(columns)
        position = np.empty(len(rows), dtype=np.int64)
        position[np.concatenate(picked)] = np.arange(len(rows))
        return pa.concat_tables(parts).take(position)

    def batches(self, columns: list[str], rows: int = SCAN_ROWS):
        """(first row, table) for consecutive slices of about `rows` rows: a streaming pass over every file."""
        start = 0
        for pf in self.files:
            for batch in pf.iter_batches(batch_size=rows, columns=columns):
                yield start, pa.Table.from_batches([batch])
                start += batch.num_rows


def open_corpus(path: Path) -> ParquetRows:
    """A corpus parquet file opened for reading (RowError naming the file if it is missing or unreadable)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise RowError(path, None, "data.train_files", "file does not exist")
    try:
        return ParquetRows([path])
    except Exception as exc:  # noqa: BLE001 - any reader failure is a bad input file
        raise RowError(path, None, "data.train_files", f"not a readable parquet file ({exc})") from exc


@dataclass
class CorpusScan:
    """What a checked corpus keeps in memory: one row of numbers per corpus row that survives the length limits."""

    meta: pd.DataFrame  # index: corpus row; columns: uid (if any), score (if any), prompt_len, response_len
    stats: dict  # rows, prompt_too_long_dropped, response_too_long
    has_ref_logprobs: bool  # the corpus carries every row's reference log-probs itself


def scan_corpus(
    reader: ParquetRows,
    path: Path,
    required: tuple[str, ...],
    vocab_size: int | None,
    limits: tuple[int, int, str],
    cut_responses: str = "failure",
) -> CorpusScan:
    """Check every row (first problem: RowError naming file, row and field) and apply the length limits.

    As `data.apply_length_limits` does on whole rows: a long prompt drops its row, a long response drops it
    (`overlong=drop`) or is cut, and a cut response scores 0. With `cut_responses=drop`, responses the sampler cut
    at its length limit are dropped too.
    """
    max_prompt, max_response, overlong = limits
    if overlong not in ("truncate", "drop"):
        raise ValueError(f"data.overlong must be 'truncate' or 'drop', got {overlong!r}")
    check_columns(reader.columns, len(reader), path, required)
    columns = [c for c in TRAIN_COLUMNS if c in reader.columns]
    parts, ref_nulls = [], 0
    for start, table in reader.batches(columns):
        validate_table(table, path, vocab_size, offset=start)
        part = {  # copies: a view would keep the slice's arrow buffers, so the whole corpus, alive
            "prompt_len": pc.list_value_length(table["prompt_ids"]).to_numpy().astype(np.int32),
            "response_len": pc.list_value_length(table["response_ids"]).to_numpy().astype(np.int32),
        }
        if "finish_reason" in table.column_names:
            part["sampler_cut"] = pc.fill_null(pc.equal(table["finish_reason"], "length"), False).to_numpy().copy()
        for name in ("uid", "score"):
            if name in table.column_names:
                part[name] = table[name].to_numpy().copy()
        if "ref_logprobs" in table.column_names:
            ref_nulls += table["ref_logprobs"].null_count
        parts.append(pd.DataFrame(part, index=pd.RangeIndex(start, start + table.num_rows)))
    meta = pd.concat(parts)
    prompt_long = meta["prompt_len"] > max_prompt
    response_long = meta["response_len"] > max_response
    stats = {
        "rows": len(meta),
        "prompt_too_long_dropped": int(prompt_long.sum()),
        "response_too_long": int(response_long[~prompt_long].sum()),
    }
    cut = response_long & ~prompt_long
    keep = ~prompt_long & ~response_long if overlong == "drop" else ~prompt_long
    if cut_responses == "drop" and "sampler_cut" in meta.columns:
        stats["cut_by_sampler_dropped"] = int((meta["sampler_cut"] & keep).sum())
        keep &= ~meta["sampler_cut"]
    meta = meta[keep].copy()
    if overlong == "truncate":
        cut = cut[meta.index]
        meta.loc[cut, "response_len"] = max_response
        if "score" in meta.columns:
            meta.loc[cut, "score"] = 0.0
    return CorpusScan(meta, stats, "ref_logprobs" in columns and ref_nulls == 0)


class TrainSet:
    """A method's training rows: training row i is corpus row `rows[i]` under the prompt of `prompt_rows[i]`."""

    def __init__(
        self,
        reader: ParquetRows,
        rows: np.ndarray,
        prompt_rows: np.ndarray,
        limits: tuple[int, int, str],
        columns: list[str] | None = None,
    ):
        self.reader = reader
        self.rows = np.asarray(rows, dtype=np.int64)
        self.prompt_rows = np.asarray(prompt_rows, dtype=np.int64)
        self.limits = limits
        self.columns = [c for c in TRAIN_COLUMNS if c in (columns or reader.columns)]
        self.ref: ParquetRows | None = None  # the reference cache: its row i is training row i

    def __len__(self) -> int:
        return len(self.rows)

    def read(self, index: np.ndarray, with_ref: bool = True) -> pd.DataFrame:
        """Training rows `index` as a frame (token lists, labels, ref_logprobs when cached), length-limited."""
        index = np.asarray(index, dtype=np.int64)
        table = self.reader.take(self.rows[index], self.columns)
        if not np.array_equal(self.prompt_rows[index], self.rows[index]):
            prompts = self.reader.take(self.prompt_rows[index], ["prompt_ids"])["prompt_ids"]
            table = table.set_column(table.schema.get_field_index("prompt_ids"), "prompt_ids", prompts)
        if with_ref and self.ref is not None:
            ref = self.ref.take(index, ["ref_logprobs"])["ref_logprobs"]
            if "ref_logprobs" in table.column_names:
                table = table.drop_columns(["ref_logprobs"])
            table = table.append_column("ref_logprobs", ref)
        frame = table.to_pandas()
        max_prompt, max_response, overlong = self.limits
        sampler_cut = frame["finish_reason"].eq("length") if "finish_reason" in frame else False
        frame["cut"] = (frame["response_ids"].map(len) > max_response) | sampler_cut  # no answer: at a length limit
        return apply_length_limits(frame, max_prompt, max_response, "truncate")[0]
