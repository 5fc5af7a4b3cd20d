"""Evaluation harness (paper §5.2, Tables 2/3/9): policies x datasets x decodings -> a Table-2-style report.

`python -m dqo_verl.evaluate +recipe=NAME evaluate.models=[dir1,dir2]` (or `make eval RECIPE=NAME
CKPTS="dir1 dir2"`) evaluates HF checkpoints (e.g. `export/policy` or a checkpoint's
`policy/huggingface`) on the recipe's evaluation sets, with the training prompt templates, on the
rollout worker group (vLLM, transformers fallback):

- greedy decoding, and sampling (temperature 0.7, top_p 0.9, top_k 16, min_p 0.01) over 5 seeds,
  reported as mean +- std (sample std over the seeds);
- AIME24: 30 samples per problem, the mean pass rate, and unbiased pass@k for `evaluate.pass_k`.

Writes `${evaluate.out_dir}/samples.parquet` (model, dataset, decoding, seed, prompt, response,
pred, score), `table.md`, `table.csv` and `summary.json`, and prints the table.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf

from dqo_verl.data import write_parquet_atomic
from dqo_verl.main import InputError, entry_point


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct: 1 - C(n-c, k) / C(n, k)  (Chen et al., 2021)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def seed_mean_std(accuracies: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1) of per-seed accuracies; std 0 for one seed."""
    a = np.asarray(accuracies, dtype=np.float64)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def summarize(samples: pd.DataFrame, pass_k: list[int]) -> dict:
    """{model: {column: {...}}} from per-sample results.

    Columns are `<dataset> greedy` (accuracy) and `<dataset> sample` (mean/std over seeds of the
    per-seed accuracy, or for multi-sample sets the mean pass rate and pass@k over problems).
    """
    out: dict = {}
    for (model, dataset, decoding), g in samples.groupby(["model", "dataset", "decoding"], sort=False):
        col = f"{dataset} {decoding}"
        if decoding == "greedy":
            res = {"accuracy": float(g["score"].mean()), "n": int(len(g))}
        elif g.groupby(["seed", "uid"]).size().max() > 1:  # several samples per problem (AIME)
            per_problem = g.groupby("uid")["score"].agg(["size", "sum"])
            res = {"accuracy": float(g["score"].mean()), "n": int(per_problem.shape[0]),
                   "samples_per_problem": int(per_problem["size"].iloc[0])}
            for k in pass_k:
                if k <= per_problem["size"].min():
                    res[f"pass@{k}"] = float(np.mean([pass_at_k(int(n), int(c), k) for n, c in per_problem.values]))
        else:
            per_seed = g.groupby("seed")["score"].mean().tolist()
            mean, std = seed_mean_std(per_seed)
            res = {"accuracy": mean, "std": std, "seeds": len(per_seed), "n": int(g["uid"].nunique())}
        out.setdefault(model, {})[col] = res
    return out


def cell(res: dict) -> str:
    text = f"{100 * res['accuracy']:.1f}"
    if "std" in res:
        text += f" ± {100 * res['std']:.1f}"
    passes = [f"{k}={100 * v:.1f}" for k, v in res.items() if k.startswith("pass@")]
    return text + (f" ({', '.join(passes)})" if passes else "")


def table(summary: dict) -> pd.DataFrame:
    """Rows = models, columns = dataset x decoding, cells = accuracy % (± std over seeds)."""
    columns = list(dict.fromkeys(c for m in summary.values() for c in m))
    return pd.DataFrame({c: {m: cell(summary[m][c]) if c in summary[m] else "" for m in summary} for c in columns})


def seen_questions(data_dir: Path) -> set[str]:
    """Prompt texts of the training prompts, SFT and dev sets under `data_dir` (kept out of generated test sets)."""
    seen = set()
    for name in ("prompts.parquet", "sft.parquet", "dev.parquet"):
        if (data_dir / name).exists():
            seen.update(m[0]["content"] for m in pd.read_parquet(data_dir / name, columns=["prompt"])["prompt"])
    return seen


def eval_prompts(name: str, spec: DictConfig, seed: int, data_dir: Path) -> pd.DataFrame:
    """The first `limit` problems of an evaluation set (prompt rows, training templates)."""
    from data_prep.prompts import build_prompts, build_reasoning_gym_prompts, build_synthetic_prompts, synthetic_difficulty

    if name == "synthetic":
        df = build_synthetic_prompts(spec.limit, seed=10**6 + seed, exclude=seen_questions(data_dir), split="test",
                                     difficulty=synthetic_difficulty(spec.get("difficulty")))
    elif name == "reasoning_gym":
        df = build_reasoning_gym_prompts(spec.task, spec.limit, seed=10**6 + seed, split="test", config=spec.get("config"),
                                         exclude=seen_questions(data_dir))
    else:
        df, _ = build_prompts(spec.get("dataset", name), spec.get("path"), spec.get("split", "test"))
    limit = spec.get("limit")
    return df.head(limit).reset_index(drop=True) if limit else df


def evaluate_model(model: str, name: str, datasets: dict, cfg: DictConfig) -> list[dict]:
    """Per-sample results of one model on every dataset and decoding."""
    from verl.utils import hf_tokenizer

    from data_prep.corpus import engines_per_node
    from data_prep.prompts import add_prompt_ids
    from dqo_verl.grading import grade_many
    from dqo_verl.rollout import RolloutGroup, sample_seed

    e = cfg.evaluate
    tokenizer = hf_tokenizer(model)
    rollout = {**OmegaConf.to_container(cfg.rollout, resolve=True),
               "max_model_len": cfg.data.max_prompt_length + e.max_tokens}
    group = RolloutGroup(rollout, model, cfg.trainer.nnodes, engines_per_node(cfg))
    rows = []
    try:
        for dataset, prompts in datasets.items():
            prompts = add_prompt_ids(prompts, tokenizer)
            spec = e.datasets[dataset]
            runs = []
            if e.greedy:
                runs.append(("greedy", 0, 1, {"temperature": 0.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0}))
            per_problem = spec.get("samples", 1)
            sampling = {k: e.sampling[k] for k in ("temperature", "top_p", "top_k", "min_p")}
            seeds = [e.sampling.seeds[0]] if per_problem > 1 else list(e.sampling.seeds)
            runs += [("sample", s, per_problem, sampling) for s in seeds]
            for decoding, seed, n, params in runs:
                reqs = [(uid, j) for uid in range(len(prompts)) for j in range(n)]
                outs = group.generate([prompts.iloc[u]["prompt_ids"] for u, _ in reqs],
                                      [sample_seed(seed, u, j) for u, j in reqs], {**params, "max_tokens": e.max_tokens})
                graded = grade_many([(o["response"], prompts.iloc[u]["reward_model"]["ground_truth"], prompts.iloc[u]["data_source"])
                                     for (u, _), o in zip(reqs, outs)], cfg.score.workers, desc=f"grading {dataset}")
                for (u, j), o, g in zip(reqs, outs, graded):
                    rows.append({"model": name, "path": model, "dataset": dataset, "decoding": decoding, "seed": seed,
                                 "uid": u, "sample": j, "prompt": prompts.iloc[u]["prompt"][0]["content"],
                                 "response": o["response"], "pred": g["pred"], "score": g["score"],
                                 "finish_reason": o["finish_reason"]})
    finally:
        group.shutdown()
    return rows


def model_name(path: str) -> str:
    """A short row label: the folder name, or its last three parts for .../policy or .../huggingface."""
    p = Path(path)
    return "/".join(p.parts[-3:]) if p.name in ("policy", "huggingface") else p.name


def run(cfg: DictConfig) -> dict:
    from dqo_verl.trainer import init_ray

    e = cfg.evaluate
    models = [str(m) for m in e.models]
    if not models:
        raise SystemExit("no models: set evaluate.models=[dir,...] (or CKPTS=... with make eval)")
    for m in models:  # a local folder that is missing (a hub name has exactly one "/")
        if not Path(m).exists() and (m.startswith(("/", ".", "outputs")) or m.count("/") != 1):
            raise InputError(f"evaluate.models: {m} does not exist (train or export it first, e.g. `make demo`)")
    names = list(e.names) if e.get("names") else [model_name(m) for m in models]
    datasets = {name: eval_prompts(name, e.datasets[name], cfg.trainer.seed, Path(cfg.paths.data)) for name in e.sets}
    init_ray(cfg)
    rows = [r for model, name in zip(models, names) for r in evaluate_model(model, name, datasets, cfg)]
    samples = pd.DataFrame(rows)
    out = Path(e.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_parquet_atomic(samples, out / "samples.parquet")
    summary = summarize(samples, list(e.pass_k))
    report = table(summary)
    (out / "table.md").write_text(report.to_markdown() + "\n")
    report.to_csv(out / "table.csv")
    (out / "summary.json").write_text(json.dumps({"models": dict(zip(names, models)), "results": summary}, indent=2) + "\n")
    print(report.to_markdown())
    print(f"[eval] -> {out} (samples.parquet, table.md, table.csv, summary.json)")
    return summary


main = entry_point(run)

if __name__ == "__main__":
    main()
