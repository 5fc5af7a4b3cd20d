"""Shared fixtures: tiny models and corpora built offline, and one Ray instance of the tests' own."""

from __future__ import annotations

import os
import random

# a test that uses Ray without starting it fails at once instead of starting a default Ray (a machine's worth of
# CPUs, none of the plugin's settings), in which a worker group may wait forever for its resources
os.environ["RAY_ENABLE_AUTO_CONNECT"] = "0"

import pandas as pd
import pytest

from data_prep import synthetic
from dqo_verl.reward.grading import grade


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """(policy_dir, value_dir) of a seeded random tiny Qwen2 and its value model."""
    from data_prep.models import build_value_model
    from data_prep.tiny_model import build_tiny_policy

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
                    **grade(text, p["answer"], "gsm8k"),
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
def ray_temp_dir(tmp_path_factory):
    """The temp dir of the tests' own Ray; at the end of the session that Ray is stopped (nothing else is)."""
    import ray

    yield tmp_path_factory.mktemp("ray")
    if ray.is_initialized():
        ray.shutdown()


@pytest.fixture(scope="module")
def ray_session(ray_temp_dir):
    """A local Ray started by the tests (own temp dir); a test file after one whose code shut it down starts it
    again."""
    import ray

    from dqo_verl.workers.groups import PLUGIN_ENV

    if not ray.is_initialized():
        ray.init(
            num_cpus=8,
            include_dashboard=False,
            _temp_dir=str(ray_temp_dir),
            runtime_env={"env_vars": dict(PLUGIN_ENV)},
            log_to_driver=os.environ.get("DQO_TEST_RAY_LOGS") == "1",
        )


# the test files that take longest (seconds of a clean `make test` here, 2026-12-06), started first: `make test` runs
# two processes that take a file at a time in this order, so the short files fill the end instead of one long file
# running alone
LONGEST_FILES = [
    "test_cluster.py",  # ~300
    "test_demo.py",  # ~250
    "test_train_e2e.py",  # ~155
    "test_corpus.py",  # ~95
    "test_evaluate.py",  # ~85 with the trained tiny policy
    "test_rehearsal.py",  # ~60
    "test_robust.py",  # ~55
    "test_lora.py",  # ~30
    "test_workers.py",  # ~20
]


def pytest_collection_modifyitems(config, items):
    """The longest files first (stable otherwise); GPU-only tests are skipped (not faked) where there is no CUDA
    device."""
    import torch

    rank = {name: i for i, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def trained_tiny_policy(tiny_models, tmp_path_factory):
    """The tiny policy after a short plain-PyTorch SFT on synthetic solutions: it writes ASCII arithmetic
    and stops with eos, so sampled text is meaningful (a random model emits stray bytes). Trained once per
    test run: of `make test`'s two processes, the second waits for the first's (a file lock in the run's
    shared temp folder); tiny_models is seeded, so both start from the same weights."""
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # xdist: pytest-N/popen-gwK
    out = shared / "trained_tiny_policy"
    with FileLock(str(shared / "trained_tiny_policy.lock")):
        if not out.exists():
            train_tiny_policy(tiny_models[0], shared / "trained_tiny_policy.tmp").rename(out)
    return out


def train_tiny_policy(start, out):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(start)
    model = AutoModelForCausalLM.from_pretrained(start, dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    problems = synthetic.make_problems(32 * 60, seed=99)
    for step in range(60):
        batch = problems[step * 32 : (step + 1) * 32]
        seqs = []
        for p in batch:
            prompt = tok.apply_chat_template(
                [{"role": "user", "content": p["question"]}], add_generation_prompt=True, tokenize=True
            )["input_ids"]
            seqs.append((prompt, tok(p["solution"])["input_ids"] + [tok.eos_token_id]))
        width = max(len(a) + len(b) for a, b in seqs)
        ids = torch.full((len(seqs), width), tok.pad_token_id)
        labels = torch.full((len(seqs), width), -100)
        for i, (a, b) in enumerate(seqs):
            ids[i, : len(a) + len(b)] = torch.tensor(a + b)
            labels[i, len(a) : len(a) + len(b)] = torch.tensor(b)
        lengths = torch.tensor([len(a) + len(b) for a, b in seqs])
        loss = model(input_ids=ids, attention_mask=torch.arange(width)[None] < lengths[:, None], labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out
