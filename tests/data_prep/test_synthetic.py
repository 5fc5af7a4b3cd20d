"""The synthetic task generator."""

from data_prep import synthetic
from dqo_verl.reward.grading import grade


def evaluate(question: str) -> int:
    """Recompute the answer from the question text alone (an independent reading of the story)."""
    sentences = question.removeprefix("Q: ").removesuffix(" How many now?").split(". ")
    total = int(sentences[0].split(" has ")[1].split()[0])
    for s in sentences[1:]:
        words = s.rstrip(".").split()
        if s.startswith("She buys"):
            total += int(words[2]) * int(words[5])
        elif s.startswith("She finds"):
            total += int(words[2])
        else:
            total -= int(words[3])
    return total


def test_problems_are_consistent_and_deterministic():
    a = synthetic.make_problems(200, seed=7)
    assert a == synthetic.make_problems(200, seed=7)
    assert a != synthetic.make_problems(200, seed=8)
    for p in a:
        assert int(p["answer"]) == evaluate(p["question"]) > 0
        steps = p["solution"].split("\n\n")
        assert steps[-1] == f"#### {p['answer']}"
        for step in steps[:-1]:
            lhs, rhs = step.split("=")
            assert eval(lhs) == int(rhs)  # noqa: S307 - our own arithmetic strings
        assert 2 <= len(steps) - 1 <= 6


def test_held_out_problems_exclude_training_questions():
    train = synthetic.make_problems(300, seed=1)
    test = synthetic.make_problems(300, seed=1, exclude={p["question"] for p in train})
    assert not {p["question"] for p in train} & {p["question"] for p in test}


def test_difficulty_controls_the_number_of_steps():
    hard = synthetic.Difficulty(min_events=4, max_events=4)
    for p in synthetic.make_problems(50, seed=0, difficulty=hard):
        assert p["question"].count("She ") == 4


def test_rows_are_verl_prompt_rows():
    rows = synthetic.to_rows(synthetic.make_problems(3, seed=0), "test")
    assert rows[0]["prompt"][0]["role"] == "user"
    assert rows[2]["reward_model"]["ground_truth"] == synthetic.make_problems(3, seed=0)[2]["answer"]
    assert rows[1]["extra_info"] == {
        "split": "test",
        "index": 1,
        "solution": synthetic.make_problems(3, seed=0)[1]["solution"],
    }


def test_gold_solutions_grade_correct():
    for p in synthetic.make_problems(50, seed=3):
        assert grade(p["solution"], p["answer"], "gsm8k") == {"score": 1.0, "pred": p["answer"]}
