"""The pipeline runner on stages of its own: order, fingerprints, reruns and why, redo, resume, subsets."""

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from dqo_verl import main
from dqo_verl.config.compose import compose_config
from dqo_verl.config.errors import InputError
from dqo_verl.config.stages import Stage
from dqo_verl.pipeline import runner as pipeline
from dqo_verl.pipeline.runner import make_plan, run_pipeline


class Calls:
    """Fake stages a -> b -> c: each writes its output from its input and a config value; `b` can be killed."""

    def __init__(self):
        self.ran: list[str] = []
        self.kill_b = False

    def a(self, cfg):
        self.ran.append("a")
        Path(cfg.root, "a.txt").write_text(f"a{cfg.x.a}")

    def b(self, cfg):
        self.ran.append("b")
        partial = Path(cfg.root, "b_parts")
        partial.mkdir(exist_ok=True)
        done = sorted(p.name for p in partial.iterdir())
        (partial / f"part{len(done)}").write_text("x")
        if self.kill_b:
            raise KeyboardInterrupt("killed")
        Path(cfg.root, "b.txt").write_text(Path(cfg.root, "a.txt").read_text() + f"b{cfg.x.b} parts={len(done) + 1}")

    def c(self, cfg):
        self.ran.append("c")
        Path(cfg.root, "c.txt").write_text(Path(cfg.root, "b.txt").read_text() + Path(cfg.external).read_text())

    def stages(self):
        def out(name):
            return lambda cfg: [str(Path(cfg.root) / name)]

        return (
            Stage("a", self.a, outputs=out("a.txt"), keys=("x.a",)),
            Stage("b", self.b, outputs=out("b.txt"), inputs=out("a.txt"), keys=("x.b",), partial=out("b_parts")),
            Stage("c", self.c, outputs=out("c.txt"), inputs=lambda cfg: [str(Path(cfg.root) / "b.txt"), cfg.external]),
            Stage("unused", lambda cfg: None, outputs=lambda cfg: []),
        )


def config(tmp_path, stages=("a", "b", "c"), redo=None, **x):
    external = tmp_path / "external.txt"
    if not external.exists():
        external.write_text("E")
    return OmegaConf.create(
        {
            "root": str(tmp_path),
            "external": str(external),
            "x": {"a": 1, "b": 1, **x},
            "pipeline": {"stages": list(stages), "redo": redo},
        }
    )


def test_first_run_runs_everything_in_order_and_a_rerun_nothing(tmp_path, capsys):
    calls = Calls()
    run_pipeline(config(tmp_path), calls.stages())
    assert calls.ran == ["a", "b", "c"]
    assert Path(tmp_path, "c.txt").read_text() == "a1b1 parts=1E"
    record = json.loads((tmp_path / ".stages" / "b.json").read_text())
    assert record["status"] == "done" and record["config"] == {"x.b": 1}
    capsys.readouterr()
    run_pipeline(config(tmp_path), calls.stages())
    assert calls.ran == ["a", "b", "c"]  # nothing more
    assert capsys.readouterr().out.count("up to date") == 3


def test_a_changed_config_reruns_that_stage_and_what_depends_on_it_and_says_why(tmp_path, capsys):
    calls = Calls()
    run_pipeline(config(tmp_path), calls.stages())
    capsys.readouterr()
    run_pipeline(config(tmp_path, b=2), calls.stages())
    assert calls.ran == ["a", "b", "c", "b", "c"]
    out = capsys.readouterr().out
    assert "[pipeline] a: up to date" in out
    assert "[pipeline] b: running (x.b: 1 -> 2)" in out
    assert f"[pipeline] c: running (input {tmp_path / 'b.txt'} was remade by `b`)" in out
    assert Path(tmp_path, "c.txt").read_text() == "a1b2 parts=1E"  # b's stale partial work was removed first


def test_a_changed_input_made_elsewhere_reruns_its_reader(tmp_path, capsys):
    calls = Calls()
    run_pipeline(config(tmp_path), calls.stages())
    (tmp_path / "external.txt").write_text("F!")
    capsys.readouterr()
    run_pipeline(config(tmp_path), calls.stages())
    assert calls.ran == ["a", "b", "c", "c"]
    assert f"input {tmp_path / 'external.txt'} changed" in capsys.readouterr().out
    assert Path(tmp_path, "c.txt").read_text() == "a1b1 parts=1F!"


def test_redo_forces_a_stage_and_its_dependents(tmp_path, capsys):
    calls = Calls()
    run_pipeline(config(tmp_path), calls.stages())
    run_pipeline(config(tmp_path, redo="b"), calls.stages())
    assert calls.ran == ["a", "b", "c", "b", "c"]
    assert "b: running (pipeline.redo=b)" in capsys.readouterr().out
    run_pipeline(config(tmp_path, redo="all"), calls.stages())
    assert calls.ran[5:] == ["a", "b", "c"]
    with pytest.raises(InputError, match="pipeline.redo=d is not one of the stages"):
        run_pipeline(config(tmp_path, redo="d"), calls.stages())


def test_a_subset_runs_the_missing_stages_it_needs(tmp_path):
    calls = Calls()
    run_pipeline(config(tmp_path, stages=["b"]), calls.stages())
    assert calls.ran == ["a", "b"]
    run_pipeline(config(tmp_path, stages=["c"]), calls.stages())
    assert calls.ran == ["a", "b", "c"]
    plan = make_plan(config(tmp_path, stages=["a"]), ["a"], calls.stages())
    assert [s.name for s in plan.stages] == ["a"]
    with pytest.raises(InputError, match="pipeline.stages: z is not one of: a, b, c, unused"):
        make_plan(config(tmp_path), ["z"], calls.stages())
    with pytest.raises(InputError, match="this recipe has no `unused` stage"):
        make_plan(config(tmp_path), ["unused"], calls.stages())


def test_a_killed_stage_resumes_its_partial_work_unless_the_config_changed(tmp_path, capsys):
    calls = Calls()
    calls.kill_b = True
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(config(tmp_path), calls.stages())
    assert json.loads((tmp_path / ".stages" / "b.json").read_text())["status"] == "running"
    calls.kill_b = False
    capsys.readouterr()
    run_pipeline(config(tmp_path), calls.stages())
    assert "b: running (resuming an interrupted run)" in capsys.readouterr().out
    assert Path(tmp_path, "b.txt").read_text() == "a1b1 parts=2"  # the killed run's part was kept

    calls.kill_b = True
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(config(tmp_path, redo="b"), calls.stages())
    calls.kill_b = False
    run_pipeline(config(tmp_path, b=3), calls.stages())  # another config: start over
    assert Path(tmp_path, "b.txt").read_text() == "a1b3 parts=1"


def test_a_missing_output_is_remade_and_outputs_made_elsewhere_are_used_as_they_are(tmp_path, capsys):
    calls = Calls()
    run_pipeline(config(tmp_path), calls.stages())
    (tmp_path / "c.txt").unlink()
    capsys.readouterr()
    run_pipeline(config(tmp_path), calls.stages())
    assert calls.ran == ["a", "b", "c", "c"]
    assert f"c: running (output {tmp_path / 'c.txt'} is missing)" in capsys.readouterr().out

    other = tmp_path / "other"
    other.mkdir()
    (other / "a.txt").write_text("handmade")
    calls = Calls()
    run_pipeline(config(other), calls.stages())
    assert calls.ran == ["b", "c"]
    assert "a: " + str(other / "a.txt") + " exists without a record" in capsys.readouterr().out
    assert Path(other, "c.txt").read_text().startswith("handmade")


def test_the_recipes_plan_their_stages_from_inputs_and_outputs():
    tiny = compose_config("tiny_cpu")
    assert [s.name for s in make_plan(tiny, ["eval"]).stages] == [
        "base",
        "sft",
        "value",
        "prompts",
        "corpus",
        "score",
        "train",
        "eval",
    ]
    assert [s.name for s in make_plan(tiny, ["process"]).stages] == [
        "base",
        "sft",
        "prompts",
        "corpus",
        "score",
        "process",
    ]
    ps = compose_config("qwen2_gsm8k_ps")
    assert [s.name for s in make_plan(ps, list(ps.pipeline.stages)).stages] == [
        "prompts",
        "corpus",
        "score",
        "process",
        "train",
        "eval",
        "report",
    ]
    # a policy read from the run's own export: planning `process` needs `train`, which would clear that export
    looped = compose_config("tiny_cpu", ["policy.model.path=outputs/tiny_cpu/run/export/policy", "sft_stage=null"])
    with pytest.raises(InputError, match=r"the train stage would overwrite its own input .*run/export/policy"):
        make_plan(looped, ["process"])
    plain = compose_config("qwen2_gsm8k")
    assert [s.name for s in make_plan(plain, ["train"]).stages] == ["prompts", "corpus", "score", "train"]
    keys = pipeline.config_values(tiny, ("rollout.n", "models.base"))
    assert keys == {
        "rollout.n": 16,
        "models.base.builder": "tiny",
        "models.base.out": "outputs/tiny_cpu/assets/base",
        "models.base.seed": 0,
        "models.base.layers": 2,
    }


def test_the_main_job_without_its_corpus_names_the_stages_to_run(tmp_path):
    root = [f"paths.root={tmp_path}", f"paths.data={tmp_path}/data", f"paths.assets={tmp_path}/assets"]
    with pytest.raises(InputError) as err:
        main.run(compose_config("qwen_numina", root))
    assert str(err.value) == (
        f"data.train_files: {tmp_path}/data/corpus.parquet does not exist; make it first with "
        "`make pipeline RECIPE=qwen_numina STAGES=sft,prompts,corpus,score` (or run the whole pipeline: "
        "`make pipeline RECIPE=qwen_numina`)"
    )
    (tmp_path / "data").mkdir()
    (tmp_path / "assets" / "qwen2.5-qwq").mkdir(parents=True)  # the sft and prompts stages done: only what is
    for name in ("prompts.parquet", "sft.parquet", "sft_tokens.parquet"):  # missing is named
        (tmp_path / "data" / name).write_bytes(b"made")
    with pytest.raises(InputError, match=r"STAGES=corpus,score,process`"):
        main.run(compose_config("qwen_numina_ps", [*root, f"data.train_files={tmp_path}/data/corpus_ps.parquet"]))
    mine = tmp_path / "mine.parquet"  # a corpus of the user's own, not one a stage makes
    with pytest.raises(InputError, match=r"mine.parquet does not exist \(and no stage of this recipe makes it\)$"):
        main.run(compose_config("qwen_numina", [*root, f"data.train_files={mine}"]))


def test_a_run_stops_only_the_ray_it_started(monkeypatch):
    """`ray_scope` (pipeline, compare and iterate runs): a Ray running before is left running (a test session's,
    a notebook's); one started inside is shut down, also when the run fails."""
    import ray

    from dqo_verl.workers.groups import ray_scope

    state = {"up": True, "shutdowns": 0}
    monkeypatch.setattr(ray, "is_initialized", lambda: state["up"])
    monkeypatch.setattr(ray, "shutdown", lambda: state.update(up=False, shutdowns=state["shutdowns"] + 1))
    with ray_scope():
        pass
    assert state == {"up": True, "shutdowns": 0}
    state["up"] = False
    with pytest.raises(RuntimeError), ray_scope():
        state["up"] = True  # the run starts Ray, then fails
        raise RuntimeError("stage failed")
    assert state == {"up": False, "shutdowns": 1}
