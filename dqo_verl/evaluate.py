"""Evaluation harness (paper §5.2, Tables 2/3/9): policies x datasets x decodings -> a Table-2-style report.

The `eval` stage (`make eval RECIPE=NAME CKPTS="dir1 dir2"`, or `evaluate.models=[dir1,dir2]`) evaluates
HF checkpoints (e.g. `export/policy` or a checkpoint's `policy/huggingface`) on the recipe's
evaluation sets, with the training prompt templates, on the rollout worker group (vLLM or transformers):

- greedy decoding, and sampling (temperature 0.7, top_p 0.9, top_k 16, min_p 0.01) over 5 seeds,
  reported as mean +- std (sample std over the seeds);
- AIME24: 30 samples per problem, the mean pass rate, and unbiased pass@k for `evaluate.pass_k`.

Writes `${evaluate.out_dir}/samples.parquet` (model, dataset, decoding, seed, prompt, response,
pred, score), `table.md`, `table.csv` and `summary.json`, and prints the table.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import DictConfig
from verl.utils import hf_tokenizer

from dqo_verl.budget import check_budget, engine_config
from dqo_verl.checkpoints import epoch_checkpoints
from dqo_verl.cli import InputError
from dqo_verl.data import write_json_atomic, write_parquet_atomic
from dqo_verl.grading import grade_many
from dqo_verl.prompts import (
    add_prompt_ids,
    answer_format,
    build_prompts,
    build_reasoning_gym_prompts,
    build_synthetic_prompts,
    synthetic_difficulty,
)
from dqo_verl.rollout import RolloutGroup, sample_seed
from dqo_verl.search import ValueBeam, best_by_value, majority_vote, run_beams
from dqo_verl.values import ValueGroup, final_value, step_q
from dqo_verl.verifier import auroc
from dqo_verl.workers import engines_per_node, init_ray

GREEDY = {"temperature": 0.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0}
BEAM_LABELS = {"value": "value", "q": "Q"}  # evaluate.value.by -> the beam column's name


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
            res = {
                "accuracy": float(g["score"].mean()),
                "n": int(per_problem.shape[0]),
                "samples_per_problem": int(per_problem["size"].iloc[0]),
            }
            for k in pass_k:
                if k <= per_problem["size"].min():
                    res[f"pass@{k}"] = float(np.mean([pass_at_k(int(n), int(c), k) for n, c in per_problem.values]))
            for score, key in (("value", "value_auroc"), ("q_value", "q_auroc")):
                if score in g and g[score].notna().all() and g["score"].nunique() == 2:
                    res[key] = auroc(g[score].to_numpy(), g["score"].to_numpy() == 1)
        else:
            per_seed = g.groupby("seed")["score"].mean().tolist()
            mean, std = seed_mean_std(per_seed)
            res = {"accuracy": mean, "std": std, "seeds": len(per_seed), "n": int(g["uid"].nunique())}
        if "tokens" in g and g["tokens"].notna().all():
            res["tokens_per_problem"] = float(g.groupby("uid")["tokens"].first().mean())
        out.setdefault(model, {})[col] = res
    return out


def cell(res: dict) -> str:
    text = f"{100 * res['accuracy']:.1f}"
    if "std" in res:
        text += f" ± {100 * res['std']:.1f}"
    notes = [f"{k}={100 * v:.1f}" for k, v in res.items() if k.startswith("pass@")]
    if "value_auroc" in res:
        notes.append(f"V AUROC={res['value_auroc']:.2f}")
    if "q_auroc" in res:
        notes.append(f"Q AUROC={res['q_auroc']:.2f}")
    if "tokens_per_problem" in res:
        notes.append(f"{res['tokens_per_problem']:.0f} tokens/problem")
    return text + (f" ({', '.join(notes)})" if notes else "")


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
    if name == "synthetic":
        df = build_synthetic_prompts(
            spec.limit,
            seed=10**6 + seed,
            exclude=seen_questions(data_dir),
            split="test",
            difficulty=synthetic_difficulty(spec.get("difficulty")),
        )
    elif name == "reasoning_gym":
        df = build_reasoning_gym_prompts(
            spec.task,
            spec.limit,
            seed=10**6 + seed,
            split="test",
            config=spec.get("config"),
            exclude=seen_questions(data_dir),
        )
    else:
        df, _ = build_prompts(spec.get("dataset", name), spec.get("path"), spec.get("split", "test"))
    limit = spec.get("limit")
    return df.head(limit).reset_index(drop=True) if limit else df


def check_prompt_lengths(datasets: dict[str, pd.DataFrame], limit: int) -> None:
    """An InputError naming the first evaluation prompt longer than data.max_prompt_length (the engines' budget)."""
    for name, prompts in datasets.items():
        lengths = prompts["prompt_ids"].map(len)
        if (lengths > limit).any():
            row = int((lengths > limit).idxmax())
            raise InputError(
                f"evaluation set {name}, row {row}, field 'prompt': {lengths[row]} tokens, more than "
                f"data.max_prompt_length={limit} (raise it, within the model's context, or set a `limit`)"
            )


def grade_answers(
    prompts: pd.DataFrame, uids: list[int], texts: list[str], workers: int | None, desc: str
) -> list[dict]:
    """Grade each text as an answer to prompt row `uid`, in its source's answer format."""
    return grade_many(
        [
            (text, prompts.iloc[u]["reward_model"]["ground_truth"], answer_format(prompts.iloc[u]["data_source"]))
            for u, text in zip(uids, texts)
        ],
        workers,
        desc=desc,
    )


def sample_and_grade(
    group: RolloutGroup,
    prompts: pd.DataFrame,
    n: int,
    seed: int,
    params: dict,
    workers: int | None = None,
    desc: str = "grading",
) -> list[dict]:
    """`n` samples of every prompt (rows with `prompt_ids`), graded: one dict per sample, in (prompt, sample) order."""
    requests = [(uid, j) for uid in range(len(prompts)) for j in range(n)]
    outs = group.generate(
        [prompts.iloc[u]["prompt_ids"] for u, _ in requests], [sample_seed(seed, u, j) for u, j in requests], params
    )
    graded = grade_answers(prompts, [u for u, _ in requests], [o["response"] for o in outs], workers, desc)
    return [
        {
            "uid": u,
            "sample": j,
            "response": o["response"],
            "response_ids": list(o["response_ids"]),
            "finish_reason": o["finish_reason"],
            **g,
        }
        for (u, j), o, g in zip(requests, outs, graded)
    ]


def greedy_accuracy(group: RolloutGroup, prompts: pd.DataFrame, max_tokens: int, workers: int | None = None) -> float:
    """Greedy accuracy of the group's model on `prompts`."""
    results = sample_and_grade(group, prompts, 1, 0, {**GREEDY, "max_tokens": max_tokens}, workers)
    return float(np.mean([r["score"] for r in results]))


def value_guided(
    results: list[dict], prompts: pd.DataFrame, values: ValueGroup, eos_token_id: int, beta: float | None = None
) -> list[dict]:
    """N samples per problem -> the samples with their final value (decoding `sample xN`), and per problem the
    sample with the highest value (`best-of-N (V)`) and the one majority voting picks (`majority@N`); given
    `beta` (value workers serving log-ratios), also each sample's Q estimate of its outcome, V(s_0) + beta *
    log(pi/pi_ref) of the whole response, and the sample with the highest (`best-of-N (Q)`). Every row carries
    the tokens its problem's N samples cost."""
    n = max(r["sample"] for r in results) + 1
    requests = ([prompts.iloc[r["uid"]]["prompt_ids"] for r in results], [r["response_ids"] for r in results])
    if beta is None:
        state_values = values.state_values(*requests)
    else:
        state_values, ratios = values.values_and_log_ratios(*requests)
        for r, v, lr in zip(results, state_values, ratios):
            r["q_value"] = step_q(v, lr, 0, beta)
    for r, v in zip(results, state_values):
        r["value"] = final_value(v, r["response_ids"], eos_token_id)
    by_problem: dict[int, list[dict]] = {}
    for r in results:
        by_problem.setdefault(r["uid"], []).append(r)
    rows = []
    for group in by_problem.values():
        tokens = sum(len(r["response_ids"]) for r in group)
        rows += [{**r, "decoding": f"sample x{n}", "tokens": tokens} for r in group]
        picks = {"V": best_by_value([r["value"] for r in group])}
        if beta is not None:
            picks["Q"] = best_by_value([r["q_value"] for r in group])
        rows += [{**group[i], "decoding": f"best-of-{n} ({by})", "tokens": tokens} for by, i in picks.items()]
        rows += [{**group[majority_vote([r["pred"] for r in group])], "decoding": f"majority@{n}", "tokens": tokens}]
    return rows


def beam_and_grade(
    group: RolloutGroup,
    values: ValueGroup,
    prompts: pd.DataFrame,
    seed: int,
    params: dict,
    tokenizer,
    beam: DictConfig,
    workers: int | None = None,
    beta: float | None = None,
) -> list[dict]:
    """Step-level beam search for every prompt (`search.ValueBeam`; steps end at blank lines), by V of the new
    prefix or, given `beta` and value workers serving log-ratios (`load_policies`), by Q of the step;
    graded: one dict per prompt with the best finished beam, its score and the tokens the search generated."""
    max_tokens, eos = params["max_tokens"], tokenizer.eos_token_id
    searches = [ValueBeam(beam.beams, beam.k, beam.max_rounds) for _ in range(len(prompts))]
    prompt_ids = [list(p) for p in prompts["prompt_ids"]]
    rounds = [0]

    def expand(requests, k):
        # a seed per (problem, round, beam of that problem, continuation): independent of the other problems
        beam_of, count = [], Counter()
        for i, _ in requests:
            beam_of.append(count[i])
            count[i] += 1
        reqs = [(i, prefix, b, j) for (i, prefix), b in zip(requests, beam_of) for j in range(k)]
        outs = group.generate(
            [prompt_ids[i] + list(prefix) for i, prefix, _, _ in reqs],
            [sample_seed(seed, i, rounds[0], b, j) for i, _, b, j in reqs],
            {**params, "stop": ["\n\n"]},
            max_tokens=[max_tokens - len(prefix) for _, prefix, _, _ in reqs],
        )
        rounds[0] += 1
        conts = [
            (
                tuple(o["response_ids"]),
                o["finish_reason"] != "step" or len(prefix) + len(o["response_ids"]) >= max_tokens,
            )
            for (_, prefix, _, _), o in zip(reqs, outs)
        ]
        return [conts[n * k : (n + 1) * k] for n in range(len(requests))]

    def score(requests, continuations):
        flat = [
            (i, list(prefix) + list(new), len(prefix))
            for (i, prefix), conts in zip(requests, continuations)
            for new, _ in conts
        ]
        prompts_, responses = [prompt_ids[i] for i, _, _ in flat], [ids for _, ids, _ in flat]
        if beta is None:
            state = values.state_values(prompts_, responses)
            scores = [final_value(v, ids, eos) for v, ids in zip(state, responses)]
        else:
            state, ratios = values.values_and_log_ratios(prompts_, responses)
            scores = [step_q(v, lr, start, beta) for v, lr, (_, _, start) in zip(state, ratios, flat)]
        k = len(continuations[0]) if continuations else 0
        return [scores[n * k : (n + 1) * k] for n in range(len(requests))]

    best = run_beams(searches, expand, score)
    texts = [tokenizer.decode(list(b.ids), skip_special_tokens=True) for b in best]
    graded = grade_answers(prompts, list(range(len(prompts))), texts, workers, "grading beams")
    return [
        {
            "uid": u,
            "sample": 0,
            "response": text,
            "response_ids": list(b.ids),
            "finish_reason": "stop" if b.ids and b.ids[-1] == eos else "length",
            "value": b.score,
            "tokens": s.tokens,
            **g,
        }
        for u, (b, s, text, g) in enumerate(zip(best, searches, texts, graded))
    ]


def evaluate_model(
    group: RolloutGroup, name: str, path: str, datasets: dict, cfg: DictConfig, values: ValueGroup | None = None
) -> list[dict]:
    """Per-sample results of the group's model on every dataset and decoding (value-guided ones with `values`)."""
    e = cfg.evaluate
    q_beta = None  # scoring by Q: the value workers also serve log(pi/pi_ref) of this model
    if values is not None and "q" in e.value.by:
        values.load_policies(path, e.value.reference or cfg.ref.path)
        q_beta = cfg.algorithm.beta
    rows = []
    for dataset, prompts in datasets.items():
        spec = e.datasets[dataset]
        runs = [("greedy", 0, 1, GREEDY)] if e.greedy else []
        per_problem = spec.get("samples", 1)
        sampling = {k: e.sampling[k] for k in ("temperature", "top_p", "top_k", "min_p")}
        seeds = [e.sampling.seeds[0]] if per_problem > 1 else list(e.sampling.seeds)
        runs += [("sample", s, per_problem, sampling) for s in seeds]
        guided = values is not None and dataset in (e.value.sets or e.sets)
        first_seed = e.sampling.seeds[0] if e.sampling.seeds else 0
        if guided:
            runs += [("value", first_seed, e.value.n, sampling)]
        if guided and e.value.beam:
            b = e.value.beam
            runs += [(f"{BEAM_LABELS[by]} beam {b.beams}x{b.k}", first_seed, 1, sampling) for by in e.value.by]
        for decoding, seed, n, params in runs:
            params = {**params, "max_tokens": spec.get("max_tokens") or e.max_tokens}
            if " beam " in decoding:
                beta = q_beta if decoding.startswith(BEAM_LABELS["q"]) else None
                results = beam_and_grade(
                    group, values, prompts, seed, params, hf_tokenizer(path), e.value.beam, cfg.score.workers, beta
                )
            else:
                results = sample_and_grade(group, prompts, n, seed, params, cfg.score.workers, f"grading {dataset}")
            if decoding == "value":
                results = value_guided(results, prompts, values, hf_tokenizer(path).eos_token_id, q_beta)
            rows += [
                {
                    "model": name,
                    "path": path,
                    "dataset": dataset,
                    "decoding": decoding,
                    "seed": seed,
                    "prompt": prompts.iloc[r["uid"]]["prompt"][0]["content"],
                    **r,
                }
                for r in results
            ]
    return rows


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


def run(cfg: DictConfig) -> dict:
    """The `eval` stage: writes samples.parquet, table.md, table.csv and summary.json (last) to `out_dir(cfg)`."""
    e = cfg.evaluate
    models, names = models_and_names(cfg)
    if not models:
        raise InputError("evaluate.models is empty: set evaluate.models=[dir,...] (or CKPTS=... with make eval)")
    for m in models:  # a local folder that is missing (a hub name has exactly one "/")
        if not Path(m).exists() and (m.startswith(("/", ".", "outputs")) or m.count("/") != 1):
            raise InputError(f"evaluate.models: {m} does not exist (train or export it first, e.g. `make demo`)")
    unknown = [by for by in (e.value.by if e.value.model else []) if by not in BEAM_LABELS]
    if unknown:
        raise InputError(f"evaluate.value.by: {unknown[0]!r} is not one of {', '.join(BEAM_LABELS)}")
    longest = max(e.sets, key=lambda d: e.datasets[d].get("max_tokens") or e.max_tokens)
    answer_key = (
        f"evaluate.datasets.{longest}.max_tokens" if e.datasets[longest].get("max_tokens") else "evaluate.max_tokens"
    )
    budget = check_budget(
        cfg, "eval", ["data.max_prompt_length", answer_key], {f"evaluate.models[{i}]": m for i, m in enumerate(models)}
    )
    datasets = {d: eval_prompts(d, e.datasets[d], cfg.trainer.seed, Path(cfg.paths.data)) for d in e.sets}
    init_ray(cfg)
    group = RolloutGroup(engine_config(cfg, budget), models[0], cfg.trainer.nnodes, engines_per_node(cfg))
    v = e.value
    values = ValueGroup(str(v.model), cfg.trainer.nnodes, v.workers_per_node, v.batch_size) if v.model else None
    rows = []
    try:
        for i, (model, name) in enumerate(zip(models, names)):
            if i:
                group.load(model)
            tokenized = {d: add_prompt_ids(p, hf_tokenizer(model)) for d, p in datasets.items()}
            check_prompt_lengths(tokenized, cfg.data.max_prompt_length)
            rows += evaluate_model(group, name, model, tokenized, cfg, values)
    finally:
        group.shutdown()
        if values is not None:
            values.shutdown()
    samples = pd.DataFrame(rows).drop(columns="response_ids")
    out = out_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    write_parquet_atomic(samples, out / "samples.parquet")
    summary = summarize(samples, list(e.pass_k))
    report = table(summary)
    (out / "table.md").write_text(report.to_markdown() + "\n")
    report.to_csv(out / "table.csv")
    write_json_atomic(out / "summary.json", {"models": dict(zip(names, models)), "results": summary})
    print(report.to_markdown())
    print(f"[eval] -> {out} (samples.parquet, table.md, table.csv, summary.json)")
    return summary
