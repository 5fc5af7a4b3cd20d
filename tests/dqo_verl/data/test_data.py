"""Corpus reading, checking and batching (verl's left/right-padded layout)."""

import math

import numpy as np
import pandas as pd
import pytest

from dqo_verl.config.errors import RowError
from dqo_verl.data.io import parquet_metadata, read_jsonl, write_parquet_atomic
from dqo_verl.data.schema import apply_length_limits, validate_corpus
from dqo_verl.data.trainset import open_corpus
from dqo_verl.trainer.batches import BatchSpec, build_batch, epoch_batches

PAD = 0


def rows():
    return pd.DataFrame(
        {
            "prompt_ids": [[5, 6, 7], [8]],
            "response_ids": [[10, 11], [12, 13, 14, 15]],
            "score": [1.0, 0.0],
            "segment_ends": [[0], [1]],
            "process_rewards": [[0.5], [0.25]],
            "ref_logprobs": [[-1.0, -2.0], [-0.1, -0.2, -0.3, -0.4]],
        }
    )


def test_batch_layout_left_prompts_right_responses():
    b = build_batch(rows(), BatchSpec(pad_token_id=PAD))
    assert b["prompts"].tolist() == [[5, 6, 7], [PAD, PAD, 8]]
    assert b["responses"].tolist() == [[10, 11, PAD, PAD], [12, 13, 14, 15]]
    assert b["input_ids"].tolist() == [[5, 6, 7, 10, 11, PAD, PAD], [PAD, PAD, 8, 12, 13, 14, 15]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1, 1]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 3, 4, 4, 4], [0, 0, 0, 1, 2, 3, 4]]
    assert b["response_mask"].tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert b["ref_logprobs"][1].tolist() == pytest.approx([-0.1, -0.2, -0.3, -0.4])
    assert b["ref_logprobs"][0, 2:].tolist() == [0, 0]


def test_rewards_outcome_on_last_token_and_optional_process_rewards():
    outcome = build_batch(rows(), BatchSpec(pad_token_id=PAD))["rewards"]
    assert outcome.tolist() == [[0, 1, 0, 0], [0, 0, 0, 0]]
    with_ps = build_batch(rows(), BatchSpec(pad_token_id=PAD, use_process_rewards=True))["rewards"]
    assert with_ps.tolist() == [[0.5, 1, 0, 0], [0, 0.25, 0, 0]]


@pytest.mark.parametrize(
    "granularity,ends",
    [
        ("token", [[1, 1, 0, 0], [1, 1, 1, 1]]),
        ("step", [[1, 1, 0, 0], [0, 1, 0, 1]]),
        ("sequence", [[0, 1, 0, 0], [0, 0, 0, 1]]),
    ],
)
def test_action_ends_per_granularity(granularity, ends):
    b = build_batch(rows(), BatchSpec(pad_token_id=PAD, granularity=granularity))
    assert b["action_ends"].int().tolist() == ends


def test_process_rewards_required_when_enabled():
    with pytest.raises(ValueError, match="process_rewards"):
        build_batch(rows().drop(columns=["process_rewards"]), BatchSpec(pad_token_id=PAD, use_process_rewards=True))


def bad(column, value, row=1):
    df = rows()
    df[column] = df[column].astype(object)
    df.at[row, column] = value
    return df


@pytest.mark.parametrize(
    "df,row,field,message",
    [
        (rows().drop(columns=["score"]), None, "score", "missing column"),
        (bad("response_ids", []), 1, "response_ids", "empty"),
        (bad("score", float("nan")), 1, "score", "nan"),
        (bad("score", "yes"), 1, "score", "expected a number"),
        (bad("segment_ends", [7]), 1, "segment_ends", "outside the response"),
        (bad("segment_ends", [-1], row=0), 0, "segment_ends", "outside the response"),
        (bad("process_rewards", [math.inf]), 1, "process_rewards", "non-finite"),
        (bad("process_rewards", [0.1, 0.2]), 1, "process_rewards", "one reward per"),
        (bad("ref_logprobs", [0.0]), 1, "ref_logprobs", "1 values for 4"),
        (bad("ref_logprobs", [0.0, float("nan"), 0.0, 0.0]), 1, "ref_logprobs", "non-finite"),
        (bad("prompt_ids", "abc", row=0), 0, "prompt_ids", "expected a list"),
        (bad("response_ids", [1.5, 2.5]), 1, "response_ids", "integers"),
        (bad("response_ids", [12, 99, 14, 15]), 1, "response_ids", "token id 99 outside the vocabulary [0, 50)"),
        (bad("prompt_ids", [-1, 5], row=0), 0, "prompt_ids", "token id -1 outside the vocabulary"),
        (bad("response_ids", [50]), 1, "response_ids", "token id 50 outside"),
    ],
)
def test_validation_names_file_row_and_field(df, row, field, message):
    with pytest.raises(RowError) as err:
        validate_corpus(df, "c.parquet", vocab_size=50)
    text = str(err.value)
    assert text.startswith("c.parquet")
    assert f"field '{field}'" in text and message in text
    assert (f"row {row}," in text) == (row is not None)


def test_valid_corpus_passes_and_missing_file_is_named(tmp_path):
    validate_corpus(rows(), "c.parquet")
    validate_corpus(rows(), "c.parquet", vocab_size=16)  # the largest id is 15
    with pytest.raises(RowError, match="row 1, field 'response_ids': token id 15 outside the vocabulary"):
        validate_corpus(rows(), "c.parquet", vocab_size=15)
    with pytest.raises(RowError, match="row 1, field 'prompt_ids': token id -3"):
        validate_corpus(
            rows().assign(prompt_ids=[[5, 6, 7], [-3]]), "c.parquet"
        )  # negative: bad with no vocabulary too
    with pytest.raises(RowError, match="does not exist"):
        open_corpus(tmp_path / "nope.parquet")
    (tmp_path / "junk.parquet").write_text("not parquet")
    with pytest.raises(RowError, match="junk.parquet.*not a readable parquet"):
        open_corpus(tmp_path / "junk.parquet")


def test_length_limits_truncate_or_drop():
    df = rows()
    truncated, stats = apply_length_limits(df, max_prompt_length=3, max_response_length=3, overlong="truncate")
    assert stats == {"prompt_too_long_dropped": 0, "response_too_long": 1}
    assert truncated.at[1, "response_ids"] == [12, 13, 14]
    assert truncated.at[1, "score"] == 0.0
    assert truncated.at[1, "ref_logprobs"] == pytest.approx([-0.1, -0.2, -0.3])
    assert truncated.at[0, "response_ids"] == [10, 11]
    dropped, _ = apply_length_limits(df, 3, 3, "drop")
    assert len(dropped) == 1 and dropped.at[0, "response_ids"] == [10, 11]
    short_prompts, stats = apply_length_limits(df, 2, 10, "drop")
    assert stats["prompt_too_long_dropped"] == 1 and len(short_prompts) == 1
    cut_segments, _ = apply_length_limits(
        df.assign(segment_ends=[[0], [3]], process_rewards=[[0.5], [0.3]]), 3, 3, "truncate"
    )
    assert cut_segments.at[1, "segment_ends"] == [] and cut_segments.at[1, "process_rewards"] == []
    with pytest.raises(ValueError, match="overlong"):
        apply_length_limits(df, 3, 3, "wrap")


def test_epoch_batches_cover_each_row_at_most_once_and_are_seeded():
    a = epoch_batches(103, 10, seed=1, epoch=0)
    assert len(a) == 10 and all(len(x) == 10 for x in a)
    flat = np.concatenate(a)
    assert len(set(flat.tolist())) == 100
    assert all(np.array_equal(x, y) for x, y in zip(a, epoch_batches(103, 10, seed=1, epoch=0)))
    assert not np.array_equal(np.concatenate(epoch_batches(103, 10, seed=1, epoch=1)), flat)
    assert np.array_equal(np.concatenate(epoch_batches(20, 10, 1, 0, shuffle=False)), np.arange(20))


def test_atomic_parquet_write_keeps_metadata_and_leaves_no_temp(tmp_path):
    path = tmp_path / "x.parquet"
    write_parquet_atomic(rows(), path, metadata={"dqo.k": "v"})
    assert parquet_metadata(path)["dqo.k"] == "v"
    assert pd.read_parquet(path)["score"].tolist() == [1.0, 0.0]
    assert [p.name for p in tmp_path.iterdir()] == ["x.parquet"]

    before = path.read_bytes()
    with pytest.raises(Exception):  # noqa: B017 - whatever pyarrow raises for an unserialisable frame
        write_parquet_atomic(pd.DataFrame({"a": [object()]}), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["x.parquet"]


def test_read_jsonl_returns_the_records_skipping_blank_lines_and_nothing_for_a_missing_file(tmp_path):
    path = tmp_path / "metrics.jsonl"
    assert read_jsonl(path) == []
    path.write_text('{"step": 2, "policy/loss": 0.5}\n\n{"step": 1, "policy/loss": 0.75}\n')
    assert read_jsonl(path) == [{"step": 2, "policy/loss": 0.5}, {"step": 1, "policy/loss": 0.75}]
