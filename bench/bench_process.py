"""`make bench-process`: completions spent by the `binary` search against the paper's `linear` scan on
the tiny corpus, and the share of failed responses where both find the same longest correct prefix.

Both strategies run on the same rollout engines with the same seeds: the K completions of a prefix
are seeded by (response, prefix, k), so a prefix probed by both strategies gets the same samples.
Needs the tiny recipe's corpus (`make score RECIPE=tiny_cpu`). Last line:
`bench-process: binary/linear=R labels-agree=P%`.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd
from omegaconf import OmegaConf
from verl.utils import hf_tokenizer

from data_prep.process import search_prefixes
from dqo_verl.config.compose import compose_config
from dqo_verl.reward.steps import segment_ends
from dqo_verl.workers.groups import engines_per_node, init_ray
from dqo_verl.workers.rollout import RolloutGroup, sampling_params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--responses", type=int, default=160, help="failed responses to label")
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    cfg = compose_config("tiny_cpu", args.overrides)
    path = Path(cfg.paths.data) / "corpus.parquet"
    if not path.exists():
        raise SystemExit(f"{path} is missing: run `make prompts corpus score RECIPE=tiny_cpu` first")
    corpus = pd.read_parquet(path)
    tok = hf_tokenizer(cfg.policy.model.path)
    ends = [segment_ends(ids, tok, cfg.process.separator, cfg.process.max_segments) for ids in corpus["response_ids"]]
    failed = [row for row in range(len(corpus)) if corpus.iloc[row]["score"] != 1.0 and len(ends[row]) > 1][
        : args.responses
    ]
    init_ray(cfg)
    rollout = {
        **OmegaConf.to_container(cfg.rollout, resolve=True),
        "max_model_len": cfg.data.max_prompt_length + 2 * cfg.data.max_response_length,
    }
    group = RolloutGroup(rollout, cfg.policy.model.path, cfg.trainer.nnodes, engines_per_node(cfg))
    results, spend, seconds = {}, {}, {}
    try:
        for strategy in ("linear", "binary"):
            start = time.perf_counter()
            results[strategy], spend[strategy] = search_prefixes(
                corpus,
                ends,
                failed,
                group,
                strategy,
                args.k,
                cfg.rollout.seed,
                sampling_params(cfg.rollout),
                tok,
                cfg.score.workers,
            )
            seconds[strategy] = time.perf_counter() - start
    finally:
        group.shutdown()

    agree = sum(results["linear"][r] == results["binary"][r] for r in failed) / len(failed)
    n = pd.Series([len(ends[r]) for r in failed])
    prefix = pd.Series([results["linear"][r] / len(ends[r]) for r in failed])
    print(
        f"\n{len(failed)} failed responses of the tiny corpus, {n.mean():.1f} segments on average (max {n.max()}); "
        f"K={args.k} completions per prefix; {group.engines} {group.backend} engines"
    )
    print(f"mean longest-correct-prefix fraction (linear): {prefix.mean():.3f}")
    print(f"{'strategy':<10} {'completions':>12} {'tokens':>10} {'seconds':>9}")
    for s in ("linear", "binary"):
        print(f"{s:<10} {spend[s].completions:>12d} {spend[s].tokens:>10d} {seconds[s]:>9.1f}")
    ratio = spend["binary"].completions / spend["linear"].completions
    print(f"bench-process: binary/linear={ratio:.2f} labels-agree={100 * agree:.1f}%")


if __name__ == "__main__":
    main()
