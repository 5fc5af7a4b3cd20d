"""Scoring (DESIGN §1 step 3): grade every sample 1/0 against its prompt's ground truth.

`python -m data_prep.score +recipe=NAME` (or `make score RECIPE=NAME`) reads
`${paths.data}/samples.parquet` and writes `${paths.data}/corpus.parquet` (the training corpus)
with `score` and `pred` per row, grading in a process pool.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from omegaconf import DictConfig

from dqo_verl.data import write_parquet_atomic
from dqo_verl.grading import score_corpus
from dqo_verl.main import entry_point


def corpus_stats(corpus: pd.DataFrame) -> dict:
    """Positive rate, per-prompt all-right / all-wrong shares, mean response length."""
    per_prompt = corpus.groupby("uid")["score"].mean()
    return {
        "responses": len(corpus),
        "prompts": int(per_prompt.size),
        "positive_rate": float(corpus["score"].mean()),
        "prompts_all_correct": float((per_prompt == 1).mean()),
        "prompts_all_wrong": float((per_prompt == 0).mean()),
        "mean_response_tokens": float(corpus["response_ids"].map(len).mean()),
    }


def run(cfg: DictConfig) -> Path:
    from data_prep import corpus as corpus_stage
    from data_prep import require

    data = Path(cfg.paths.data)
    samples = pd.read_parquet(require(data / "samples.parquet", corpus_stage.run, cfg))
    corpus = score_corpus(samples, workers=cfg.score.workers)
    out = data / "corpus.parquet"
    write_parquet_atomic(corpus, out)
    s = corpus_stats(corpus)
    print(
        f"[score] {s['responses']} responses of {s['prompts']} prompts: positive rate {s['positive_rate']:.3f}, "
        f"all correct {s['prompts_all_correct']:.1%} / all wrong {s['prompts_all_wrong']:.1%} of prompts, "
        f"mean length {s['mean_response_tokens']:.1f} tokens -> {out}"
    )
    return out


main = entry_point(run)

if __name__ == "__main__":
    main()
