"""Sharded, resumable outputs: a long job's output is written as shards, row ranges [start, stop) of its input,
each its own parquet file `part-<start>.parquet` written atomically. A rerun finds the finished shards by name and
makes only the rest. Used by the streaming data stages and by the reference log-prob cache."""

from __future__ import annotations

from pathlib import Path

SHARD_GLOB = "part-*.parquet"


def shard_path(folder: str | Path, start: int) -> Path:
    """The file of the shard that starts at input row `start`."""
    return Path(folder) / f"part-{start:010d}.parquet"


def shard_ranges(rows: int, size: int) -> list[tuple[int, int]]:
    """[start, stop) row ranges of `size` rows (the last may be shorter) covering `rows` rows."""
    return [(a, min(a + size, rows)) for a in range(0, rows, size)]
