"""The stages and prompt sets dqo_verl runs come from entry points; a missing one stops the command naming it."""

import pytest

from dqo_verl.config import plugins
from dqo_verl.config.stages import ORDER, Stage
from dqo_verl.pipeline.runner import registered_stages


def test_every_stage_is_registered_in_order_and_declares_its_function():
    stages = registered_stages()
    assert tuple(s.name for s in stages) == ORDER
    assert all(isinstance(s, Stage) and ":" in s.run for s in stages)
    assert {s.run.split(".")[0] for s in stages} == {"data_prep", "dqo_verl"}
    assert callable(plugins.registered(plugins.PROMPT_SETS, "eval_prompts"))


def test_a_missing_registration_names_the_stage_and_how_to_register_it(monkeypatch):
    real = plugins.entry_points
    monkeypatch.setattr(plugins, "entry_points", lambda group: [ep for ep in real(group=group) if ep.name != "corpus"])
    with pytest.raises(
        plugins.MissingPlugin,
        match="no 'corpus' is registered in the entry-point group 'dqo_verl.stages'.*make install",
    ):
        registered_stages()
