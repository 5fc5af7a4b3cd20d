"""The stages of training and evaluation (train, eval, report), declared for the runner and registered in
pyproject.toml (`dqo_verl.stages`) like the data stages. Only declarations: each names its function as
"module:function", imported when the stage runs."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from dqo_verl.config.stages import Stage, data_files, run_files, sft_texts
from dqo_verl.eval.metrics import models_and_names, out_dir
from dqo_verl.trainer.methods import method

TRAINING = (
    "algorithm",
    "data",
    "policy",
    "value",
    "ref",
    "checkpoint",
    "trainer.total_epochs",
    "trainer.total_training_steps",
    "trainer.critic_warmup",
    "trainer.seed",
    "trainer.nnodes",
    "trainer.n_gpus_per_node",
)


def generated_eval_sets(cfg: DictConfig) -> bool:
    return any(name in ("synthetic", "reasoning_gym") for name in cfg.evaluate.sets)


def value_models(cfg: DictConfig) -> list[str]:
    """The models value-guided evaluation reads: the value model, and Q's reference when ranking by Q."""
    v = cfg.evaluate.value
    if not v.model:
        return []
    return [v.model, *([v.reference or cfg.ref.path] if "q" in v.by else [])]


TRAIN = Stage(
    "train",
    "dqo_verl.trainer.job:train",
    checks=("dqo_verl.trainer.methods:check_method",),
    outputs=lambda c: run_files(c, *(f"export/{role}" for role in method(c.algorithm.name).roles)),
    inputs=lambda c: [c.data.train_files, c.policy.model.path, c.value.model.path, c.ref.path],
    keys=TRAINING,
    partial=lambda c: [c.trainer.default_local_dir, *run_files(c, "metrics.jsonl", "tensorboard")],
)

EVAL = Stage(
    "eval",
    "dqo_verl.eval.harness:run",
    checks=("dqo_verl.workers.rollout:check_backend", "dqo_verl.eval.harness:check"),
    outputs=lambda c: [str(out_dir(c) / n) for n in ("summary.json", "table.md", "table.csv", "samples.parquet")],
    inputs=lambda c: [
        *models_and_names(c)[0],
        *(data_files(c, "prompts.parquet") + sft_texts(c) if generated_eval_sets(c) else []),
        *value_models(c),
    ],
    keys=(
        "evaluate",
        "rollout.backend",
        "rollout.dtype",
        "data.max_prompt_length",
        "trainer.seed",
        "algorithm.beta",  # Q's
    ),
)

REPORT = Stage(
    "report",
    "dqo_verl.eval.report:run",
    outputs=lambda c: (
        [str(Path(c.paths.root) / "report.md")]
        + ([str(Path(c.paths.root) / "value_curves.png")] if c.report.value_curves else [])
    ),
    inputs=lambda c: (
        [str(out_dir(c) / "summary.json")] + (run_files(c, "export/value") if c.report.value_curves else [])
    ),
    keys=("report", "process.separator"),
)
