"""Hydra composition: the base config with a recipe and method settings, and the command entry point.

`python -m dqo_verl.main +recipe=NAME key=value ...` and `python -m dqo_verl.pipeline +recipe=NAME ...`
compose the base config `dqo_verl/config/dqo.yaml` with `recipes/NAME.yaml` (or `$DQO_RECIPES_DIR/NAME.yaml`),
registered as the Hydra config group `recipe`; `--cfg job` prints the composed config. Commands end on an
InputError or RunError (`errors.py`) with one line.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import hydra
from hydra import compose, initialize_config_module
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from dqo_verl.config.errors import InputError, RunError

RECIPES_DIR = Path(os.environ.get("DQO_RECIPES_DIR", Path(__file__).resolve().parents[2] / "recipes"))


def register_recipes(recipes_dir: Path = RECIPES_DIR) -> list[str]:
    """Store every recipes_dir/*.yaml as option NAME of the `recipe` group (package _global_)."""
    names = []
    store = ConfigStore.instance()
    for path in sorted(Path(recipes_dir).glob("*.yaml")):
        store.store(group="recipe", name=path.stem, node=OmegaConf.load(path), package="_global_")
        names.append(path.stem)
    return names


def overridden_keys(overrides: list[str]) -> list[str]:
    """The config keys that command-line overrides (`key=value`, `+key=value`) set."""
    return [o.split("=", 1)[0].lstrip("+") for o in overrides if "=" in o and not o.startswith("~")]


def with_command_line(config: DictConfig, section: str) -> DictConfig:
    """`config` with `<section>.recipe` and `<section>.overrides` set from the running command's recipe and
    overrides: what a command that composes runs of its own (compare, iterate) passes on to each."""
    hydra_cfg = HydraConfig.get() if HydraConfig.initialized() else None
    choices = hydra_cfg.runtime.choices if hydra_cfg else {}
    overrides = [o for o in (hydra_cfg.overrides.task if hydra_cfg else []) if not o.startswith("+recipe=")]
    return OmegaConf.merge(config, {section: {"recipe": choices.get("recipe"), "overrides": overrides}})


def raw_overrides(section: DictConfig) -> list[str]:
    """`section.overrides` (a command line's overrides kept in the config) as typed: `${paths.data}/x` stays an
    interpolation for the config it is applied to, not the value it had where it was stored."""
    return OmegaConf.to_container(section.overrides, resolve=False)


def with_method_settings(config: DictConfig, overrides: list[str] = ()) -> DictConfig:
    """`methods.<algorithm.name>` (a recipe's settings for that method, e.g. paper A.2's DPO lr and batch size)
    merged over the config; keys set on the command line (`overrides`) keep their values."""
    block = (config.get("methods") or {}).get(config.algorithm.name)
    if not block:
        return config
    kept = {}
    for key in overridden_keys(list(overrides)):
        value = OmegaConf.select(config, key, default=None)
        if value is not None:
            kept[key] = value
    merged = OmegaConf.merge(config, block)
    for key, value in kept.items():
        OmegaConf.update(merged, key, value, merge=False)
    return merged


def compose_config(recipe: str, overrides: list[str] = ()) -> DictConfig:
    """The config that `python -m dqo_verl.main +recipe=RECIPE *overrides` runs with."""
    register_recipes()
    if GlobalHydra.instance().is_initialized():  # inside a command (e.g. `compare` composing each run's config)
        return with_method_settings(compose("dqo", overrides=[f"+recipe={recipe}", *overrides]), overrides)
    with initialize_config_module(config_module="dqo_verl.config", version_base=None):
        return with_method_settings(compose("dqo", overrides=[f"+recipe={recipe}", *overrides]), overrides)


def entry_point(fn: Callable[[DictConfig], object]) -> Callable[[], None]:
    """`python -m MODULE +recipe=NAME key=value ...` running `fn(config)`.

    InputError and RunError end the command with one line on stderr (`error: ...`) and exit status 1.
    """

    def command(config: DictConfig) -> None:
        try:
            fn(with_method_settings(config, HydraConfig.get().overrides.task))
        except (InputError, RunError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(1)

    command.__name__ = command.__qualname__ = fn.__name__
    register_recipes()
    return hydra.main(config_path="pkg://dqo_verl.config", config_name="dqo", version_base=None)(command)
