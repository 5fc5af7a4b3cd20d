"""The context budget: prompt + response tokens checked against each model's context before any worker starts."""

import pytest
from omegaconf import OmegaConf

from dqo_verl.config.compose import compose_config
from dqo_verl.config.errors import InputError
from dqo_verl.data.budget import check_budget, context_length, engine_config
from dqo_verl.trainer.methods import make_trainer
from dqo_verl.workers.rollout import request_limits


def test_budget_sums_the_keys_and_names_them_when_a_model_is_shorter(tiny_models):
    policy = str(tiny_models[0])
    assert context_length(policy) == 1024
    cfg = OmegaConf.create({"data": {"max_prompt_length": 256, "max_response_length": 768}, "rollout": {"n": 2}})
    keys = ["data.max_prompt_length", "data.max_response_length"]
    assert check_budget(cfg, "corpus", keys, {"policy.model.path": policy}) == 1024  # exactly the context: fine
    cfg.data.max_response_length = 769
    with pytest.raises(InputError) as err:
        check_budget(cfg, "corpus", keys, {"policy.model.path": policy})
    assert str(err.value) == (
        "corpus: the context budget data.max_prompt_length (256) + data.max_response_length (769) = 1025 tokens "
        f"exceeds the context of policy.model.path ({policy}): max_position_embeddings 1024. "
        "Lower them so that they total at most 1024"
    )


def test_engines_are_sized_to_the_budget_unless_the_recipe_sets_it():
    cfg = compose_config("tiny_cpu", [])
    assert engine_config(cfg, 416)["max_model_len"] == 416 and engine_config(cfg, 416)["n"] == 16
    cfg.rollout.max_model_len = 600
    assert engine_config(cfg, 416)["max_model_len"] == 600


def test_request_limits_stay_within_the_sampling_limit():
    assert request_limits({"max_tokens": 8}, None, 3) == [8, 8, 8]
    assert request_limits({"max_tokens": 8}, [3, 20, 0, -4], 4) == [3, 8, 1, 1]


def test_training_over_budget_fails_before_reading_the_corpus(tiny_models, tmp_path):
    policy, value = tiny_models
    cfg = compose_config(
        "tiny_cpu",
        [
            f"policy.model.path={policy}",
            f"value.model.path={value}",
            f"data.train_files={tmp_path}/missing.parquet",
            "data.max_response_length=900",
        ],
    )
    with pytest.raises(
        InputError,
        match=r"^dqo training: the context budget data.max_prompt_length \(256\) \+ "
        r"data.max_response_length \(900\) = 1156 tokens exceeds the context of policy.model.path",
    ):
        make_trainer(cfg)
