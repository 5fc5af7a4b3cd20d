"""Answer selection and search with a value model (docs/design.md, "Using V"): pure bookkeeping, no models.

- `majority_vote`: self-consistency, the most frequent extracted answer among N samples;
- `best_by_value`: the sample whose final state V scores highest (best-of-N), samples without an answer last;
- `ValueBeam`: step-level beam search for one problem. Each round, every open beam (a response prefix ending
  at a step boundary) is continued K times to its next blank line or its end; the B highest-scoring of the new
  prefixes and the beams already finished are kept; it ends when every kept beam is finished or after
  `max_rounds`. The caller generates and scores (V of the new prefix, or Q of the step), many problems at once
  (`run_beams`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial

Ids = tuple[int, ...]


def majority_vote(answers: Sequence[str | None]) -> int:
    """Index of the first sample with the most frequent answer (None = no answer, never chosen unless all are);
    a tie goes to the answer that appeared first."""
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return 0
    top = max(counts.values())
    return next(i for i, a in enumerate(answers) if a is not None and counts[a] == top)


def best_by_value(values: Sequence[float], answers: Sequence[str | None] | None = None) -> int:
    """Index of the highest value (the first of equal ones); given the samples' extracted `answers`, a sample
    without one ranks below every sample with one, as in majority voting."""
    has = [True] * len(values) if answers is None else [a is not None for a in answers]
    return max(range(len(values)), key=lambda i: (has[i], values[i], -i))


@dataclass
class Beam:
    ids: Ids
    done: bool
    score: float


@dataclass
class ValueBeam:
    """One problem's step-level beam search (B = `beams` kept, K = `k` continuations of each per round)."""

    beams: int
    k: int
    max_rounds: int
    kept: list[Beam] = field(default_factory=lambda: [Beam((), False, 0.0)])
    rounds: int = 0
    tokens: int = 0  # generated tokens, pruned continuations included

    @property
    def finished(self) -> bool:
        return self.rounds >= self.max_rounds or all(b.done for b in self.kept)

    def requests(self) -> list[Ids]:
        """The prefixes to continue this round (each K times)."""
        return [] if self.finished else [b.ids for b in self.kept if not b.done]

    def advance(self, continuations: Sequence[Sequence[tuple[Ids, bool]]], scores: Sequence[Sequence[float]]) -> None:
        """Record round results: for each requested prefix, K (new tokens, ends the response) and their scores."""
        open_beams = [b for b in self.kept if not b.done]
        if len(continuations) != len(open_beams) or len(scores) != len(open_beams):
            raise ValueError(f"{len(continuations)} continuations for {len(open_beams)} open beams")
        candidates = {b.ids: b for b in self.kept if b.done}
        for beam, conts, values in zip(open_beams, continuations, scores):
            for (new, done), value in zip(conts, values, strict=True):
                self.tokens += len(new)
                ids = beam.ids + tuple(new)
                if ids not in candidates or value > candidates[ids].score:  # a repeated sample counts once
                    candidates[ids] = Beam(ids, done, float(value))
        ranked = sorted(candidates.values(), key=lambda b: -b.score)  # stable: earlier candidates win ties
        self.kept = ranked[: self.beams]
        self.rounds += 1

    def best(self, answered: Callable[[Ids], bool] | None = None) -> Beam:
        """The highest-scoring finished beam (an unfinished one only when none finished); given `answered`, a beam
        whose text has no extractable answer ranks below every beam with one, as in best-of-N and the vote."""
        has = answered or (lambda ids: True)
        return max(self.kept, key=lambda b: (b.done, has(b.ids), b.score))


def run_beams(
    searches: list[ValueBeam],
    expand: Callable[[list[tuple[int, Ids]], int], list[list[tuple[Ids, bool]]]],
    score: Callable[[list[tuple[int, Ids]], list[list[tuple[Ids, bool]]]], list[list[float]]],
    answered: Callable[[int, Ids], bool] | None = None,
) -> list[Beam]:
    """Run many searches together: each round, one `expand` and one `score` call for all of them.

    Requests are (index of the search, prefix): `expand(requests, k)` gives K continuations of each prefix,
    `score(requests, continuations)` their scores; `answered(search, ids)`, when given, says whether a finished
    beam has an extractable answer (those without one are picked last)."""
    while not all(s.finished for s in searches):
        active = [i for i, s in enumerate(searches) if not s.finished]
        k = searches[active[0]].k
        if any(searches[i].k != k for i in active):
            raise ValueError("run_beams: every search needs the same k")
        requests = [(i, p) for i in active for p in searches[i].requests()]
        conts = expand(requests, k)
        values = score(requests, conts)
        for i in active:
            mine = [n for n, (j, _) in enumerate(requests) if j == i]
            searches[i].advance([conts[n] for n in mine], [values[n] for n in mine])
    return [s.best(None if answered is None else partial(answered, i)) for i, s in enumerate(searches)]
