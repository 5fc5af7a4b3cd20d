"""Answer formats: how the responses to each data source are graded (`grading.ANSWER_FORMATS`), as verl's reward
functions dispatch on `data_source`. The one table of them; the prompt sources of `data_prep` declare theirs here."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dqo_verl.config.errors import InputError, RowError

# data_source -> answer format; each hub dataset under its data_source, hub name and the short name recipes use
ANSWER_FORMAT_OF = {
    **dict.fromkeys(("gsm8k", "openai/gsm8k"), "gsm8k"),
    **dict.fromkeys(("math", "DigitalLearningGmbH/MATH-lighteval"), "boxed"),
    **dict.fromkeys(("math500", "HuggingFaceH4/MATH-500"), "boxed"),
    **dict.fromkeys(("numina", "AI-MO/NuminaMath-CoT"), "boxed"),
    **dict.fromkeys(("aime24", "di-zhang-fdu/AIME-1983-2024"), "boxed"),
    "synthetic_arith": "gsm8k",  # the built-in synthetic task
}
# families of generated sources: data_source "<family><task>"
FAMILY_FORMATS = {"reasoning_gym/": "gsm8k_or_last_number"}


def answer_format(data_source: str) -> str | None:
    """The answer format a data_source declares (None: unknown source)."""
    if data_source in ANSWER_FORMAT_OF:
        return ANSWER_FORMAT_OF[data_source]
    family = next((f for f in FAMILY_FORMATS if data_source.startswith(f)), None)
    return FAMILY_FORMATS[family] if family else None


def unknown_source(path, row: int, source) -> InputError:
    known = ", ".join([*sorted(ANSWER_FORMAT_OF), *(f"{f}<task>" for f in FAMILY_FORMATS)])
    return RowError(path, row, "data_source", f"no answer format is declared for source {source!r} (known: {known})")


def answer_formats(df: pd.DataFrame, path) -> list[str]:
    """The answer format of every row's data_source; a source that declares none is an InputError."""
    formats = [answer_format(src) for src in df["data_source"]]
    if None in formats:
        row = formats.index(None)
        raise unknown_source(path, row, df["data_source"].iloc[row])
    return formats


def check_sources(path: Path) -> None:
    """Every data_source of a parquet file declares an answer format (reads that column only)."""
    sources = pq.read_table(path, columns=["data_source"]).column(0)
    for source in pc.unique(sources).to_pylist():
        if answer_format(source) is None:
            raise unknown_source(path, pc.index(sources, source).as_py(), source)
