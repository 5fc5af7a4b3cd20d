"""Evaluation harness, value inspector and training curves."""

import itertools
import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import AutoModelForTokenClassification, AutoTokenizer

from data_prep import synthetic
from data_prep.sources import eval_prompts
from dqo_verl.config.compose import compose_config
from dqo_verl.config.errors import InputError
from dqo_verl.eval.inspect_values import segment_values
from dqo_verl.eval.metrics import models_and_names, out_dir, pass_at_k, seed_mean_std, summarize, table
from dqo_verl.eval.plot_metrics import plot_run
from dqo_verl.trainer.checkpoints import COMPLETE_MARKER


def test_synthetic_test_set_excludes_training_sft_and_dev_questions(tmp_path):
    from omegaconf import OmegaConf

    spec = OmegaConf.create({"limit": 30})
    first = eval_prompts("synthetic", spec, 0, tmp_path)
    questions = first["prompt"].map(lambda m: m[0]["content"]).tolist()
    for name, picked in (("prompts", questions[:2]), ("sft", questions[2:4]), ("dev", questions[4:6])):
        pd.DataFrame({"prompt": [[{"role": "user", "content": q}] for q in picked]}).to_parquet(
            tmp_path / f"{name}.parquet"
        )
    again = eval_prompts("synthetic", spec, 0, tmp_path)["prompt"].map(lambda m: m[0]["content"]).tolist()
    assert len(again) == 30 and not set(questions[:6]) & set(again)
    assert set(questions[6:]) <= set(again)  # the rest of the set is unchanged


def test_synthetic_dev_set_is_disjoint_from_the_test_set_and_the_same_for_every_training_seed(tmp_path):
    from omegaconf import OmegaConf

    from data_prep.sources import DEV_EXCLUDES_TEST

    def questions(spec: dict, seed: int = 0) -> list[str]:
        rows = eval_prompts("synthetic_dev", OmegaConf.create(spec), seed, tmp_path)
        return rows["prompt"].map(lambda m: m[0]["content"]).tolist()

    dev = questions({"dataset": "synthetic", "split": "dev", "limit": 200})
    test = questions({"dataset": "synthetic", "limit": DEV_EXCLUDES_TEST})
    assert len(dev) == 200 and len(set(dev)) == 200 and not set(dev) & set(test)
    assert questions({"dataset": "synthetic", "split": "dev", "limit": 200}) == dev  # one seed, one set
    assert questions({"dataset": "synthetic", "split": "dev", "limit": 200}, seed=1) != dev
    with pytest.raises(InputError, match="split=train is not one of"):
        questions({"dataset": "synthetic", "split": "train", "limit": 5})


@pytest.mark.parametrize("n,c,k", [(5, 0, 1), (5, 1, 1), (5, 2, 2), (6, 3, 3), (8, 1, 4), (7, 6, 2), (4, 4, 3)])
def test_pass_at_k_equals_subset_enumeration(n, c, k):
    samples = [1] * c + [0] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    want = sum(any(samples[i] for i in s) for s in subsets) / len(subsets)
    assert pass_at_k(n, c, k) == pytest.approx(want)


def test_seed_mean_std_is_the_sample_std():
    mean, std = seed_mean_std([0.5, 0.6, 0.7])
    assert mean == pytest.approx(0.6) and std == pytest.approx(0.1)
    assert seed_mean_std([0.4]) == (0.4, 0.0)


def crafted_results():
    rows = []
    for uid in range(4):  # greedy: 3 of 4 right
        rows.append(
            {
                "model": "A",
                "dataset": "gsm8k",
                "decoding": "greedy",
                "seed": 0,
                "uid": uid,
                "sample": 0,
                "score": float(uid < 3),
            }
        )
    per_seed = {0: 2, 1: 3, 2: 4, 3: 3, 4: 3}  # right answers of 5 problems per seed
    for seed, right in per_seed.items():
        for uid in range(5):
            rows.append(
                {
                    "model": "A",
                    "dataset": "gsm8k",
                    "decoding": "sample",
                    "seed": seed,
                    "uid": uid,
                    "sample": 0,
                    "score": float(uid < right),
                }
            )
    correct = {0: 0, 1: 1, 2: 3}  # AIME-like: 4 samples per problem
    for uid, c in correct.items():
        for j in range(4):
            rows.append(
                {
                    "model": "A",
                    "dataset": "aime24",
                    "decoding": "sample",
                    "seed": 0,
                    "uid": uid,
                    "sample": j,
                    "score": float(j < c),
                }
            )
    return pd.DataFrame(rows)


def test_summary_of_crafted_results():
    s = summarize(crafted_results(), pass_k=[1, 2, 8])["A"]
    assert s["gsm8k greedy"] == {"accuracy": 0.75, "n": 4}
    accs = [0.4, 0.6, 0.8, 0.6, 0.6]
    assert s["gsm8k sample"]["accuracy"] == pytest.approx(sum(accs) / 5)
    mean = sum(accs) / 5
    assert s["gsm8k sample"]["std"] == pytest.approx(math.sqrt(sum((a - mean) ** 2 for a in accs) / 4))
    assert s["gsm8k sample"]["seeds"] == 5
    aime = s["aime24 sample"]
    assert aime["accuracy"] == pytest.approx(4 / 12) and aime["samples_per_problem"] == 4
    assert aime["pass@1"] == pytest.approx((0 + 1 / 4 + 3 / 4) / 3)
    assert aime["pass@2"] == pytest.approx((0 + (1 - math.comb(3, 2) / math.comb(4, 2)) + 1) / 3)
    assert "pass@8" not in aime  # more than the samples per problem
    t = table(summarize(crafted_results(), [1]))
    assert t.loc["A", "gsm8k greedy"] == "75.0"
    assert t.loc["A", "gsm8k sample"].startswith("60.0 ± 14.1")
    assert t.loc["A", "aime24 sample"] == "33.3 (pass@1=33.3)"


def test_the_summary_reports_the_share_of_answers_cut_at_the_length_limit():
    rows = crafted_results()
    rows["finish_reason"] = ["length" if i % 4 == 0 else "stop" for i in range(len(rows))]
    s = summarize(rows, pass_k=[1])["A"]
    for col, g in rows.groupby(rows["dataset"] + " " + rows["decoding"]):
        assert s[col]["cut"] == pytest.approx((g["finish_reason"] == "length").mean())
    greedy = s["gsm8k greedy"]
    assert greedy["cut"] > 0 and f"cut {100 * greedy['cut']:.1f}%" in table({"A": s}).loc["A", "gsm8k greedy"]
    assert "cut" not in summarize(crafted_results(), pass_k=[1])["A"]["gsm8k greedy"]  # no finish_reason column


def gsm8k_file(tmp_path, n):
    rows = [{"question": p["question"], "answer": p["solution"]} for p in synthetic.make_problems(n, seed=77)]
    path = tmp_path / "gsm8k_test.parquet"
    pd.DataFrame(rows).to_parquet(path)
    return path


def aime_file(tmp_path):
    rows = [
        {
            "ID": f"2024-I-{i}",
            "Year": 2024,
            "Problem Number": i,
            "Question": p["question"],
            "Answer": p["answer"],
            "Part": "I",
        }
        for i, p in enumerate(synthetic.make_problems(3, seed=78), start=1)
        if int(p["answer"]) < 1000
    ]
    path = tmp_path / "aime.parquet"
    pd.DataFrame(rows).to_parquet(path)
    return path


@pytest.mark.slow
@pytest.mark.parametrize(
    "backend", ["hf"]
)  # vLLM evaluates in the demo and rehearsal tests (test_demo, test_rehearsal)
def test_evaluate_tiny_models_on_local_files(ray_session, tiny_models, trained_tiny_policy, tmp_path, backend, capsys):
    from dqo_verl.config.compose import compose_config
    from dqo_verl.eval.harness import run

    cfg = compose_config(
        "tiny_cpu",
        [
            f"evaluate.models=[{tiny_models[0]},{trained_tiny_policy}]",
            "evaluate.names=[random,trained]",
            f"evaluate.out_dir={tmp_path / 'eval'}",
            "evaluate.sets=[synthetic,gsm8k,aime24]",
            "evaluate.datasets.synthetic.limit=6",
            f"evaluate.datasets.gsm8k.path={gsm8k_file(tmp_path, 8)}",
            "evaluate.datasets.gsm8k.max_tokens=16",
            f"evaluate.datasets.aime24.path={aime_file(tmp_path)}",
            "evaluate.datasets.aime24.samples=4",
            "evaluate.sampling.seeds=[0,1]",
            "evaluate.pass_k=[1,2]",
            f"rollout.backend={backend}",
            "evaluate.max_tokens=64",
            f"evaluate.value.model={tiny_models[1]}",
            "evaluate.value.n=4",
            "evaluate.value.sets=[synthetic,aime24]",
            "evaluate.value.beam={beams:2,k:2,max_rounds:4}",
            "evaluate.value.by=[value,q]",
            f"evaluate.value.reference={tiny_models[0]}",
        ],
    )
    summary = run(cfg)
    printed = capsys.readouterr().out
    samples = pd.read_parquet(tmp_path / "eval" / "samples.parquet")
    n_aime = len(pd.read_parquet(aime_file(tmp_path)))
    # greedy, 2 seeds (4 samples on aime24), and (not on gsm8k) 4 value-guided samples, the 2 answers chosen from
    # them by V, by Q, by the policy's likelihood and by vote, and the answers of the beams by V and by Q
    per_model = 6 * (1 + 2) + 8 * (1 + 2) + n_aime * (1 + 4) + (6 + n_aime) * (4 + 4 + 2)
    assert len(samples) == 2 * per_model
    assert set(samples["score"]) <= {0.0, 1.0}
    assert set(summary) == {"random", "trained"}
    decodings = ("greedy", "sample", "sample x4", "best-of-4 (V)", "best-of-4 (Q)", "best-of-4 (likelihood)")
    decodings += ("majority@4",)
    decodings += ("value beam 2x2", "Q beam 2x2")
    assert set(summary["trained"]) == {f"{d} {m}" for d in ("synthetic", "aime24") for m in decodings} | {
        "gsm8k greedy",
        "gsm8k sample",
    }  # evaluate.value.sets: not on gsm8k
    # best-of-N takes the sample of highest score among those with an answer (all when none has one), majority the
    # most frequent answer, of the same 4
    best_of = ["best-of-4 (V)", "best-of-4 (Q)", "best-of-4 (likelihood)"]
    guided = samples[samples["decoding"].isin(["sample x4", *best_of, "majority@4"])]
    q_spread = {"random": [], "trained": []}
    for (model, _, _), g in guided.groupby(["model", "dataset", "uid"]):
        pool = g[g["decoding"] == "sample x4"]
        voted = g[g["decoding"] == "majority@4"].iloc[0]
        ranked = pool[pool["pred"].notna()] if pool["pred"].notna().any() else pool
        assert len(pool) == 4
        for decoding, score in zip(best_of, ("value", "q_value", "loglik")):
            assert g[g["decoding"] == decoding].iloc[0][score] == ranked[score].max(), decoding
        q_spread[model].append(np.ptp(pool["q_value"]))
        counts = pool["pred"].value_counts()
        assert voted["sample"] == 0 if counts.empty else counts[voted["pred"]] == counts.max()  # no answers: the first
        assert g["tokens"].nunique() == 1 and g["tokens"].iloc[0] >= pool["response"].str.len().sum() > 0
    # Q of a whole response is V(s_0) + beta * its log-ratio: V(s_0) alone for the policy that is the reference
    assert max(q_spread["random"]) < 1e-5 < max(q_spread["trained"])
    for by in ("value", "Q"):
        beams = samples[samples["decoding"] == f"{by} beam 2x2"]
        assert (beams["tokens"] >= beams["response"].str.len()).all() and beams["value"].notna().all()
        assert summary["trained"][f"synthetic {by} beam 2x2"]["tokens_per_problem"] > 0
    # the two beams rank by different scores: on the same problems their answers' scores differ
    by_v, by_q = (samples[samples["decoding"] == f"{by} beam 2x2"]["value"].to_numpy() for by in ("value", "Q"))
    assert not np.allclose(by_v, by_q)
    synthetic = summary["trained"]["synthetic sample x4"]
    right = samples[
        (samples["model"] == "trained") & (samples["dataset"] == "synthetic") & (samples["decoding"] == "sample x4")
    ]
    mixed = right["score"].nunique() == 2
    assert ("value_auroc" in synthetic) == mixed == ("q_auroc" in synthetic) == ("loglik_auroc" in synthetic)
    assert ("value_auroc_within" in synthetic) == mixed and "pass@2" in synthetic
    assert 0 <= summary["trained"]["synthetic best-of-4 (V)"]["chance"] <= 1
    assert np.isfinite(right["loglik"]).all() and (right["loglik"] <= 0).all()
    assert summary["trained"]["synthetic best-of-4 (V)"]["tokens_per_problem"] == synthetic["tokens_per_problem"] > 0
    assert summary["trained"]["synthetic sample"]["seeds"] == 2
    assert "pass@2" in summary["trained"]["aime24 sample"]
    assert summary["random"]["synthetic greedy"]["accuracy"] == 0.0  # a random model never writes '#### n'
    assert "| trained" in printed and (tmp_path / "eval" / "table.csv").exists()
    assert json.loads((tmp_path / "eval" / "summary.json").read_text())["models"]["trained"] == str(trained_tiny_policy)
    greedy = samples[(samples["decoding"] == "greedy") & (samples["model"] == "trained")]
    assert greedy.groupby("dataset").size().to_dict() == {"synthetic": 6, "gsm8k": 8, "aime24": n_aime}
    # gsm8k's own max_tokens (16), the others' evaluate.max_tokens (64): one character per token here
    lengths = samples.groupby("dataset")["response"].agg(lambda r: r.str.len().max())
    assert lengths["gsm8k"] <= 16 < lengths["synthetic"] <= 64


def test_value_inspector_matches_prefix_forwards(tiny_models):
    tok = AutoTokenizer.from_pretrained(tiny_models[1])
    model = AutoModelForTokenClassification.from_pretrained(tiny_models[1], dtype=torch.float32).eval()
    with torch.no_grad():  # make the values non-trivial: a trained-looking score head
        model.score.weight.mul_(50.0)
    p = synthetic.make_problems(1, seed=3, difficulty=synthetic.Difficulty(min_events=3, max_events=3))[0]
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": p["question"]}], add_generation_prompt=True, tokenize=True
    )["input_ids"]
    response = tok(p["solution"])["input_ids"] + [tok.eos_token_id]
    df = segment_values(model, tok, prompt, response)
    segments = p["solution"].split("\n\n")
    assert len(df) == len(segments)  # the prompt, then after each segment but the last
    for i, row in df.iterrows():
        prefix_text = "".join(s + "\n\n" for s in segments[:i])
        ids = prompt + tok(prefix_text)["input_ids"] if i else prompt
        with torch.no_grad():
            direct = model(torch.tensor([ids])).logits[0, -1, 0].item()  # V of the state after the prefix
        assert row["value"] == pytest.approx(direct, abs=1e-5)
        assert row["text"] == (segments[i - 1] + "\n\n" if i else "")
    assert df["value"].std() > 0


def test_training_curves(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    records = [
        {
            "step": s,
            "policy/loss": 1 / s,
            "value/loss": 2 / s,
            "dqo/is_weight_mean": 1.0,
            "dqo/kl_seq_mean": 0.01 * s,
            "dqo/v_first_mean": 0.1 * s,
        }
        for s in range(1, 6)
    ]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    summary = tmp_path / "summary.json"
    summary.write_text(
        json.dumps(
            {
                "models": {
                    "a": "/x/checkpoints/global_step_2/policy/huggingface",
                    "b": "/x/checkpoints/global_step_4/policy/huggingface",
                    "base": "/m/base",
                },
                "results": {
                    "a": {"synthetic greedy": {"accuracy": 0.4}},
                    "b": {"synthetic greedy": {"accuracy": 0.5}},
                    "base": {"synthetic greedy": {"accuracy": 0.3}},
                },
            }
        )
    )
    written = plot_run(run_dir, [summary])
    assert sorted(p.name for p in written) == ["accuracy.png", "is_weights.png", "kl.png", "losses.png", "values.png"]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in written)


def test_eval_epochs_compares_the_base_with_every_epoch_checkpoint(tmp_path):
    cfg = compose_config("qwen2_gsm8k", [f"paths.root={tmp_path}", "evaluate.epochs=true"])
    with pytest.raises(InputError, match="evaluate.epochs: no epoch checkpoint under"):
        models_and_names(cfg)
    ckpts = tmp_path / "run" / "checkpoints"
    for step in (35, 70, 100, 105):  # 35 updates per epoch; 100 is a save_freq checkpoint inside epoch 3
        (ckpts / f"global_step_{step}").mkdir(parents=True)
        (ckpts / f"global_step_{step}" / COMPLETE_MARKER).write_text(
            json.dumps({"global_step": step, "steps_per_epoch": 35})
        )
    models, names = models_and_names(cfg)
    assert names == ["base", "epoch 1", "epoch 2", "epoch 3"]
    assert models == ["Qwen/Qwen2-7B-Instruct"] + [
        str(ckpts / f"global_step_{s}" / "policy" / "huggingface") for s in (35, 70, 105)
    ]
    assert out_dir(cfg) == tmp_path / "eval" / "epochs"
    plain = compose_config("qwen2_gsm8k", [f"paths.root={tmp_path}"])
    assert models_and_names(plain) == (["Qwen/Qwen2-7B-Instruct", f"{tmp_path}/run/export/policy"], ["base", "dqo"])
    assert out_dir(plain) == tmp_path / "eval"
