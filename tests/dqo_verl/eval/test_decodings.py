"""The registry of decodings: which runs an evaluation plans, each resolved to its decoding by kind."""

from omegaconf import OmegaConf

from dqo_verl.eval.decodings import DECODINGS, planned_runs


def evaluate(**kw):
    base = {
        "greedy": True,
        "sampling": {"temperature": 0.7, "top_p": 0.9, "top_k": 16, "min_p": 0.01, "seeds": [3, 4]},
        "value": {"n": 8, "by": ["value", "q"], "beam": {"beams": 2, "k": 3}},
    }
    return OmegaConf.merge(base, kw)


def test_the_planned_runs_and_their_decodings():
    runs = planned_runs(evaluate(), OmegaConf.create({}), guided=True)
    assert [(r.kind, r.label, r.seed, r.n, r.by) for r in runs] == [
        ("greedy", "greedy", 0, 1, None),
        ("sample", "sample", 3, 1, None),
        ("sample", "sample", 4, 1, None),
        ("value", "value", 3, 8, None),
        ("beam", "value beam 2x3", 3, 1, "value"),
        ("beam", "Q beam 2x3", 3, 1, "q"),
    ]
    assert runs[0].params["temperature"] == 0.0 and runs[1].params["temperature"] == 0.7
    assert all(r.kind in DECODINGS for r in runs)


def test_a_set_with_several_samples_per_problem_takes_one_seed_and_no_value_runs_unguided():
    runs = planned_runs(evaluate(greedy=False), OmegaConf.create({"samples": 30}), guided=False)
    assert [(r.kind, r.seed, r.n) for r in runs] == [("sample", 3, 30)]
