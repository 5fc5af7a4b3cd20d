"""Process scores from prefix completions (paper §5.5, A.1, Figure 4).

A response is split into segments at blank lines. For a failed response, the prefix y[0:i] (the
prompt and the first i segments) is *correct* when at least one of K completions sampled from it
reaches the right answer; the longest correct prefix i* earns reward 1/n at the end of each of its
i* segments (a correct response earns 1/n at every segment end). `linear` is the paper's scan
(i = n-1 down to 1, stop at the first correct prefix); `binary` searches i assuming that a prefix of
a correct prefix is correct, and finds the same i* whenever that holds, with about log2(n) probes
instead of up to n-1.

Searches run for many responses at once, one round of probes at a time (`SearchState.next_probe`
/ `record`), so the rollout engines get large batches.
"""

from __future__ import annotations

from dataclasses import dataclass, field

STRATEGIES = ("linear", "binary")


# ------------------------------------------------------------------------------------ segments


def separator_ends(text: str, separator: str = "\n\n", max_segments: int | None = None) -> list[int]:
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


def segment_ends(response_ids: list[int], tokenizer, separator: str = "\n\n", max_segments: int | None = None) -> list[int]:
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


# ------------------------------------------------------------------------------------ search


@dataclass
class SearchState:
    """The search for the longest correct prefix of one failed response with n segments.

    Prefix i (1 <= i <= n-1) is the prompt plus the first i segments; i* = 0 when none is correct.
    """

    n: int
    strategy: str
    lo: int = 0  # binary: the largest prefix known (or assumed) correct
    hi: int = 0  # binary: the largest prefix still possible
    next_linear: int = 0
    result: int | None = None
    probes: list[int] = field(default_factory=list)

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {self.strategy!r}; expected one of {STRATEGIES}")
        self.hi = self.n - 1
        self.next_linear = self.n - 1
        if self.n <= 1:
            self.result = 0

    def next_probe(self) -> int | None:
        """The prefix length to test next; None when the search is over."""
        if self.result is not None:
            return None
        if self.strategy == "linear":
            return self.next_linear
        return (self.lo + self.hi + 1) // 2

    def record(self, i: int, correct: bool) -> None:
        """The outcome of testing prefix i."""
        self.probes.append(i)
        if self.strategy == "linear":
            if correct:
                self.result = i
            elif i == 1:
                self.result = 0
            else:
                self.next_linear = i - 1
            return
        if correct:
            self.lo = i
        else:
            self.hi = i - 1
        if self.lo >= self.hi:
            self.result = self.lo


def search(n: int, is_correct, strategy: str = "binary") -> tuple[int, list[int]]:
    """i* for one response given `is_correct(i)`; returns (i*, the prefixes probed)."""
    state = SearchState(n, strategy)
    while (i := state.next_probe()) is not None:
        state.record(i, bool(is_correct(i)))
    return state.result, state.probes


# ------------------------------------------------------------------------------------ rewards


def process_rewards(
    n_segments: int, correct_prefix: int, outcome_correct: bool, segment_reward: float | None = None,
    reward_correct_responses: bool = True,
) -> list[float]:
    """Per segment end: `segment_reward` (default 1/n) for the first i* segments of a failed response,
    and for every segment of a correct one (when `reward_correct_responses`); 0 elsewhere."""
    r = 1.0 / n_segments if segment_reward is None else segment_reward
    if outcome_correct:
        return [r if reward_correct_responses else 0.0] * n_segments
    return [r] * correct_prefix + [0.0] * (n_segments - correct_prefix)
