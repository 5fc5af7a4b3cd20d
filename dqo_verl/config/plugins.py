"""What other packages register for dqo_verl to run (entry points), found by name: the pipeline's stages
(`dqo_verl.stages`) and the builder of evaluation prompt sets (`dqo_verl.prompt_sets`), both from `data_prep`.
dqo_verl never imports `data_prep`; it loads what `pyproject.toml` registers, and a missing registration stops
the command naming it."""

from __future__ import annotations

from importlib.metadata import entry_points

from dqo_verl.config.errors import RunError

STAGES = "dqo_verl.stages"
PROMPT_SETS = "dqo_verl.prompt_sets"


class MissingPlugin(RunError):
    """Nothing is registered under a name dqo_verl needs (the package is not installed, or its metadata is stale)."""


def registered(group: str, name: str):
    """The object registered as `name` in entry-point `group`, loaded."""
    found = [ep for ep in entry_points(group=group) if ep.name == name]
    if not found:
        have = sorted(ep.name for ep in entry_points(group=group))
        raise MissingPlugin(
            f"no {name!r} is registered in the entry-point group {group!r} (registered: {', '.join(have) or 'none'}); "
            f"install the project so that pyproject.toml's entry points are known: `make install` (pip install -e .)"
        )
    return found[0].load()
