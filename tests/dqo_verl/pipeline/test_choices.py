"""Every choice-valued key: an unknown value stops the command before any stage (or Ray) starts, with one line
naming the key, the value and the choices."""

import subprocess
import sys
from pathlib import Path

import pytest

from dqo_verl.config.compose import compose_config
from dqo_verl.config.errors import InputError
from dqo_verl.config.stages import Stage
from dqo_verl.pipeline.runner import run_pipeline

REPO = Path(__file__).resolve().parents[3]

CASES = [  # (overrides, the key the error names, the bad value, one of the choices it lists)
    (["pipeline.stages=[train]", "algorithm.name=ppo"], "algorithm.name", "ppo", "dqo"),
    (["pipeline.stages=[corpus]", "rollout.backend=tpu"], "rollout.backend", "tpu", "vllm"),
    (["pipeline.stages=[prompts]", "dataset.name=nope"], "dataset.name", "nope", "gsm8k"),
    (["pipeline.stages=[eval]", "evaluate.sets=[nope]"], "evaluate.sets", "nope", "synthetic"),
    (
        ["pipeline.stages=[eval]", "+evaluate.datasets.synthetic.dataset=nope"],
        "evaluate.datasets.synthetic.dataset",
        "nope",
        "math500",
    ),
    (
        ["pipeline.stages=[eval]", "evaluate.value.model=/v", "evaluate.value.by=[value,v2]"],
        "evaluate.value.by",
        "v2",
        "q",
    ),
    (["pipeline.stages=[process]", "process.strategy=zigzag"], "process.strategy", "zigzag", "binary"),
    (["pipeline.stages=[base]", "models.base.builder=nope"], "models.base.builder", "nope", "tiny"),
    (["pipeline.stages=[nope]"], "pipeline.stages", "nope", "corpus"),
]


@pytest.mark.parametrize(("overrides", "key", "value", "choice"), CASES, ids=[c[1] for c in CASES])
def test_an_unknown_choice_stops_the_pipeline_before_anything_runs(
    tmp_path, monkeypatch, overrides, key, value, choice
):
    cfg = compose_config("tiny_cpu", [f"paths.root={tmp_path}", *overrides])
    # no stage may start (and so no Ray): a stage's function is never even looked up
    monkeypatch.setattr(Stage, "function", lambda self: pytest.fail(f"the {self.name} stage was started"))
    with pytest.raises(InputError) as err:
        run_pipeline(cfg)
    message = str(err.value)
    assert f"{key}={value} is not one of: " in message or f"{key}: {value} is not one of: " in message, message
    assert choice in message.split("is not one of: ")[1].split(", ")
    assert "\n" not in message
    assert not any(tmp_path.iterdir())  # nothing written


def test_the_main_job_names_an_unknown_method_on_a_fresh_checkout(tmp_path):
    """No corpus yet, `algorithm.name=ppo`: one line naming the key and the choices, not a planner traceback."""
    out = subprocess.run(
        [sys.executable, "-m", "dqo_verl.main", "+recipe=tiny_cpu", "algorithm.name=ppo", f"paths.root={tmp_path}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 1
    assert (
        out.stderr.strip().splitlines()[-1]
        == "error: algorithm.name=ppo is not one of: dqo, dro, sft, rs, dpo, kto, verifier"
    )
    assert "Traceback" not in out.stderr


def test_the_eval_stage_checks_its_choices_when_called_directly(tmp_path):
    """`make compare` and `make iterate` call the eval stage's function without the runner: it checks them itself."""
    from dqo_verl.eval import harness

    cfg = compose_config("tiny_cpu", [f"paths.root={tmp_path}", "evaluate.value.model=/v", "evaluate.value.by=[v2]"])
    with pytest.raises(InputError, match="evaluate.value.by=v2 is not one of: value, q"):
        harness.run(cfg)
    assert not any(tmp_path.iterdir())
