"""The stage contract: what a pipeline stage runs, reads, writes and depends on.

Stages are declared beside the code they run (`data_prep.stages`: base ... baselines; `dqo_verl.pipeline.stages`:
train, eval, report) and registered as entry points (`dqo_verl.stages` in pyproject.toml); the runner finds them
by name, in `ORDER`. A stage names its function as "module:function", imported only when it runs, so planning a
run (or the main job naming the stages that make a missing corpus) imports no stage's code.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

# every stage, in data-flow order: a stage comes after the stages whose outputs it reads
ORDER = ("base", "sft", "value", "prompts", "corpus", "score", "process", "baselines", "train", "eval", "report")

# what a corpus depends on in the rollout section (not engine counts, cache sizes or shard sizes)
SAMPLING = (
    "rollout.backend",
    "rollout.dtype",
    "rollout.temperature",
    "rollout.top_p",
    "rollout.top_k",
    "rollout.min_p",
    "rollout.max_tokens",
    "rollout.seed",
)


def data_files(cfg: DictConfig, *names: str) -> list[str]:
    """Files under `paths.data`."""
    return [str(Path(cfg.paths.data) / name) for name in names]


def run_files(cfg: DictConfig, *names: str) -> list[str]:
    """Files under the training run's folder, `trainer.output_dir`."""
    return [str(Path(cfg.trainer.output_dir) / name) for name in names]


def sft_texts(cfg: DictConfig) -> list[str]:
    """The sft stage's text files that evaluation keeps out of generated test sets."""
    sft = cfg.sft_stage
    return (
        data_files(cfg, "sft.parquet", *(["dev.parquet"] if sft.get("target_accuracy") is not None else []))
        if sft
        else []
    )


@dataclass(frozen=True)
class Stage:
    """One stage: what it runs, reads, writes and depends on; `outputs` is empty when a recipe lacks the stage."""

    name: str
    run: str | Callable[[DictConfig], object]  # "module:function" (or the function), taking the config
    outputs: Callable[[DictConfig], list[str]]
    inputs: Callable[[DictConfig], list[str]] = lambda cfg: []
    keys: tuple[str, ...] = ()  # config entries the result depends on
    partial: Callable[[DictConfig], list[str]] = lambda cfg: []  # resumable work of an interrupted run
    # "module:function"s raising an InputError for a config value the stage cannot run with (an unknown choice):
    # the runner checks every planned stage before any runs
    checks: tuple[str | Callable[[DictConfig], object], ...] = ()

    def function(self) -> Callable[[DictConfig], object]:
        """The stage's function, imported now."""
        return _load(self.run)

    def validate(self, cfg: DictConfig) -> None:
        """The stage's checks of `cfg`."""
        for check in self.checks:
            _load(check)(cfg)


def _load(ref: str | Callable) -> Callable:
    if callable(ref):
        return ref
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)
