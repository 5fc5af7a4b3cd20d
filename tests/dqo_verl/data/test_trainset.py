"""Training rows read from disk an update at a time, against reading the whole corpus into memory."""

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from verl.utils import tensordict_utils as tu

from dqo_verl.config.compose import compose_config
from dqo_verl.config.errors import RowError, RunError
from dqo_verl.data.schema import apply_length_limits, validate_corpus
from dqo_verl.data.trainset import ParquetRows, TrainSet, scan_corpus
from dqo_verl.trainer import ref_cache


def random_corpus(rows: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    responses = [rng.integers(3, 50, rng.integers(1, 12)).tolist() for _ in range(rows)]
    ends = [sorted({len(r) - 1, *rng.integers(0, len(r), 2).tolist()}) for r in responses]
    return pd.DataFrame(
        {
            "uid": np.arange(rows) // 4,
            "prompt_ids": [rng.integers(3, 50, rng.integers(1, 7)).tolist() for _ in range(rows)],
            "response_ids": responses,
            "score": rng.integers(0, 2, rows).astype(float),
            "segment_ends": ends,
            "process_rewards": [rng.random(len(e)).tolist() for e in ends],
            "response": [f"text {i}" for i in range(rows)],  # a column no trainer reads
        }
    )


def write(df: pd.DataFrame, path, row_group_rows: int):
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), path, row_group_size=row_group_rows)
    return path


def as_lists(df: pd.DataFrame) -> list:
    return [[list(v) if isinstance(v, (list, np.ndarray)) else v for v in row] for row in df.itertuples(index=False)]


def test_rows_are_taken_from_any_row_group_in_any_order_with_repeats(tmp_path):
    df = random_corpus(50)
    files = [write(df.iloc[:23], tmp_path / "a.parquet", 4), write(df.iloc[23:], tmp_path / "b.parquet", 7)]
    reader = ParquetRows(files)
    assert len(reader) == 50 and reader.largest_group == 7
    index = np.random.default_rng(1).integers(0, 50, 40)
    columns = ["prompt_ids", "score", "response_ids"]
    got = reader.take(index, columns).to_pandas()
    assert as_lists(got) == as_lists(df.iloc[index][columns])
    seen = [(start, t.num_rows) for start, t in reader.batches(["score"], rows=5)]
    assert (
        all(n <= 5 for _, n in seen)
        and sum(n for _, n in seen) == 50
        and all(s == sum(n for _, n in seen[:i]) for i, (s, _) in enumerate(seen))
    )


@pytest.mark.parametrize("overlong", ["truncate", "drop"])
def test_train_set_reads_what_the_whole_corpus_in_memory_gives(tmp_path, overlong):
    df = random_corpus(60)
    path = write(df, tmp_path / "c.parquet", 8)
    limits = (5, 8, overlong)
    scan = scan_corpus(ParquetRows([path]), path, ("prompt_ids", "response_ids", "score"), 50, limits)
    whole, stats = apply_length_limits(df.assign(row=np.arange(60)), *limits)  # the in-memory way, row by row
    assert scan.meta.index.tolist() == whole["row"].tolist()
    assert {k: v for k, v in scan.stats.items() if k != "rows"} == stats and scan.stats["rows"] == 60
    assert scan.meta["score"].tolist() == whole["score"].tolist()  # a cut response scores 0
    assert scan.meta["response_len"].tolist() == whole["response_ids"].map(len).tolist()
    assert not scan.has_ref_logprobs

    rows = TrainSet(ParquetRows([path]), scan.meta.index.to_numpy(), scan.meta.index.to_numpy(), limits)
    index = np.random.default_rng(2).permutation(len(rows))[:20]
    got = rows.read(index)
    columns = ["uid", "score", "prompt_ids", "response_ids", "segment_ends", "process_rewards"]
    assert list(got.columns) == [*columns, "cut"]  # texts and other fields stay on disk
    assert as_lists(got[columns]) == as_lists(whole.iloc[index][columns])
    # cut: the response went over the budget (this corpus has no finish_reason: the sampler cut none)
    assert got["cut"].tolist() == (df.loc[scan.meta.index[index], "response_ids"].map(len) > 8).tolist()


@pytest.mark.parametrize("cut_responses", ["failure", "drop", "mask"])
def test_responses_the_sampler_cut_are_flagged_and_dropped_only_when_asked(tmp_path, cut_responses):
    df = random_corpus(30)
    df["finish_reason"] = ["length" if i % 3 == 0 else "stop" for i in range(30)]
    df.loc[5, "finish_reason"] = None  # unknown: not cut
    path = write(df, tmp_path / "c.parquet", 8)
    limits = (99, 99, "truncate")
    scan = scan_corpus(ParquetRows([path]), path, ("prompt_ids", "response_ids", "score"), 50, limits, cut_responses)
    sampler_cut = [i for i in range(30) if i % 3 == 0]
    if cut_responses == "drop":
        assert scan.meta.index.tolist() == [i for i in range(30) if i not in sampler_cut]
        assert scan.stats["cut_by_sampler_dropped"] == 10
    else:
        assert scan.meta.index.tolist() == list(range(30)) and "cut_by_sampler_dropped" not in scan.stats
    rows = TrainSet(ParquetRows([path]), scan.meta.index.to_numpy(), scan.meta.index.to_numpy(), limits)
    got = rows.read(np.arange(len(rows)))
    assert got["cut"].tolist() == [i in sampler_cut for i in scan.meta.index]


def test_a_row_under_another_rows_prompt(tmp_path):
    df = random_corpus(8)
    path = write(df, tmp_path / "c.parquet", 3)
    rows = TrainSet(ParquetRows([path]), np.array([0, 0, 5, 5]), np.array([0, 7, 5, 2]), (99, 99, "truncate"))
    got = rows.read(np.arange(4))
    assert [list(p) for p in got["prompt_ids"]] == [df.at[i, "prompt_ids"] for i in (0, 7, 5, 2)]
    assert [list(r) for r in got["response_ids"]] == [df.at[i, "response_ids"] for i in (0, 0, 5, 5)]


def test_problems_are_named_by_their_row_in_the_whole_corpus(tmp_path):
    df = random_corpus(40)
    df.at[33, "segment_ends"] = [len(df.at[33, "response_ids"])]  # one past the response
    path = write(df, tmp_path / "c.parquet", 6)
    reader = ParquetRows([path])
    with pytest.raises(RowError, match=r"c.parquet, row 33, field 'segment_ends': index outside the response"):
        scan_corpus(reader, path, ("prompt_ids", "response_ids", "score"), 50, (99, 99, "truncate"))
    with pytest.raises(RowError, match="row 33, field 'segment_ends'"):
        validate_corpus(df, path)  # the same check on a frame
    with pytest.raises(RowError, match="field 'ref_logprobs': missing column"):
        scan_corpus(reader, path, ("response_ids", "ref_logprobs"), 50, (99, 99, "truncate"))


class FakeReference:
    """A worker group whose log-prob of a token is -0.01 x the token before it; fails on call `fail_at`."""

    def __init__(self, fail_at: int | None = None):
        self.calls, self.fail_at = [], fail_at

    def infer(self, td, what, **kwargs):
        if len(self.calls) == self.fail_at:
            raise RunError(f"worker group 'policy' failed {what}")
        self.calls.append(what)
        return tu.get_tensordict({"log_probs": td["input_ids"].float() * -0.01})


def test_the_reference_cache_is_written_in_shards_and_a_stopped_computation_resumes(tmp_path, capsys):
    df = random_corpus(64).drop(columns=["segment_ends", "process_rewards"])
    path = write(df, tmp_path / "c.parquet", 16)
    overrides = ["ref.batch_size=16", "ref.shard_rows=16", "policy.engine.infer_micro_batch_size_per_gpu=8"]
    cfg = compose_config("tiny_cpu", [f"data.train_files={path}", *overrides])  # 2 ranks x 8 rows a call

    def attach(group):
        rows = TrainSet(ParquetRows([path]), np.arange(64), np.arange(64), (99, 99, "truncate"))
        ref_cache.attach_ref_logprobs(rows, path, cfg, None, group, None, pad_token_id=0)
        return rows

    with pytest.raises(RunError):
        attach(FakeReference(fail_at=2))  # two shards done, then a failure
    folder = tmp_path / "c.ref"
    assert sorted(p.name for p in folder.iterdir()) == ["part-0000000000.parquet", "part-0000000016.parquet"]
    resumed = FakeReference()
    rows = attach(resumed)
    assert resumed.calls == ["computing reference log-probs of rows 32..", "computing reference log-probs of rows 48.."]
    assert "(2 of 4 shards already cached)" in capsys.readouterr().out
    got = rows.read(np.arange(64))["ref_logprobs"]
    for logps, prompt, response in zip(got, df["prompt_ids"], df["response_ids"]):
        tokens = np.array([*prompt, *response])
        assert np.allclose(logps, -0.01 * tokens[len(prompt) - 1 : -1])  # each token's log-prob, from its state
    reused = FakeReference(fail_at=0)
    attach(reused)  # all cached: no call
    assert "reusing cached reference log-probs" in capsys.readouterr().out

    # another corpus file: every shard is stale and recomputed
    write(df.iloc[::-1], path, 16)
    again = FakeReference()
    attach(again)
    assert len(again.calls) == 4
