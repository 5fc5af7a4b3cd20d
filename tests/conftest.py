"""Shared fixtures: tiny models and corpora built offline, and one Ray instance of the tests' own."""

from __future__ import annotations

import os
import random

import pandas as pd
import pytest

from dqo_verl import synthetic
from dqo_verl.grading import grade


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """(policy_dir, value_dir) of a seeded random tiny Qwen2 and its value model."""
    from dqo_verl.tiny_model import build_tiny_policy, build_value_model

    root = tmp_path_factory.mktemp("tiny")
    policy = build_tiny_policy(root / "policy", seed=0)
    value = build_value_model(policy, root / "value", seed=0)
    return policy, value


def make_corpus(tokenizer, n_prompts: int, per_prompt: int, seed: int = 0) -> pd.DataFrame:
    """Synthetic prompts with gold and corrupted solutions as responses, graded 1/0, with segment ends."""
    rng = random.Random(seed)
    rows = []
    for uid, p in enumerate(synthetic.make_problems(n_prompts, seed=seed)):
        prompt_ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": p["question"]}], add_generation_prompt=True, tokenize=True
        )["input_ids"]
        for k in range(per_prompt):
            text = p["solution"]
            if k % 2:
                text = text.rsplit("#### ", 1)[0] + f"#### {int(p['answer']) + rng.randint(1, 9)}"
            ids = tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
            offsets, pos = [], 0
            for seg in text.split("\n\n")[:-1]:
                pos += len(seg) + 2
                offsets.append(pos - 1)
            rows.append(
                {
                    "data_source": synthetic.DATA_SOURCE,
                    "uid": uid,
                    "prompt_ids": prompt_ids,
                    "response_ids": ids,
                    "response": text,
                    **grade(text, p["answer"], synthetic.DATA_SOURCE),
                    "segment_ends": offsets,
                    "process_rewards": [0.1] * len(offsets),
                }
            )
    return pd.DataFrame(rows)


@pytest.fixture(scope="session")
def tiny_corpus(tiny_models, tmp_path_factory):
    """A 64-row corpus parquet for the tiny policy (half correct)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_models[0])
    path = tmp_path_factory.mktemp("corpus") / "corpus.parquet"
    make_corpus(tokenizer, n_prompts=16, per_prompt=4).to_parquet(path)
    return path


@pytest.fixture(scope="session")
def ray_session(tmp_path_factory):
    """A local Ray started by the tests (own temp dir), stopped at the end; nothing else is touched."""
    import ray

    from dqo_verl.trainer import PLUGIN_ENV

    if ray.is_initialized():
        yield
        return
    temp_dir = tmp_path_factory.mktemp("ray")
    ray.init(
        num_cpus=8,
        include_dashboard=False,
        _temp_dir=str(temp_dir),
        runtime_env={"env_vars": dict(PLUGIN_ENV)},
        log_to_driver=os.environ.get("DQO_TEST_RAY_LOGS") == "1",
    )
    yield
    ray.shutdown()


def pytest_collection_modifyitems(config, items):
    """GPU-only tests are skipped (not faked) where there is no CUDA device."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
