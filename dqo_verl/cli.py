"""What every command shares: the Hydra config (base + recipes) and the two kinds of error a user sees.

`python -m dqo_verl.main +recipe=NAME key=value ...` and `python -m dqo_verl.pipeline +recipe=NAME ...`
compose the base config `dqo_verl/config/dqo.yaml` with `recipes/NAME.yaml` (or `$DQO_RECIPES_DIR/NAME.yaml`),
registered as the Hydra config group `recipe`; `--cfg job` prints the composed config.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import hydra
from hydra import compose, initialize_config_module
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

RECIPES_DIR = Path(os.environ.get("DQO_RECIPES_DIR", Path(__file__).resolve().parent.parent / "recipes"))


class InputError(ValueError):
    """Bad user input: the message names the file, row and field (or the config key) at fault."""


class RunError(RuntimeError):
    """A job that cannot go on (a worker group failed, a loss or gradient is not finite); finished work stands."""


def register_recipes(recipes_dir: Path = RECIPES_DIR) -> list[str]:
    """Store every recipes_dir/*.yaml as option NAME of the `recipe` group (package _global_)."""
    names = []
    store = ConfigStore.instance()
    for path in sorted(Path(recipes_dir).glob("*.yaml")):
        store.store(group="recipe", name=path.stem, node=OmegaConf.load(path), package="_global_")
        names.append(path.stem)
    return names


def compose_config(recipe: str, overrides: list[str] = ()) -> DictConfig:
    """The config that `python -m dqo_verl.main +recipe=RECIPE *overrides` runs with."""
    register_recipes()
    with initialize_config_module(config_module="dqo_verl.config", version_base=None):
        return compose("dqo", overrides=[f"+recipe={recipe}", *overrides])


def entry_point(fn: Callable[[DictConfig], object]) -> Callable[[], None]:
    """`python -m MODULE +recipe=NAME key=value ...` running `fn(config)`.

    InputError and RunError end the command with one line on stderr (`error: ...`) and exit status 1.
    """

    def command(config: DictConfig) -> None:
        try:
            fn(config)
        except (InputError, RunError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(1)

    command.__name__ = command.__qualname__ = fn.__name__
    register_recipes()
    return hydra.main(config_path="pkg://dqo_verl.config", config_name="dqo", version_base=None)(command)
