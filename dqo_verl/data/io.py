"""Atomic writes: parquet and JSON files, and whole folders, written under a temporary name and renamed, so a
killed job never leaves a half-written output; and the reader of JSON-lines logs (a run's metrics.jsonl).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

# rows per parquet row group in what we write: a trainer reading an update's rows decodes the groups they lie in
ROW_GROUP_ROWS = 256


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


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The records of a JSON-lines file (blank lines skipped); empty when the file does not exist."""
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def parquet_metadata(path: str | os.PathLike) -> dict:
    """Schema metadata of a parquet file as str -> str."""
    meta = pq.read_schema(path).metadata or {}
    return {k.decode(): v.decode() for k, v in meta.items()}


def build_folder(out: Path, fill: Callable[[Path], object]) -> Path:
    """`fill(tmp)` writes a temporary folder beside `out`, which is then renamed to `out`."""
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    fill(tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.rename(tmp, out)
    return out
