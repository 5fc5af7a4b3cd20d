"""Prompt token ids: a problem's text through the model's chat template, as every stage that prompts a model
(corpus sampling, SFT, evaluation) tokenizes it."""

from __future__ import annotations

import pandas as pd

from dqo_verl.config.errors import RowError


def chat_prompt(tokenizer, content: str) -> list[int]:
    """Token ids of `content` as a user turn in the model's chat template, with the generation prompt."""
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=True
    )["input_ids"]


def add_prompt_ids(df: pd.DataFrame, tokenizer) -> pd.DataFrame:
    """Add `prompt_ids` (chat template + generation prompt) and `raw_prompt` (its text)."""
    df = df.copy()
    df["prompt_ids"] = [chat_prompt(tokenizer, msgs[0]["content"]) for msgs in df["prompt"]]
    df["raw_prompt"] = [tokenizer.decode(ids) for ids in df["prompt_ids"]]
    if (df["prompt_ids"].map(len) == 0).any():
        raise RowError("prompts", int((df["prompt_ids"].map(len) == 0).idxmax()), "prompt", "empty prompt")
    return df
