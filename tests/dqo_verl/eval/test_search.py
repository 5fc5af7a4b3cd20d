"""Answer selection and the value beam's bookkeeping on toys with hand-computable answers."""

import pytest

from dqo_verl.eval.search import ValueBeam, best_by_value, majority_vote, run_beams

# a binary tree of depth 3: V of every prefix (token ids 0/1); greedy by V takes 0 first and ends low
V = {
    (0,): 0.6, (1,): 0.5,
    (0, 0): 0.1, (0, 1): 0.2, (1, 0): 0.9, (1, 1): 0.3,
    (0, 0, 0): 0.0, (0, 0, 1): 0.1, (0, 1, 0): 0.25, (0, 1, 1): 0.15,
    (1, 0, 0): 1.0, (1, 0, 1): 0.2, (1, 1, 0): 0.4, (1, 1, 1): 0.35,
}  # fmt: skip


def expand(requests, k):
    """K continuations of each prefix: one token each (0, 1, ...), the response ends at depth 3."""
    return [[((j,), len(p) + 1 == 3) for j in range(k)] for _, p in requests]


def score(requests, continuations):
    return [[V[p + new] for new, _ in conts] for (_, p), conts in zip(requests, continuations)]


def test_majority_vote_and_best_of_n():
    assert majority_vote(["3", "5", None, "5", "3"]) == 0  # a tie: the answer seen first
    assert majority_vote([None, "7", "5", "5"]) == 2
    assert majority_vote([None, None]) == 0
    assert best_by_value([0.2, 0.9, 0.9, -1.0]) == 1
    # a sample without an extracted answer ranks below every sample with one, whatever its value
    assert best_by_value([0.2, 0.9, 0.9, -1.0], ["3", None, None, "4"]) == 0
    assert best_by_value([0.2, 0.9], [None, None]) == 1  # none has one: by value


@pytest.mark.parametrize("beams,answer,value,tokens", [(1, (0, 1, 0), 0.25, 2 + 2 + 2), (2, (1, 0, 0), 1.0, 2 + 4 + 4)])
def test_value_beam_keeps_the_best_prefixes(beams, answer, value, tokens):
    search = ValueBeam(beams=beams, k=2, max_rounds=10)
    (best,) = run_beams([search], expand, score)
    assert (best.ids, best.done, best.score, search.tokens, search.rounds) == (answer, True, value, tokens, 3)


def test_finished_beams_compete_and_end_the_search():
    def early(requests, k):  # token 1 ends the response at once
        return [[((j,), j == 1 or len(p) + 1 == 3) for j in range(k)] for _, p in requests]

    search = ValueBeam(beams=2, k=2, max_rounds=10)
    (best,) = run_beams([search], early, score)
    # round 1 keeps (0,) open and (1,) finished at 0.5; round 2: (0, 1) 0.2 finished, (0, 0) 0.1 open -> pruned
    assert (best.ids, best.score, search.rounds, search.tokens) == ((1,), 0.5, 2, 4)
    assert [b.ids for b in search.kept] == [(1,), (0, 1)] and search.finished


def test_many_searches_run_together_and_stop_at_max_rounds():
    calls = []

    def counting_expand(requests, k):
        calls.append([i for i, _ in requests])
        return expand(requests, k)

    wide, capped = ValueBeam(beams=2, k=2, max_rounds=10), ValueBeam(beams=1, k=2, max_rounds=1)
    best = run_beams([wide, capped], counting_expand, score)
    assert calls == [[0, 1], [0, 0], [0, 0]]  # round 1: both roots; then wide's 2 beams (capped stopped)
    assert best[0].ids == (1, 0, 0) and (best[1].ids, best[1].done) == ((0,), False)  # unfinished: still reported
    with pytest.raises(ValueError, match="continuations for 1 open beams"):
        ValueBeam(beams=1, k=2, max_rounds=3).advance([], [])


def test_a_finished_beam_without_an_answer_is_picked_last():
    def early(requests, k):  # token 1 ends the response at once
        return [[((j,), j == 1 or len(p) + 1 == 3) for j in range(k)] for _, p in requests]

    search = ValueBeam(beams=2, k=2, max_rounds=10)
    # as above, (1,) at 0.5 and (0, 1) at 0.2 finish; say (1,) has no extractable answer: (0, 1) is picked
    (best,) = run_beams([search], early, score, answered=lambda i, ids: ids != (1,))
    assert (best.ids, best.score) == ((0, 1), 0.2)
    assert search.best(lambda ids: False).ids == (1,)  # none has an answer: by score
