"""The checkpoint folder protocol: temp folder, rename, tracker last; pruning; corpus loading messages."""

import json

import pandas as pd
import pytest

from dqo_verl.config.compose import compose_config
from dqo_verl.trainer.base import load_corpus
from dqo_verl.trainer.checkpoints import COMPLETE_MARKER, CheckpointDir, epoch_checkpoints


def writer(content: str, fail_after_first_file: bool = False):
    def write(folder):
        (folder / "policy").mkdir(parents=True)
        (folder / "policy" / "model.pt").write_text(content)
        if fail_after_first_file:
            raise KeyboardInterrupt("killed mid-save")
        (folder / COMPLETE_MARKER).write_text("{}")

    return write


def test_save_renames_then_updates_tracker(tmp_path):
    ckpts = CheckpointDir(tmp_path / "c")
    assert ckpts.latest() is None
    path = ckpts.save(3, writer("a"))
    assert path == tmp_path / "c" / "global_step_3"
    assert ckpts.tracker.read_text() == "3" and ckpts.latest() == path
    assert sorted(p.name for p in ckpts.root.iterdir()) == ["global_step_3", "latest_checkpointed_iteration.txt"]


def test_a_half_written_checkpoint_is_never_picked_up(tmp_path):
    ckpts = CheckpointDir(tmp_path)
    ckpts.save(2, writer("good"))
    with pytest.raises(KeyboardInterrupt):
        ckpts.save(4, writer("partial", fail_after_first_file=True))
    assert (tmp_path / ".global_step_4.tmp").exists()
    assert not (tmp_path / "global_step_4").exists()
    assert ckpts.latest() == tmp_path / "global_step_2"  # and the leftover is cleaned
    assert not (tmp_path / ".global_step_4.tmp").exists()
    # a complete-looking folder the tracker does not name is ignored too
    (tmp_path / "global_step_9").mkdir()
    (tmp_path / "global_step_9" / COMPLETE_MARKER).write_text("{}")
    assert ckpts.latest() == tmp_path / "global_step_2"


def test_writer_must_finish_with_the_marker(tmp_path):
    ckpts = CheckpointDir(tmp_path)
    with pytest.raises(RuntimeError, match=COMPLETE_MARKER):
        ckpts.save(1, lambda folder: folder.mkdir())
    assert ckpts.latest() is None


def test_tracker_naming_a_missing_checkpoint_is_an_error(tmp_path):
    ckpts = CheckpointDir(tmp_path)
    ckpts.save(5, writer("x"))
    ckpts.tracker.write_text("7")
    with pytest.raises(FileNotFoundError, match="global_step_7"):
        ckpts.latest()


def test_resave_of_the_same_step_replaces_it(tmp_path):
    ckpts = CheckpointDir(tmp_path)
    ckpts.save(5, writer("old"))
    ckpts.save(5, writer("new"))
    assert (tmp_path / "global_step_5" / "policy" / "model.pt").read_text() == "new"


def test_prune_keeps_newest_k(tmp_path):
    ckpts = CheckpointDir(tmp_path)
    for step in (2, 4, 6, 8, 10):
        ckpts.save(step, writer(str(step)))
    assert ckpts.prune(None) == [] and ckpts.prune(0) == []
    removed = ckpts.prune(2)
    assert sorted(p.name for p in removed) == ["global_step_2", "global_step_4", "global_step_6"]
    assert sorted(p.name for p in tmp_path.glob("global_step_*")) == ["global_step_10", "global_step_8"]
    ckpts.tracker.write_text("8")  # the tracked one is never removed
    assert ckpts.prune(1) == []


def test_training_corpus_is_checked_and_length_limited_with_counts(tmp_path, capsys, tiny_models):
    path = tmp_path / "c.parquet"
    pd.DataFrame(
        {"prompt_ids": [[1, 2], [1] * 9, [3]], "response_ids": [[4, 5, 6], [7], [8] * 6], "score": [1.0, 0.0, 1.0]}
    ).to_parquet(path)
    cfg = compose_config(
        "tiny_cpu", [f"data.train_files={path}", "data.max_prompt_length=4", "data.max_response_length=4"]
    )
    required, models = ("prompt_ids", "response_ids", "score"), [str(tiny_models[0])]
    _, scan = load_corpus(cfg, required, models)
    assert scan.meta.index.tolist() == [0, 2] and scan.meta["response_len"].tolist() == [3, 4]
    assert scan.meta["score"].tolist() == [1.0, 0.0]  # a cut response has no final answer
    assert "1 rows dropped (prompt > 4 tokens); 1 responses > 4 tokens (truncate)" in capsys.readouterr().out
    cfg.data.overlong = "drop"
    assert load_corpus(cfg, required, models)[1].meta.index.tolist() == [0]


def test_epoch_checkpoints_are_the_complete_ones_that_end_an_epoch(tmp_path):
    for step in (2, 3, 4, 6, 8):
        folder = tmp_path / f"global_step_{step}"
        folder.mkdir()
        if step != 8:  # 8: killed before its marker
            (folder / COMPLETE_MARKER).write_text(json.dumps({"global_step": step, "steps_per_epoch": 2}))
    assert epoch_checkpoints(tmp_path) == {e: tmp_path / f"global_step_{2 * e}" for e in (1, 2, 3)}
