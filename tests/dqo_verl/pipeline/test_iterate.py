"""`make iterate`: the config of a round after the first, the corpus statistics and the table (one round end to
end runs in test_demo.py, after the short demo)."""

import json
from pathlib import Path

import pandas as pd
import pytest
from omegaconf import OmegaConf

from dqo_verl.config.compose import compose_config, raw_overrides
from dqo_verl.config.errors import InputError
from dqo_verl.pipeline import iterate
from dqo_verl.pipeline import runner as pipeline


def first_round(tmp_path, *extra):
    overrides = [f"paths.root={tmp_path}", *extra]
    cfg = compose_config("tiny_cpu", overrides)
    return OmegaConf.merge(cfg, {"iterate": {"recipe": "tiny_cpu", "overrides": overrides}})


@pytest.mark.parametrize("reference", ["original", "last"])
def test_round_r_continues_from_the_last_round_in_folders_of_its_own(tmp_path, reference):
    first = first_round(tmp_path)
    original = Path(first.policy.model.path)
    for r, previous in ((2, tmp_path / "run"), (3, tmp_path / "iterate" / "round2" / "run")):
        cfg = compose_config("tiny_cpu", [*raw_overrides(first.iterate), *iterate.round_overrides(first, r, reference)])
        folder = tmp_path / "iterate" / f"round{r}"
        assert Path(cfg.policy.model.path) == previous / "export" / "policy"
        assert Path(cfg.value.model.path) == previous / "export" / "value" and cfg.value.zero_head is False
        assert Path(cfg.ref.path) == (original if reference == "original" else previous / "export" / "policy")
        assert Path(cfg.data.train_files) == folder / "data" / "corpus.parquet"
        assert Path(cfg.trainer.default_local_dir).is_relative_to(folder / "run")
        assert [Path(m) for m in cfg.evaluate.models] == [folder / "run" / "export" / "policy"]
        assert list(cfg.evaluate.names) == [f"round {r}"] and cfg.evaluate.value.model is None
        # the planner builds no model and warms nothing up: the round's models are the last round's
        plan = pipeline.make_plan(cfg, list(cfg.pipeline.stages))
        assert [s.name for s in plan.stages] == ["prompts", "corpus", "score", "train", "eval"]
        assert cfg.algorithm == first.algorithm and cfg.policy.optim == first.policy.optim


def test_process_rewards_add_the_process_stage_and_value_decodings_use_the_rounds_value(tmp_path):
    first = first_round(
        tmp_path,
        "algorithm.use_process_rewards=true",
        "data.train_files=${paths.data}/corpus_ps.parquet",
        "evaluate.value.model=somewhere/value",
    )
    assert iterate.round_stages(first) == ["corpus", "score", "process", "train", "eval"]
    cfg = compose_config("tiny_cpu", [*raw_overrides(first.iterate), *iterate.round_overrides(first, 2, "original")])
    assert Path(cfg.data.train_files) == tmp_path / "iterate" / "round2" / "data" / "corpus_ps.parquet"
    assert Path(cfg.evaluate.value.model) == tmp_path / "iterate" / "round2" / "run" / "export" / "value"
    with pytest.raises(InputError, match="iterate.reference=first is not one of original, last"):
        iterate.round_overrides(first, 2, "first")


def test_corpus_stats_and_the_table(tmp_path):
    corpus = pd.DataFrame(
        {
            "uid": ["a", "a", "b", "b", "c", "c", "c", "c"],
            "score": [1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0],
            "response_ids": [[1], [1, 2], [1, 2, 3], [1], [1], [1], [1], [1, 2, 3, 4, 5, 6, 7]],
        }
    )
    stats = iterate.corpus_stats(corpus)
    assert stats == {
        "responses": 8,
        "right %": 50.0,
        "prompts with a right answer %": pytest.approx(200 / 3),
        "response tokens": 17 / 8,
    }
    summary = tmp_path / "summary.json"
    results = {"base": {"synthetic greedy": {"accuracy": 0.25}}, "dqo": {"synthetic greedy": {"accuracy": 0.5}}}
    summary.write_text(json.dumps({"results": results}))
    assert iterate.accuracies(summary, "dqo") == {"synthetic greedy": 50.0}
    with pytest.raises(InputError, match="no model 'round 2'"):
        iterate.accuracies(summary, "round 2")
    table = pd.DataFrame([{"round": 0, "synthetic greedy": 25.0}, {"round": 1, "synthetic greedy": 50.0}])
    assert iterate.plot_rounds(table, ["synthetic greedy"], tmp_path / "a.png").read_bytes()[:4] == b"\x89PNG"


def test_round_one_must_evaluate_the_trained_policy(tmp_path):
    first = first_round(tmp_path)
    assert iterate.first_round_names(first) == ("base", "dqo")
    with pytest.raises(InputError, match="must include the trained policy"):
        iterate.first_round_names(first_round(tmp_path, "evaluate.models=[a/b]", "evaluate.names=[x]"))


def test_a_literal_corpus_path_on_the_command_line_still_gives_each_round_its_own(tmp_path, monkeypatch):
    first = first_round(tmp_path, f"data.train_files={tmp_path}/data/corpus.parquet")
    cfg = iterate.round_config(first, 2)
    assert Path(cfg.data.train_files) == tmp_path / "iterate" / "round2" / "data" / "corpus.parquet"
    # the guard: a round that would train on another round's corpus is refused before any work
    keep = iterate.round_overrides
    monkeypatch.setattr(
        iterate, "round_overrides", lambda *a: [o for o in keep(*a) if not o.startswith("data.train_files=")]
    )
    with pytest.raises(InputError, match="iterate round 2: the train stage would read .*/data/corpus.parquet, outside"):
        iterate.round_config(first, 2)


def test_share_links_once_and_follows_a_remade_source(tmp_path):
    src, dst = tmp_path / "a.parquet", tmp_path / "round" / "a.parquet"
    dst.parent.mkdir()
    src.write_text("one")
    iterate.share(src, dst)
    iterate.share(src, dst)  # already that file: nothing to do
    assert dst.read_text() == "one" and dst.stat().st_ino == src.stat().st_ino
    tmp = tmp_path / "new"
    tmp.write_text("two")
    tmp.replace(src)  # round 1's file remade (atomically, as the stages write)
    iterate.share(src, dst)
    assert dst.read_text() == "two" and not list(dst.parent.glob(".*"))
