"""Streaming data stages on Ray Data: shards stream to tasks and actors, written shards are skipped on a rerun,
and the shards join into one file with every row exactly once."""

import pandas as pd
import pyarrow.parquet as pq
import pytest

from data_prep.streaming import StageReport, combine_shards, run_shards
from dqo_verl.data.io import write_parquet_atomic
from dqo_verl.data.shards import shard_path, shard_ranges


def write_shards(folder, ranges, per_row=1):
    for a, b in ranges:
        rows = [{"row": r, "copy": k, "note": None if a == 0 else f"r{r}"} for r in range(a, b) for k in range(per_row)]
        write_parquet_atomic(pd.DataFrame(rows), shard_path(folder, a))


def test_shard_ranges_cover_every_row_once():
    assert shard_ranges(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert shard_ranges(8, 4) == [(0, 4), (4, 8)] and shard_ranges(0, 4) == []


def test_combine_joins_shards_in_order_and_checks_each_shards_rows(tmp_path):
    ranges = shard_ranges(7, 3)
    write_shards(tmp_path / "s", ranges, per_row=2)
    out = tmp_path / "all.parquet"
    assert combine_shards(tmp_path / "s", ranges, out, rows_per_unit=2) == 14
    table = pd.read_parquet(out)
    assert table["row"].tolist() == [r for r in range(7) for _ in range(2)] and table["copy"].tolist() == [0, 1] * 7
    assert table["note"].isna().sum() == 6 and table["note"].iloc[6] == "r3"  # a shard of nulls takes the others' type
    assert pq.ParquetFile(out).metadata.num_row_groups >= 1 and not list(tmp_path.glob(".all.parquet.*"))

    with pytest.raises(
        RuntimeError, match=r"part-0000000000.parquet: 6 rows for the 3 of input rows 0-3; delete it and rerun"
    ):
        combine_shards(tmp_path / "s", ranges, out)  # one row a unit asked: every shard has twice that
    shard_path(tmp_path / "s", 3).unlink()
    with pytest.raises(RuntimeError, match=r"part-0000000003.parquet: missing shard of rows 3-6; rerun the stage"):
        combine_shards(tmp_path / "s", ranges, out, rows_per_unit=2)
    assert pd.read_parquet(out)["row"].tolist() == table["row"].tolist()  # a failed join leaves the last file whole


def test_a_stage_report_sums_shards_per_node_and_the_engines_busy_share():
    report = StageReport(workers=2)
    for t0, t1, node in ((0.0, 4.0, "a"), (0.0, 2.0, "b"), (2.0, 3.0, "b")):
        report.add({"units": 2, "tokens": 10, "t0": t0, "t1": t1, "node": node})
    assert (report.shards, report.units, report.tokens, report.window_s) == (3, 6, 30, 4.0)
    assert report.busy_share == pytest.approx(7 / 8) and report.nodes == {"a": 1, "b": 2}
    assert "node a: 1, node b: 2" in report.line()


@pytest.mark.slow
def test_shards_stream_through_tasks_and_a_rerun_makes_only_the_missing_ones(ray_session, tmp_path):
    from data_prep.streaming import summary

    def squares(batch, folder):  # a local function: Ray pickles it by value
        start, stop = int(batch["start"][0]), int(batch["stop"][0])
        write_parquet_atomic(pd.DataFrame({"x": [r * r for r in range(start, stop)]}), shard_path(folder, start))
        return summary(stop - start, 0, 0.0, 1.0)

    ranges, folder = shard_ranges(11, 3), tmp_path / "shards"
    first = run_shards(squares, ranges, folder, desc="squares", unit="row", tasks=2)
    assert (first.shards, first.units) == (4, 11) and len(first.nodes) == 1
    kept = {a: shard_path(folder, a).stat().st_mtime_ns for a, _ in ranges if a != 6}
    shard_path(folder, 6).unlink()  # a run killed before this shard was written
    again = run_shards(squares, ranges, folder, desc="squares", unit="row", tasks=2)
    assert (again.shards, again.units) == (1, 3)
    assert {a: shard_path(folder, a).stat().st_mtime_ns for a in kept} == kept
    assert run_shards(squares, ranges, folder, desc="squares", unit="row").shards == 0
    combine_shards(folder, ranges, tmp_path / "x.parquet")
    assert pd.read_parquet(tmp_path / "x.parquet")["x"].tolist() == [r * r for r in range(11)]
