"""Outcome grading (paper A.1): extract the final answer of a response and compare it with the truth.

Every data source has an answer format (`formats.answer_format`); grading knows the formats:

- `gsm8k` (GSM8K, the synthetic task): the number after the last `####`, compared by value (commas,
  `$`, trailing zeros ignored);
- `gsm8k_or_last_number` (generated tasks asked of models never taught the `####` line, e.g.
  reasoning-gym): the same, and without a `####` line the response's last number (lm-eval-harness's
  GSM8K "flexible-extract");
- `boxed` (MATH, MATH-500, AIME, NuminaMath): the last `\\boxed{...}`, compared after the Qwen2.5-Math
  grader's string normalisations, then for mathematical equivalence with math-verify (fractions,
  radicals, decimals vs fractions, intervals, tuples, sets, matrices, equations such as `x=5`);
  multiple-choice letters are compared as letters.

`grade` never raises on a response. Inputs that could make sympy run away (deep nesting, huge powers
or factorials, very long answers) are compared as normalised strings only, and math-verify's own
timeout bounds the rest, so one call takes at most a few seconds. `grade_many` grades in a process
pool with a progress bar.
"""

from __future__ import annotations

import functools
import multiprocessing
import os
import re
import threading
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from decimal import Decimal, InvalidOperation

from math_verify import LatexExtractionConfig, parse, verify
from tqdm import tqdm

ANSWER_FORMATS = ("gsm8k", "gsm8k_or_last_number", "boxed")

TIMEOUT_SECONDS = 3

MAX_ANSWER_CHARS = 400

MAX_NESTING = 24

_NUMBER = re.compile(r"-?\$?\s*-?[\d,]*\.?\d+")

_PLAIN_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")

_RUNAWAY = re.compile(r"\^\s*\{?\s*[-+]?\d{3,}|\^\s*\{[^{}]*\^|\d{4,}\s*!|!\s*!")


def extract_gsm8k_answer(text: str) -> str | None:
    """The first number after the last '####', without '$' or thousands separators; None if absent."""
    idx = text.rfind("####")
    if idx < 0:
        return None
    match = _NUMBER.search(text[idx + 4 :])
    if match is None:
        return None
    return match.group(0).replace("$", "").replace(",", "").replace(" ", "")


def last_number(text: str) -> str | None:
    """The last number in `text` (thousands separators dropped); None if there is none."""
    numbers = _PLAIN_NUMBER.findall(text)
    return numbers[-1].replace(",", "") if numbers else None


def _number(text: str | None) -> Decimal | None:
    if text is None:
        return None
    try:
        return Decimal(text.replace(",", "").replace("$", "").strip())
    except (InvalidOperation, ValueError):
        return None


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` (or `\\fbox{...}`), braces matched; None if there is none."""
    idx = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if idx < 0:
        return None
    rest = text[idx:]
    brace = rest.find("{")
    if brace < 0:
        # "\boxed 5" form
        match = re.match(r"\\(?:boxed|fbox)\s+([^\s$]+)", rest)
        return match.group(1) if match else None
    depth = 0
    for i, ch in enumerate(rest[brace:], start=brace):
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return rest[brace + 1 : i]
    return None


def normalize_answer(ans: str) -> str:
    """String normalisation in the spirit of the Qwen2.5-Math grader's `strip_string`."""
    s = str(ans).strip().replace("\n", "").rstrip(".")
    s = re.sub(r"(\d)\s*\\(?:text|mbox|mathrm)\{\s*[a-zA-Z][a-zA-Z ]*\}", r"\1", s)  # "10\text{ cm}" -> "10"
    s = re.sub(r"\\(?:text|mbox|mathrm)\{\s*([^{}]*?)\s*\}", r"\1", s)
    for old, new in (
        ("\\!", ""),
        ("\\,", ""),
        ("\\;", ""),
        ("\\ ", ""),
        ("\\left", ""),
        ("\\right", ""),
        ("tfrac", "frac"),
        ("dfrac", "frac"),
        ("^{\\circ}", ""),
        ("^\\circ", ""),
        ("\\$", ""),
        ("$", ""),
        ("\\%", ""),
        ("%", ""),
        ("\\displaystyle", ""),
    ):
        s = s.replace(old, new)
    # "x = 5" -> "5" when the left side is a single variable
    s = re.sub(r"^[a-zA-Z]\s*=\s*", "", s)
    s = s.replace(" ", "")
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\sqrt(\d+)", r"\\sqrt{\1}", s)
    if re.fullmatch(r"-?\d[\d,]*(\.\d+)?", s):
        s = s.replace(",", "")
        if "." in s:
            s = s.rstrip("0").rstrip(".")
    if s.startswith("."):
        s = "0" + s
    return s


def _choice(ans: str) -> str | None:
    m = re.fullmatch(r"\(?\s*([A-Ea-e])\s*\)?", ans.strip())
    return m.group(1).upper() if m else None


def _nesting(s: str) -> int:
    depth = best = 0
    for ch in s:
        if ch in "{([":
            depth += 1
            best = max(best, depth)
        elif ch in "})]":
            depth -= 1
    return best


def _safe_for_sympy(s: str) -> bool:
    return len(s) <= MAX_ANSWER_CHARS and _nesting(s) <= MAX_NESTING and not _RUNAWAY.search(s)


def equivalent(pred: str, truth: str, timeout_seconds: int = TIMEOUT_SECONDS) -> bool:
    """Mathematical equivalence of two answers (LaTeX without `$`); False when unsure."""
    np_, nt = normalize_answer(pred), normalize_answer(truth)
    if np_ == nt:
        return True
    choice_t, choice_p = _choice(nt), _choice(np_)
    if choice_t is not None:
        return choice_p == choice_t
    if not (_safe_for_sympy(pred) and _safe_for_sympy(truth)):
        return False
    timeout = timeout_seconds if threading.current_thread() is threading.main_thread() else None
    config = [LatexExtractionConfig(boxed_match_priority=0)]
    for a, b in ((truth, pred), (nt, np_)):
        gold = parse(f"${a}$", extraction_config=config, parsing_timeout=timeout)
        answer = parse(f"${b}$", extraction_config=config, parsing_timeout=timeout)
        if gold and answer and verify(gold, answer, timeout_seconds=timeout):
            return True
    return False


def extract_answer(response: str, answer_format: str) -> str | None:
    """The answer `grade` would compare with the truth (None: the response has none)."""
    return grade(response, "", answer_format)["pred"]


def grade(response: str, ground_truth: str, answer_format: str) -> dict:
    """{'score': 1.0 or 0.0, 'pred': the extracted answer or None}; never raises on a response."""
    if answer_format not in ANSWER_FORMATS:
        raise ValueError(f"unknown answer format {answer_format!r}; expected one of {ANSWER_FORMATS}")
    try:
        if answer_format == "boxed":
            pred = last_boxed(response)
            return {"score": float(pred is not None and equivalent(pred, str(ground_truth))), "pred": pred}
        pred = extract_gsm8k_answer(response)
        if pred is None and answer_format == "gsm8k_or_last_number":
            pred = last_number(response)
        p, t = _number(pred), _number(str(ground_truth))
        return {"score": float(p is not None and t is not None and p == t), "pred": pred}
    except Exception:  # noqa: BLE001 - a grader must not take a corpus job down; unparseable = wrong
        return {"score": 0.0, "pred": None}


# Grading pools start from a fresh server process, never by fork: a forked copy of a driver holding
# live Ray/gRPC connections corrupts them (the driver then hangs in its next GCS call).
_POOL_CONTEXT = multiprocessing.get_context("forkserver")

_POOL_CONTEXT.set_forkserver_preload([__name__])

# batches this small are graded in the calling process (milliseconds a response), unless `workers` asks for a pool
IN_PROCESS_ROWS = 256


@functools.cache
def _pool(workers: int) -> ProcessPoolExecutor:
    """One grading pool per size, kept for later calls: each new worker re-imports the caller's main module."""
    return ProcessPoolExecutor(max_workers=workers, mp_context=_POOL_CONTEXT)


def _grade_rows(rows: list[tuple[str, str, str]]) -> list[dict]:
    return [grade(*row) for row in rows]


def grade_many(
    rows: list[tuple[str, str, str]], workers: int | None = None, chunk: int = 64, desc: str = "grading"
) -> list[dict]:
    """`grade(*row)` for every (response, ground_truth, answer_format), in a process pool, in order.

    The pool does not fork the caller (see `_POOL_CONTEXT`), so a script calling this must, as with
    any spawned pool, keep its top-level code under `if __name__ == "__main__":`. Without `workers`, up to
    `IN_PROCESS_ROWS` rows are graded here: a new pool worker re-imports the caller's main module (seconds,
    with verl), which costs more than grading them. `workers=0`: every row here (a one-CPU Ray task).
    """
    if workers == 0 or (workers is None and len(rows) <= IN_PROCESS_ROWS):
        return _grade_rows(rows)
    parts = [rows[i : i + chunk] for i in range(0, len(rows), chunk)]
    pool = _pool(workers or os.cpu_count() or 1)
    results: list[dict] = []
    try:
        with tqdm(total=len(rows), desc=desc, unit="resp", leave=False) as bar:
            for out in pool.map(_grade_rows, parts):
                results.extend(out)
                bar.update(len(out))
    except BrokenProcessPool:
        pool.shutdown(wait=False)
        _pool.cache_clear()  # a worker died: the next call starts a fresh pool
        raise
    return results
