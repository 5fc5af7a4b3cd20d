"""Outcome grading: extract the final answer of a response and compare it with the ground truth.

GSM8K format (GSM8K and the synthetic task): the number after the last `####`, compared by value
(commas, `$`, trailing zeros ignored).
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

GSM8K_SOURCES = ("openai/gsm8k", "gsm8k", "synthetic_arith")
_NUMBER = re.compile(r"-?\$?\s*-?[\d,]*\.?\d+")


def extract_gsm8k_answer(text: str) -> str | None:
    """The first number after the last '####', without '$' or thousands separators; None if absent."""
    idx = text.rfind("####")
    if idx < 0:
        return None
    match = _NUMBER.search(text[idx + 4 :])
    if match is None:
        return None
    return match.group(0).replace("$", "").replace(",", "").replace(" ", "")


def _number(text: str | None) -> Decimal | None:
    if text is None:
        return None
    try:
        return Decimal(text.replace(",", "").replace("$", "").strip())
    except (InvalidOperation, ValueError):
        return None


def grade(response: str, ground_truth: str, data_source: str) -> dict:
    """{'score': 1.0 or 0.0, 'pred': extracted answer or None}."""
    if data_source not in GSM8K_SOURCES:
        raise ValueError(f"no grader for data_source {data_source!r} (have: {', '.join(GSM8K_SOURCES)})")
    pred = extract_gsm8k_answer(response)
    pred_value, truth_value = _number(pred), _number(str(ground_truth))
    correct = pred_value is not None and truth_value is not None and pred_value == truth_value
    return {"score": 1.0 if correct else 0.0, "pred": pred}
