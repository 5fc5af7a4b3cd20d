"""Evaluation harness (paper §5.2, Tables 2/3/9): policies x datasets x decodings -> a Table-2-style report.

The `eval` stage (`make eval RECIPE=NAME CKPTS="dir1 dir2"`, or `evaluate.models=[dir1,dir2]`) evaluates
HF checkpoints (e.g. `export/policy` or a checkpoint's `policy/huggingface`) on the recipe's
evaluation sets, with the training prompt templates, on the rollout worker group (vLLM or transformers):

- greedy decoding, and sampling over 5 seeds, reported as mean +- std (sample std over the seeds): temperature
  0.7 (the paper's A.1 evaluation value; its §5.2 names 0.9 as the alternative), top_p 0.9, top_k 16, min_p 0.01
  (our reading of the paper's sampling "threshold");
- AIME24: 30 samples per problem, the mean pass rate, and unbiased pass@k for `evaluate.pass_k`;
- with a value model, the value-guided decodings of `decodings.py`.

Writes `${evaluate.out_dir}/samples.parquet` (model, dataset, decoding, seed, prompt, response,
pred, score), `table.md`, `table.csv` and `summary.json`, and prints the table.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from omegaconf import DictConfig
from verl.utils import hf_tokenizer

from dqo_verl.config.errors import InputError, check_choice
from dqo_verl.config.plugins import PROMPT_SETS, registered
from dqo_verl.data.budget import check_budget, engine_config
from dqo_verl.data.chat import add_prompt_ids
from dqo_verl.data.io import write_json_atomic, write_parquet_atomic
from dqo_verl.eval.decodings import BEAM_LABELS, DECODINGS, Context, planned_runs
from dqo_verl.eval.metrics import models_and_names, out_dir, summarize, table
from dqo_verl.workers.groups import engines_per_node, init_ray
from dqo_verl.workers.rollout import RolloutGroup
from dqo_verl.workers.values import ValueGroup


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
        ctx = Context(group, values, hf_tokenizer(path), cfg, q_beta, f"grading {dataset}")
        guided = values is not None and dataset in (e.value.sets or e.sets)
        for run in planned_runs(e, spec, guided):
            params = {**run.params, "max_tokens": spec.get("max_tokens") or e.max_tokens}
            results = DECODINGS[run.kind](ctx, run, prompts, params)
            rows += [
                {
                    "model": name,
                    "path": path,
                    "dataset": dataset,
                    "decoding": run.label,
                    "seed": run.seed,
                    "prompt": prompts.iloc[r["uid"]]["prompt"][0]["content"],
                    **r,
                }
                for r in results
            ]
    return rows


def check(cfg: DictConfig) -> None:
    """The evaluation sets and decodings name known ones (checked before anything runs)."""
    registered(PROMPT_SETS, "check_eval_sets")(cfg)
    for by in cfg.evaluate.value.by if cfg.evaluate.value.model else []:
        check_choice("evaluate.value.by", by, BEAM_LABELS)


def run(cfg: DictConfig) -> dict:
    """The `eval` stage: writes samples.parquet, table.md, table.csv and summary.json (last) to `out_dir(cfg)`."""
    check(cfg)  # also when called directly (compare, iterate), not only through the runner's stage checks
    e = cfg.evaluate
    models, names = models_and_names(cfg)
    if not models:
        raise InputError("evaluate.models is empty: set evaluate.models=[dir,...] (or CKPTS=... with make eval)")
    for m in models:  # a local folder that is missing (a hub name has exactly one "/")
        if not Path(m).exists() and (m.startswith(("/", ".", "outputs")) or m.count("/") != 1):
            raise InputError(f"evaluate.models: {m} does not exist (train or export it first, e.g. `make demo`)")
    longest = max(e.sets, key=lambda d: e.datasets[d].get("max_tokens") or e.max_tokens)
    answer_key = (
        f"evaluate.datasets.{longest}.max_tokens" if e.datasets[longest].get("max_tokens") else "evaluate.max_tokens"
    )
    budget = check_budget(
        cfg, "eval", ["data.max_prompt_length", answer_key], {f"evaluate.models[{i}]": m for i, m in enumerate(models)}
    )
    eval_prompts = registered(PROMPT_SETS, "eval_prompts")  # data_prep's sources, by entry point
    datasets = {d: eval_prompts(d, e.datasets[d], e.seed, Path(cfg.paths.data)) for d in e.sets}
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
