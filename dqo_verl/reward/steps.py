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
