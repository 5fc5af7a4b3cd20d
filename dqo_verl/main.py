"""Entry point: `python -m dqo_verl.main +recipe=NAME [key=value ...]` (also under `ray job submit`).

Recipes are the YAML files of `recipes/` (or of $DQO_RECIPES_DIR), registered as the Hydra config
group `recipe`; each is merged over the base config `dqo_verl/config/dqo.yaml`.
`--cfg job` prints the composed config.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

RECIPES_DIR = Path(os.environ.get("DQO_RECIPES_DIR", Path(__file__).resolve().parent.parent / "recipes"))


def register_recipes(recipes_dir: Path = RECIPES_DIR) -> list[str]:
    """Store every recipes_dir/*.yaml as option NAME of the `recipe` group (package _global_)."""
    names = []
    store = ConfigStore.instance()
    for path in sorted(Path(recipes_dir).glob("*.yaml")):
        store.store(group="recipe", name=path.stem, node=OmegaConf.load(path), package="_global_")
        names.append(path.stem)
    return names


def compose_config(recipe: str, overrides: list[str] = ()) -> DictConfig:
    """The config `python -m dqo_verl.main +recipe=RECIPE *overrides` would run with."""
    from hydra import compose, initialize_config_module

    register_recipes()
    with initialize_config_module(config_module="dqo_verl.config", version_base=None):
        return compose("dqo", overrides=[f"+recipe={recipe}", *overrides])


def run(config: DictConfig) -> dict:
    """Start Ray (or join the cluster) and train."""
    from dqo_verl.trainer import DQOTrainer, init_ray, load_training_corpus

    corpus = load_training_corpus(config)  # bad input fails here, before Ray or any worker starts
    init_ray(config)
    trainer = DQOTrainer(config, corpus)
    try:
        return trainer.fit()
    finally:
        trainer.shutdown()


def entry_point(fn: Callable[[DictConfig], object]) -> Callable[[], None]:
    """A command over the base config + recipes: `python -m MODULE +recipe=NAME key=value ...`.

    Errors about the user's input (bad corpus or dataset rows, a failed run) end the command with one
    line on stderr and exit status 1.
    """

    def command(config: DictConfig) -> None:
        from dqo_verl.data import CorpusError
        from dqo_verl.trainer import TrainingError

        try:
            fn(config)
        except (CorpusError, TrainingError, InputError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(1)

    command.__name__ = command.__qualname__ = fn.__name__
    return hydra.main(config_path="pkg://dqo_verl.config", config_name="dqo", version_base=None)(command)


class InputError(ValueError):
    """Bad user input found by a data-preparation command (names the file, row and field)."""


register_recipes()
main = entry_point(run)

if __name__ == "__main__":
    main()
