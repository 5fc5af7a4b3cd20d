"""Reasoning steps: a response's steps end at a separator, a blank line by default (paper §5.5, A.1).

The one definition of a step: process scores (`data_prep.process`), the value curves of the report, the
evaluation's step-level beams and the synthetic task's solutions all split at `process.separator`, whose default
is `STEP_SEPARATOR`. `segment_ends` maps the separators of a response's text to the response tokens where each
step ends.
"""

from __future__ import annotations

# a reasoning step ends at a blank line (paper §5.5, A.1); `process.separator` sets another for a recipe
STEP_SEPARATOR = "\n\n"


def separator_ends(text: str, separator: str = STEP_SEPARATOR, max_segments: int | None = None) -> list[int]:
    """Character offsets just past each separator between segments (a run of newlines counts once).

    With more than `max_segments` segments, separators are kept evenly spread so that at most
    `max_segments` segments remain.
    """
    ends, pos = [], 0
    while True:
        idx = text.find(separator, pos)
        if idx < 0:
            break
        end = idx + len(separator)
        while text.startswith(separator[-1], end):  # "\n\n\n" is one separator
            end += 1
        if end < len(text.rstrip()):  # nothing but whitespace after it: not a segment boundary
            ends.append(end)
        pos = end
    if max_segments is not None and len(ends) > max_segments - 1:
        keep = max_segments - 1
        ends = [ends[round((j + 1) * len(ends) / (keep + 1)) - 1] for j in range(keep)] if keep > 0 else []
    return ends


def segment_ends(
    response_ids: list[int], tokenizer, separator: str = STEP_SEPARATOR, max_segments: int | None = None
) -> list[int]:
    """Response token index at which each segment ends; the last one is the last token.

    A segment ends at the first token whose decoded prefix covers the whole separator, so a
    BPE token that merges the blank line with neighbouring characters still maps exactly.
    """
    ids = list(response_ids)
    if not ids:
        return []
    text = tokenizer.decode(ids, skip_special_tokens=True)
    out = []
    lo = 0
    for end in separator_ends(text, separator, max_segments):
        target = text[:end]
        hi = len(ids) - 1
        while lo < hi:  # smallest t with decode(ids[:t+1]) starting with text[:end]
            mid = (lo + hi) // 2
            if tokenizer.decode(ids[: mid + 1], skip_special_tokens=True).startswith(target):
                hi = mid
            else:
                lo = mid + 1
        if not out or lo > out[-1]:
            out.append(lo)
    if not out or out[-1] != len(ids) - 1:
        out.append(len(ids) - 1)
    return out
