"""Process scores from prefix completions (paper §5.5, A.1, Figure 4).

A response is split into segments at blank lines. For a failed response, the prefix y[0:i] (the
prompt and the first i segments) is *correct* when at least one of K completions sampled from it
reaches the right answer; the longest correct prefix i* earns reward 1/n at the end of each of its
i* segments (a correct response earns 1/n at every segment end). `linear` is the paper's scan
(i = n-1 down to 1, stop at the first correct prefix); `binary` searches i assuming that a prefix of
a correct prefix is correct, and finds the same i* whenever that holds, with about log2(n) probes
instead of up to n-1.

Searches run for many responses at once, one round of probes at a time (`SearchState.next_probe`
/ `record`), so the rollout engines get large batches: the rounds of one shard of responses run on one
engine actor, and the shards stream over a pool of them on every node (`streaming.py`), so an engine
whose searches end early takes the next shard instead of waiting for the others' rounds.

The `process` stage (`make process RECIPE=NAME`) reads `${paths.data}/corpus.parquet` and writes
`${paths.data}/corpus_ps.parquet` (the corpus plus `segment_ends`, `process_rewards`,
`correct_prefix`), `process_stats.json` and `process_prefix.png` (histogram of i*/n). Completions go
through the engines (prefix caching shares each prefix among its K completions); each
completion's seed is fixed by (response, prefix, k), so `linear` and `binary` see the same samples for
the same prefix. Shards are written atomically under `${paths.data}/process_shards/`; a killed run
resumes from the shards it has.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.compute as pc
import pyarrow.parquet as pq
from matplotlib.figure import Figure
from omegaconf import DictConfig
from verl.utils import hf_tokenizer

from data_prep.streaming import EngineActor, combine_shards, read_shard, run_on_engines, summary
from dqo_verl.config.errors import check_choice
from dqo_verl.data.io import write_parquet_atomic
from dqo_verl.data.shards import shard_path, shard_ranges
from dqo_verl.reward.formats import answer_format, check_sources
from dqo_verl.reward.grading import grade_many
from dqo_verl.reward.steps import segment_ends
from dqo_verl.workers.rollout import sample_seed

STRATEGIES = ("linear", "binary")


def check(cfg: DictConfig) -> None:
    """`process.strategy` names a search (checked before anything runs)."""
    check_choice("process.strategy", cfg.process.strategy, STRATEGIES)


@dataclass
class SearchState:
    """The search for the longest correct prefix of one failed response with n segments.

    Prefix i (1 <= i <= n-1) is the prompt plus the first i segments; i* = 0 when none is correct.
    """

    n: int
    strategy: str
    lo: int = 0  # binary: the largest prefix known (or assumed) correct
    hi: int = 0  # binary: the largest prefix still possible
    next_linear: int = 0
    result: int | None = None
    probes: list[int] = field(default_factory=list)

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {self.strategy!r}; expected one of {STRATEGIES}")
        self.hi = self.n - 1
        self.next_linear = self.n - 1
        if self.n <= 1:
            self.result = 0

    def next_probe(self) -> int | None:
        """The prefix length to test next; None when the search is over."""
        if self.result is not None:
            return None
        if self.strategy == "linear":
            return self.next_linear
        return (self.lo + self.hi + 1) // 2

    def record(self, i: int, correct: bool) -> None:
        """The outcome of testing prefix i."""
        self.probes.append(i)
        if self.strategy == "linear":
            if correct:
                self.result = i
            elif i == 1:
                self.result = 0
            else:
                self.next_linear = i - 1
            return
        if correct:
            self.lo = i
        else:
            self.hi = i - 1
        if self.lo >= self.hi:
            self.result = self.lo


def search(n: int, is_correct, strategy: str = "binary") -> tuple[int, list[int]]:
    """i* for one response given `is_correct(i)`; returns (i*, the prefixes probed)."""
    state = SearchState(n, strategy)
    while (i := state.next_probe()) is not None:
        state.record(i, bool(is_correct(i)))
    return state.result, state.probes


def process_rewards(
    n_segments: int,
    correct_prefix: int,
    outcome_correct: bool,
    segment_reward: float | None = None,
    reward_correct_responses: bool = True,
) -> list[float]:
    """Per segment end: `segment_reward` (default 1/n) for the first i* segments of a failed response,
    and for every segment of a correct one (when `reward_correct_responses`); 0 elsewhere."""
    r = 1.0 / n_segments if segment_reward is None else segment_reward
    if outcome_correct:
        return [r if reward_correct_responses else 0.0] * n_segments
    return [r] * correct_prefix + [0.0] * (n_segments - correct_prefix)


@dataclass
class Spend:
    completions: int = 0
    tokens: int = 0


def complete_and_grade(
    probes, corpus: pd.DataFrame, ends: list[list[int]], completer, k: int, seed: int, params: dict, tokenizer, workers
) -> tuple[list[bool], Spend]:
    """For each (row, i): K completions of prompt + first i segments; correct if any completion is.

    A completion may take the tokens the prefix leaves of the response's own limit (params['max_tokens']),
    so prefix + completion never exceeds the corpus's response budget."""
    prompts, seeds, meta, limits = [], [], [], []
    for row, i in probes:
        rec = corpus.iloc[row]
        prefix = list(rec["response_ids"][: ends[row][i - 1] + 1])
        for j in range(k):
            prompts.append(list(rec["prompt_ids"]) + prefix)
            seeds.append(sample_seed(seed, int(rec["uid"]), int(rec["sample"]), i, j))
            meta.append((row, tokenizer.decode(prefix, skip_special_tokens=True)))
            limits.append(params["max_tokens"] - len(prefix))
    outs = completer.generate(prompts, seeds, params, limits)
    items = [
        (
            text + out["response"],
            corpus.iloc[row]["reward_model"]["ground_truth"],
            answer_format(corpus.iloc[row]["data_source"]),
        )
        for (row, text), out in zip(meta, outs)
    ]
    scores = [g["score"] for g in grade_many(items, workers, desc="grading completions")]
    correct = [any(s == 1.0 for s in scores[p * k : (p + 1) * k]) for p in range(len(probes))]
    return correct, Spend(len(outs), sum(len(o["response_ids"]) for o in outs))


def search_prefixes(
    corpus: pd.DataFrame,
    ends: list[list[int]],
    failed: list[int],
    completer,
    strategy: str,
    k: int,
    seed: int,
    params: dict,
    tokenizer,
    workers=None,
) -> tuple[dict[int, int], Spend]:
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
    prefix, spend = search_prefixes(
        corpus, ends, failed, completer, p.strategy, p.k, cfg.rollout.seed, params, tokenizer, cfg.score.workers
    )
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
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    ax.hist(fraction, bins=[i / 10 for i in range(11)], color="tab:purple", edgecolor="white")
    ax.set(xlabel="longest correct prefix i*/n", ylabel="failed responses", title="Correct-prefix fraction")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


class ProcessShards(EngineActor):
    """Ray Data actor: the searches of one shard of corpus rows at a time, written as that shard's file (the
    rows with their labels; the completions it cost in the file's metadata)."""

    def __init__(self, rollout: dict, model: str, params: dict, corpus: str, config: DictConfig):
        super().__init__(rollout, model)
        self.corpus, self.cfg, self.params = corpus, config, params
        self.tokenizer = hf_tokenizer(model)

    def __call__(self, batch: dict[str, np.ndarray], folder: str) -> dict[str, np.ndarray]:
        start, stop = int(batch["start"][0]), int(batch["stop"][0])
        t0 = time.time()
        rows = read_shard(self.corpus, start, stop)
        labels, spend = run_shard(rows, self, self.cfg, self.tokenizer, self.params)
        t1 = time.time()
        for col in labels.columns:
            rows[col] = labels[col].tolist()
        spent = {"completions": str(spend.completions), "completion_tokens": str(spend.tokens)}
        write_parquet_atomic(rows, shard_path(Path(folder), start), metadata=spent)
        return summary(stop - start, spend.tokens, t0, t1)


def spent(shard_dir: Path, ranges: list[tuple[int, int]]) -> Spend:
    """The completions the shards of `ranges` cost (kept in each shard file's metadata), this run or before."""
    total = Spend()
    for start, _ in ranges:
        meta = pq.read_schema(shard_path(shard_dir, start)).metadata or {}
        total.completions += int(meta.get(b"completions", 0))
        total.tokens += int(meta.get(b"completion_tokens", 0))
    return total


def run(cfg: DictConfig) -> Path:
    """The `process` stage."""
    data = Path(cfg.paths.data)
    corpus = data / "corpus.parquet"
    check_sources(corpus)  # every source must declare how it is graded
    shard_dir = data / "process_shards"
    ranges = shard_ranges(pq.ParquetFile(corpus).metadata.num_rows, cfg.process.shard_rows)
    t0 = time.perf_counter()
    run_on_engines(cfg, "process", ProcessShards, ranges, shard_dir, "resp", corpus=str(corpus), config=cfg)
    out = data / "corpus_ps.parquet"
    combine_shards(shard_dir, ranges, out)
    spend = spent(shard_dir, ranges)
    labels = pq.read_table(out, columns=["score", "segment_ends", "correct_prefix"])
    n_seg = pc.list_value_length(labels["segment_ends"]).to_numpy().astype(float)
    failed = labels["score"].to_numpy() != 1.0
    fraction = pd.Series(labels["correct_prefix"].to_numpy()[failed] / n_seg[failed])
    stats = {
        "strategy": cfg.process.strategy,
        "responses": labels.num_rows,
        "failed_responses_searched": int(failed.sum()),
        "mean_segments": float(n_seg.mean()) if len(n_seg) else 0.0,
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


if __name__ == "__main__":  # `python -m data_prep.process +recipe=NAME`: this stage (and what it needs) alone
    from dqo_verl.pipeline.runner import stage_command

    stage_command("process")()
