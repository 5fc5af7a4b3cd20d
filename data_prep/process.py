"""Process scores (DESIGN §1 step 4): segment every response, find each failed response's longest
correct prefix by sampling completions, and write per-segment rewards.

`python -m data_prep.process +recipe=NAME` (or `make process RECIPE=NAME`) reads
`${paths.data}/corpus.parquet` and writes `${paths.data}/corpus_ps.parquet` (the corpus plus
`segment_ends`, `process_rewards`, `correct_prefix`), `process_stats.json` and
`process_prefix.png` (histogram of i*/n). Completions go through the rollout worker group (prefix
caching shares each prefix among its K completions), all searches of a shard advancing together so
that every round is one large batch; each completion's seed is fixed by (response, prefix, k), so
`linear` and `binary` see the same samples for the same prefix. Shards are written atomically
under `${paths.data}/process_shards/`; a killed run resumes from the shards it has.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from dqo_verl.data import write_parquet_atomic
from dqo_verl.grading import grade_many
from dqo_verl.main import entry_point
from dqo_verl.process import SearchState, process_rewards, segment_ends
from dqo_verl.rollout import sample_seed


@dataclass
class Spend:
    completions: int = 0
    tokens: int = 0


def complete_and_grade(probes, corpus: pd.DataFrame, ends: list[list[int]], completer, k: int, seed: int, params: dict,
                       tokenizer, workers) -> tuple[list[bool], Spend]:
    """For each (row, i): K completions of prompt + first i segments; correct if any completion is."""
    prompts, seeds, meta = [], [], []
    for row, i in probes:
        rec = corpus.iloc[row]
        prefix = list(rec["response_ids"][: ends[row][i - 1] + 1])
        for j in range(k):
            prompts.append(list(rec["prompt_ids"]) + prefix)
            seeds.append(sample_seed(seed, int(rec["uid"]), int(rec["sample"]), i, j))
            meta.append((row, tokenizer.decode(prefix, skip_special_tokens=True)))
    outs = completer.generate(prompts, seeds, params)
    items = [
        (text + out["response"], corpus.iloc[row]["reward_model"]["ground_truth"], corpus.iloc[row]["data_source"])
        for (row, text), out in zip(meta, outs)
    ]
    scores = [g["score"] for g in grade_many(items, workers, desc="grading completions")]
    correct = [any(s == 1.0 for s in scores[p * k : (p + 1) * k]) for p in range(len(probes))]
    return correct, Spend(len(outs), sum(len(o["response_ids"]) for o in outs))


def search_prefixes(corpus: pd.DataFrame, ends: list[list[int]], failed: list[int], completer, strategy: str, k: int,
                    seed: int, params: dict, tokenizer, workers=None) -> tuple[dict[int, int], Spend]:
    """i* of every failed row (index into corpus), all searches advancing one probe per round."""
    states = {row: SearchState(len(ends[row]), strategy) for row in failed}
    spend = Spend()
    while probes := [(row, i) for row, st in states.items() if (i := st.next_probe()) is not None]:
        correct, s = complete_and_grade(probes, corpus, ends, completer, k, seed, params, tokenizer, workers)
        spend.completions += s.completions
        spend.tokens += s.tokens
        for (row, i), ok in zip(probes, correct):
            states[row].record(i, ok)
    return {row: st.result for row, st in states.items()}, spend


def run_shard(corpus: pd.DataFrame, completer, cfg: DictConfig, tokenizer, params: dict) -> tuple[pd.DataFrame, Spend]:
    p = cfg.process
    ends = [segment_ends(ids, tokenizer, p.separator, p.max_segments) for ids in corpus["response_ids"]]
    failed = [row for row in range(len(corpus)) if corpus.iloc[row]["score"] != 1.0]
    prefix, spend = search_prefixes(corpus, ends, failed, completer, p.strategy, p.k, cfg.rollout.seed, params, tokenizer,
                                    cfg.score.workers)
    out = pd.DataFrame(
        {
            "segment_ends": ends,
            "correct_prefix": [prefix.get(row, len(e)) for row, e in enumerate(ends)],
        }
    )
    out["process_rewards"] = [
        process_rewards(len(e), c, corpus.iloc[row]["score"] == 1.0, p.segment_reward, p.reward_correct_responses)
        for row, (e, c) in enumerate(zip(out["segment_ends"], out["correct_prefix"]))
    ]
    return out, spend


def plot_prefix_histogram(fraction: pd.Series, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.hist(fraction, bins=[i / 10 for i in range(11)], color="tab:purple", edgecolor="white")
    ax.set(xlabel="longest correct prefix i*/n", ylabel="failed responses", title="Correct-prefix fraction")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(cfg: DictConfig) -> Path:
    from verl.utils import hf_tokenizer

    from data_prep.corpus import engines_per_node, sampling_params
    from dqo_verl.rollout import RolloutGroup
    from dqo_verl.trainer import init_ray

    from data_prep import require, score

    data = Path(cfg.paths.data)
    corpus = pd.read_parquet(require(data / "corpus.parquet", score.run, cfg))
    tokenizer = hf_tokenizer(cfg.policy.model.path)
    params = sampling_params(cfg.rollout)
    shard_dir = data / "process_shards"
    shard_dir.mkdir(parents=True, exist_ok=True)
    size = cfg.process.shard_rows
    starts = list(range(0, len(corpus), size))
    todo = [s for s in starts if not (shard_dir / f"shard_{s:08d}.parquet").exists()]
    spend, t0 = Spend(), time.perf_counter()
    if todo:
        init_ray(cfg)
        rollout = {**OmegaConf.to_container(cfg.rollout, resolve=True),
                   "max_model_len": cfg.rollout.max_model_len or cfg.data.max_prompt_length + 2 * cfg.data.max_response_length}
        group = RolloutGroup(rollout, cfg.policy.model.path, cfg.trainer.nnodes, engines_per_node(cfg))
        try:
            for start in tqdm(todo, desc=f"process scores ({cfg.process.strategy})", unit="shard"):
                shard, s = run_shard(corpus.iloc[start : start + size].reset_index(drop=True), group, cfg, tokenizer, params)
                shard["completions"] = s.completions  # per shard, for the statistics
                shard["completion_tokens"] = s.tokens
                write_parquet_atomic(shard, shard_dir / f"shard_{start:08d}.parquet")
        finally:
            group.shutdown()
    shards = [pd.read_parquet(shard_dir / f"shard_{s:08d}.parquet") for s in starts]
    for s in shards:
        spend.completions += int(s["completions"].iloc[0]) if len(s) else 0
        spend.tokens += int(s["completion_tokens"].iloc[0]) if len(s) else 0
    labels = pd.concat(shards, ignore_index=True).drop(columns=["completions", "completion_tokens"])
    out_corpus = corpus.copy()
    for col in ("segment_ends", "process_rewards", "correct_prefix"):
        out_corpus[col] = labels[col].tolist()
    out = data / "corpus_ps.parquet"
    write_parquet_atomic(out_corpus, out)

    failed = out_corpus["score"] != 1.0
    n_seg = out_corpus["segment_ends"].map(len)
    fraction = (out_corpus["correct_prefix"] / n_seg)[failed]
    stats = {
        "strategy": cfg.process.strategy,
        "responses": len(out_corpus),
        "failed_responses_searched": int(failed.sum()),
        "mean_segments": float(n_seg.mean()),
        "mean_correct_prefix_fraction": float(fraction.mean()) if len(fraction) else 0.0,
        "completions": spend.completions,
        "generated_tokens": spend.tokens,
        "seconds_this_run": round(time.perf_counter() - t0, 1),
    }
    (data / "process_stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    plot_prefix_histogram(fraction, data / "process_prefix.png")
    print(f"[process] {json.dumps(stats)}")
    print(f"[process] -> {out} ({data / 'process_stats.json'}, {data / 'process_prefix.png'})")
    return out


main = entry_point(run)

if __name__ == "__main__":
    main()
