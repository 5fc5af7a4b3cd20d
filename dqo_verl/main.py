"""The main job: `python -m dqo_verl.main +recipe=NAME [key=value ...]`, the same under `ray job submit`.

Trains the method `algorithm.name` (dqo, dro: DQO and its sequence-level variant; sft, rs: fine-tuning on the
corpus or its right answers; dpo, kto: preference baselines; verifier: a plain outcome verifier, the value model
alone) on the corpus `data.train_files`; Ray is started
(or joined: `ray_init.address`, RAY_ADDRESS) only after the corpus has been read and checked.
It is the pipeline's `train` stage on its own, what a cluster user submits once the data stages have run; it
imports no data-generation code (no data_prep, Ray Data, datasets or matplotlib).
"""

from __future__ import annotations

from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from dqo_verl.config.compose import entry_point
from dqo_verl.config.errors import InputError
from dqo_verl.pipeline.runner import stages_to_make  # plans from the stages' declarations only
from dqo_verl.trainer.job import train
from dqo_verl.trainer.methods import method


def recipe_name(config: DictConfig) -> str:
    """The `+recipe=NAME` of this command (the experiment name when not run from the command line)."""
    if HydraConfig.initialized():
        return HydraConfig.get().runtime.choices.get("recipe") or config.trainer.experiment_name
    return config.trainer.experiment_name


def run(config: DictConfig) -> dict:
    """Train `algorithm.name` as configured; returns the last update's metrics."""
    method(config.algorithm.name)  # an unknown method stops here, before anything is read
    corpus = Path(config.data.train_files).expanduser()
    if not corpus.exists():
        todo = stages_to_make(config, "train")
        if not todo:
            raise InputError(f"data.train_files: {corpus} does not exist (and no stage of this recipe makes it)")
        raise InputError(
            f"data.train_files: {corpus} does not exist; make it first with "
            f"`make pipeline RECIPE={recipe_name(config)} STAGES={','.join(todo)}` (or run the whole pipeline: "
            f"`make pipeline RECIPE={recipe_name(config)}`)"
        )
    return train(config)


main = entry_point(run)

if __name__ == "__main__":
    main()
