"""Baseline training sets on the same corpus (paper Table 8): the `baselines` stage.

`make baselines RECIPE=NAME` reads
`${paths.data}/corpus.parquet` and `prompts.parquet` and writes `${paths.data}/baselines/`:

- `sft.parquet`: the reference solution of every prompt that has one;
- `rs.parquet`: rejection sampling, every correct response;
- `dpo.parquet`: random (correct, incorrect) pairs of the same prompt, at least half as many as the corpus
  has responses where its prompts allow (`dqo_verl.data.pairs`);
- `kto.parquet`: every response with its label (`label` = correct); DRO and DQO train on
  `corpus.parquet` itself, every response with its score;
- `summary.md` (a Table-8-style size table), `positive_rate.png` (per-prompt positive rate,
  paper Figure 2) and `response_length.png` (paper Figure 3).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure
from omegaconf import DictConfig
from verl.utils import hf_tokenizer

from dqo_verl.data.io import write_parquet_atomic
from dqo_verl.data.pairs import preference_pairs

RESPONSE_FIELDS = ("prompt_ids", "response_ids", "response", "score")


def sft_set(prompts: pd.DataFrame, tokenizer) -> pd.DataFrame:
    """(prompt, reference solution + eos) for every prompt whose extra_info has a `solution`."""
    rows = []
    for uid, row in prompts.iterrows():
        solution = (row.get("extra_info") or {}).get("solution")
        if solution:
            ids = tokenizer(solution, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            rows.append({"uid": uid, "prompt_ids": list(row["prompt_ids"]), "response_ids": ids, "response": solution})
    return pd.DataFrame(rows, columns=["uid", "prompt_ids", "response_ids", "response"])


def rs_set(corpus: pd.DataFrame) -> pd.DataFrame:
    """Rejection sampling: every correct response."""
    return corpus[corpus["score"] == 1].reset_index(drop=True)


def dpo_pairs(corpus: pd.DataFrame, seed: int) -> pd.DataFrame:
    """Random (correct, incorrect) pairs within a prompt (`data.preference_pairs`: at least half the corpus where
    the prompts allow, every response of a prompt with both labels in one)."""
    picked = [(corpus.at[g, "uid"], g, b) for g, b in preference_pairs(corpus, seed)]
    return pd.DataFrame(
        [
            {
                "uid": uid,
                "prompt_ids": list(corpus.at[g, "prompt_ids"]),
                "chosen_ids": list(corpus.at[g, "response_ids"]),
                "rejected_ids": list(corpus.at[b, "response_ids"]),
                "chosen": corpus.at[g, "response"],
                "rejected": corpus.at[b, "response"],
            }
            for uid, g, b in picked
        ],
        columns=["uid", "prompt_ids", "chosen_ids", "rejected_ids", "chosen", "rejected"],
    )


def kto_set(corpus: pd.DataFrame) -> pd.DataFrame:
    """Every response with its binary label."""
    return corpus.assign(label=corpus["score"] == 1).reset_index(drop=True)


def summary_table(sets: dict[str, pd.DataFrame], corpus: pd.DataFrame) -> str:
    """Markdown table: method, examples, prompts covered (paper Table 8)."""
    lines = ["| method | examples | prompts |", "|---|---:|---:|"]
    for name, df in sets.items():
        lines.append(f"| {name} | {len(df)} | {df['uid'].nunique() if len(df) else 0} |")
    for name in ("DRO", "DQO"):
        lines.append(f"| {name} | {len(corpus)} | {corpus['uid'].nunique()} |")
    return "\n".join(lines)


def plot_histograms(corpus: pd.DataFrame, out_dir: Path) -> list[Path]:
    """Per-prompt positive-rate histogram (Figure 2) and response-length histogram (Figure 3), as PNG."""
    paths = []
    rate = corpus.groupby("uid")["score"].mean()
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    ax.hist(rate, bins=[i / 20 for i in range(21)], color="tab:blue", edgecolor="white")
    ax.set(xlabel="fraction of correct responses per prompt", ylabel="prompts", title="Positive rate per prompt")
    paths.append(out_dir / "positive_rate.png")
    fig.tight_layout()
    fig.savefig(paths[-1], dpi=120)

    lengths = corpus["response_ids"].map(len)
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    bins = 40
    ax.hist(
        [lengths[corpus["score"] == 1], lengths[corpus["score"] == 0]],
        bins=bins,
        stacked=True,
        label=["correct", "incorrect"],
        color=["tab:green", "tab:red"],
    )
    ax.set(xlabel="response length (tokens)", ylabel="responses", title="Response length")
    ax.legend()
    paths.append(out_dir / "response_length.png")
    fig.tight_layout()
    fig.savefig(paths[-1], dpi=120)
    return paths


def run(cfg: DictConfig) -> Path:
    """The `baselines` stage."""
    data = Path(cfg.paths.data)
    corpus = pd.read_parquet(data / "corpus.parquet")
    prompts = pd.read_parquet(data / "prompts.parquet")
    out_dir = data / "baselines"
    out_dir.mkdir(parents=True, exist_ok=True)
    sets = {
        "SFT": sft_set(prompts, hf_tokenizer(cfg.policy.model.path)),
        "RS": rs_set(corpus),
        "DPO": dpo_pairs(corpus, seed=cfg.trainer.seed),
        "KTO": kto_set(corpus),
    }
    for name, df in sets.items():
        write_parquet_atomic(df, out_dir / f"{name.lower()}.parquet")
    table = summary_table(sets, corpus)
    (out_dir / "summary.md").write_text(table + "\n")
    figures = plot_histograms(corpus, out_dir)
    print(table)
    print(f"[baselines] -> {out_dir} ({', '.join(p.name for p in figures)})")
    return out_dir


if __name__ == "__main__":  # `python -m data_prep.baselines +recipe=NAME`: this stage (and what it needs) alone
    from dqo_verl.pipeline.runner import stage_command

    stage_command("baselines")()
