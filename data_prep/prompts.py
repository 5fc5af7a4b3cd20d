"""The `prompts` stage (`make prompts RECIPE=NAME`): `dataset` through its source (`sources.py`) into
`${paths.data}/prompts.parquet` in verl's field conventions, with the chat-templated `prompt_ids`; prompts longer
than data.max_prompt_length are dropped, with a count printed.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig
from verl.utils import hf_tokenizer

from data_prep.sources import build_prompts, build_reasoning_gym_prompts, build_synthetic_prompts, synthetic_difficulty
from dqo_verl.data.chat import add_prompt_ids
from dqo_verl.data.io import write_parquet_atomic


def prepare(cfg: DictConfig) -> Path:
    """The `prompts` stage: write ${paths.data}/prompts.parquet."""
    d = cfg.dataset
    out_dir = Path(cfg.paths.data)
    if d.name == "synthetic":
        df = build_synthetic_prompts(
            d.limit, seed=d.get("seed", 0), difficulty=synthetic_difficulty(d.get("difficulty"))
        )
        stats = {"rows": len(df), "skipped": 0}
    elif d.name == "reasoning_gym":
        df = build_reasoning_gym_prompts(d.task, d.limit, seed=d.get("seed", 0), config=d.get("config"))
        stats = {"rows": len(df), "skipped": 0}
    else:
        sources = list(d.sources) if d.get("sources") else None
        df, stats = build_prompts(d.name, d.get("path"), d.get("split"), d.get("limit"), d.get("seed", 0), sources)
        if sources:
            print(
                f"[prompts] {stats['read']} rows read, {stats['other_sources']} from other sources than "
                f"{', '.join(sources)}"
            )
    df = add_prompt_ids(df, hf_tokenizer(cfg.policy.model.path))
    too_long = df["prompt_ids"].map(len) > cfg.data.max_prompt_length
    if too_long.any():
        limit = cfg.data.max_prompt_length
        print(f"[prompts] {int(too_long.sum())} prompts longer than data.max_prompt_length={limit} tokens dropped")
        df = df[~too_long].reset_index(drop=True)
        stats["rows"] = len(df)
    path = out_dir / "prompts.parquet"
    write_parquet_atomic(df, path)
    print(f"[prompts] {stats['rows']} prompts ({stats['skipped']} rows without a usable answer skipped) -> {path}")
    return path


if __name__ == "__main__":  # `python -m data_prep.prompts +recipe=NAME`: this stage (and what it needs) alone
    from dqo_verl.pipeline.runner import stage_command

    stage_command("prompts")()
