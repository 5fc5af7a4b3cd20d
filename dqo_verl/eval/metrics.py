"""Evaluation metrics and tables: accuracy per model, set and decoding (mean ± std over seeds), unbiased
pass@k, the Table-2-style table, and where an evaluation writes.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import DictConfig

from dqo_verl.config.errors import InputError
from dqo_verl.eval.verifier import auroc
from dqo_verl.trainer.checkpoints import epoch_checkpoints


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct: 1 - C(n-c, k) / C(n, k)  (Chen et al., 2021)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def seed_mean_std(accuracies: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1) of per-seed accuracies; std 0 for one seed."""
    a = np.asarray(accuracies, dtype=np.float64)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def within_problem_auroc(samples: pd.DataFrame, score: str) -> tuple[float, int]:
    """The mean over problems with both right and wrong samples of the AUROC of `score` among that problem's
    samples (does the score tell this problem's right answers from its wrong ones), and how many such problems."""
    per = [
        auroc(g[score].to_numpy(), g["score"].to_numpy() == 1)
        for _, g in samples.groupby("uid")
        if g["score"].nunique() == 2
    ]
    return (float(np.mean(per)) if per else float("nan")), len(per)


def best_of_n_chance(samples: pd.DataFrame) -> float:
    """Best-of-N's accuracy under a score with no signal: a random score per distinct response text, samples with
    an extracted answer first (as best-of-N ranks them). Right answers of a problem are often one identical text,
    so this is below the mean accuracy of the samples."""
    chances = []
    for _, g in samples.groupby("uid"):
        answered = g[g["pred"].notna()] if g["pred"].notna().any() else g
        texts = answered.drop_duplicates("response")
        chances.append(float((texts["score"] == 1).mean()))
    return float(np.mean(chances))


def summarize(samples: pd.DataFrame, pass_k: list[int]) -> dict:
    """{model: {column: {...}}} from per-sample results.

    Columns are `<dataset> greedy` (accuracy) and `<dataset> sample` (mean/std over seeds of the
    per-seed accuracy, or for multi-sample sets the mean pass rate and pass@k over problems); each with `cut`, the
    share of its answers that ran into the length limit (finish_reason "length").
    """
    out: dict = {}
    for (model, dataset, decoding), g in samples.groupby(["model", "dataset", "decoding"], sort=False):
        col = f"{dataset} {decoding}"
        if decoding == "greedy":
            res = {"accuracy": float(g["score"].mean()), "n": int(len(g))}
        elif g.groupby(["seed", "uid"]).size().max() > 1:  # several samples per problem (AIME)
            per_problem = g.groupby("uid")["score"].agg(["size", "sum"])
            res = {
                "accuracy": float(g["score"].mean()),
                "n": int(per_problem.shape[0]),
                "samples_per_problem": int(per_problem["size"].iloc[0]),
            }
            for k in pass_k:
                if k <= per_problem["size"].min():
                    res[f"pass@{k}"] = float(np.mean([pass_at_k(int(n), int(c), k) for n, c in per_problem.values]))
            for score, key in (("value", "value_auroc"), ("q_value", "q_auroc"), ("loglik", "loglik_auroc")):
                if score in g and g[score].notna().all() and g["score"].nunique() == 2:
                    res[key] = auroc(g[score].to_numpy(), g["score"].to_numpy() == 1)
                    res[f"{key}_within"], res["problems_mixed"] = within_problem_auroc(g, score)
        else:
            per_seed = g.groupby("seed")["score"].mean().tolist()
            mean, std = seed_mean_std(per_seed)
            res = {"accuracy": mean, "std": std, "seeds": len(per_seed), "n": int(g["uid"].nunique())}
        if "tokens" in g and g["tokens"].notna().all():
            res["tokens_per_problem"] = float(g.groupby("uid")["tokens"].first().mean())
        if decoding.startswith("best-of-"):  # what a score with no signal would pick, from the same N samples
            pool = samples[
                (samples["model"] == model)
                & (samples["dataset"] == dataset)
                & (samples["decoding"] == f"sample x{decoding.split('-')[2].split(' ')[0]}")
            ]
            if len(pool):
                res["chance"] = best_of_n_chance(pool)
        if "finish_reason" in g:  # answers that ran into the length limit (loops, mostly): no final answer
            res["cut"] = float((g["finish_reason"] == "length").mean())
        out.setdefault(model, {})[col] = res
    return out


def cell(res: dict) -> str:
    text = f"{100 * res['accuracy']:.1f}"
    if "std" in res:
        text += f" ± {100 * res['std']:.1f}"
    notes = [f"{k}={100 * v:.1f}" for k, v in res.items() if k.startswith("pass@")]
    for key, label in (("value_auroc", "V"), ("q_auroc", "Q"), ("loglik_auroc", "likelihood")):
        if key in res:
            notes.append(f"{label} AUROC={res[key]:.2f}, within problem {res.get(key + '_within', math.nan):.2f}")
    if "chance" in res:
        notes.append(f"chance {100 * res['chance']:.1f}")
    if "tokens_per_problem" in res:
        notes.append(f"{res['tokens_per_problem']:.0f} tokens/problem")
    if res.get("cut"):
        notes.append(f"cut {100 * res['cut']:.1f}%")
    return text + (f" ({', '.join(notes)})" if notes else "")


def table(summary: dict) -> pd.DataFrame:
    """Rows = models, columns = dataset x decoding, cells = accuracy % (± std over seeds)."""
    columns = list(dict.fromkeys(c for m in summary.values() for c in m))
    return pd.DataFrame({c: {m: cell(summary[m][c]) if c in summary[m] else "" for m in summary} for c in columns})


def model_name(path: str) -> str:
    """A short row label: the folder name, or its last three parts for .../policy or .../huggingface."""
    p = Path(path)
    return "/".join(p.parts[-3:]) if p.name in ("policy", "huggingface") else p.name


def out_dir(cfg: DictConfig) -> Path:
    """Where `eval` writes: evaluate.out_dir, or its `epochs/` folder for the per-epoch table."""
    return Path(cfg.evaluate.out_dir) / ("epochs" if cfg.evaluate.get("epochs") else "")


def models_and_names(cfg: DictConfig) -> tuple[list[str], list[str]]:
    """The models `eval` compares and their row labels.

    With `evaluate.epochs`, the first of evaluate.models (the base) and the policy of every epoch checkpoint
    of the run, labelled `epoch N`: the training curve as one table.
    """
    e = cfg.evaluate
    models = [str(m) for m in e.models]
    names = list(e.names) if e.get("names") else [model_name(m) for m in models]
    if len(names) != len(models):
        raise InputError(f"evaluate.names has {len(names)} labels for {len(models)} evaluate.models")
    if e.get("epochs"):
        epochs = epoch_checkpoints(cfg.trainer.default_local_dir)
        if not epochs:
            raise InputError(
                f"evaluate.epochs: no epoch checkpoint under {cfg.trainer.default_local_dir} (train first)"
            )
        models = models[:1] + [str(folder / "policy" / "huggingface") for folder in epochs.values()]
        names = names[:1] + [f"epoch {epoch}" for epoch in epochs]
    return models, names
