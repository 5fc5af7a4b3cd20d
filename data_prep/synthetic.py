"""The built-in synthetic task: multi-step arithmetic word problems in GSM8K format.

`Q: Ann has 4 pens. She buys 4 bags of 6. She gives away 7. How many now?` with the gold solution
`4*6=24\\n\\n4+24=28\\n\\n28-7=21\\n\\n#### 21`: one equation per blank-line-separated step, the
answer after `####`. Deterministic by seed; difficulty by number of events and operand ranges.
Short wording on purpose: the embedded default tokenizes characters.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from dqo_verl.reward.steps import STEP_SEPARATOR

DATA_SOURCE = "synthetic_arith"

NAMES = ["Ann", "Ben", "Cal", "Dee", "Eve", "Fay", "Gus", "Hal", "Ivy", "Jo", "Kim", "Lee"]

ITEMS = ["pens", "cards", "apples", "stamps", "coins", "shells", "beads", "books", "eggs", "nuts"]


@dataclass(frozen=True)
class Difficulty:
    """Number of events per problem and operand ranges (inclusive)."""

    min_events: int = 2
    max_events: int = 3
    start: tuple[int, int] = (2, 30)
    bags: tuple[int, int] = (2, 5)
    per_bag: tuple[int, int] = (2, 12)
    amount: tuple[int, int] = (1, 20)


def make_problem(rng: random.Random, difficulty: Difficulty = Difficulty()) -> dict:
    """One problem: {'question', 'solution', 'answer'}; counts never go below 1."""
    d = difficulty
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    total = rng.randint(*d.start)
    sentences = [f"{name} has {total} {item}."]
    steps = []
    for _ in range(rng.randint(d.min_events, d.max_events)):
        kind = rng.choice(["buy", "find", "give"] if total > 1 else ["buy", "find"])
        if kind == "buy":
            k, m = rng.randint(*d.bags), rng.randint(*d.per_bag)
            sentences.append(f"She buys {k} bags of {m}.")
            steps += [f"{k}*{m}={k * m}", f"{total}+{k * m}={total + k * m}"]
            total += k * m
        elif kind == "find":
            x = rng.randint(*d.amount)
            sentences.append(f"She finds {x} more.")
            steps.append(f"{total}+{x}={total + x}")
            total += x
        else:
            x = rng.randint(d.amount[0], min(d.amount[1], total - 1))
            sentences.append(f"She gives away {x}.")
            steps.append(f"{total}-{x}={total - x}")
            total -= x
    question = "Q: " + " ".join(sentences) + " How many now?"
    solution = STEP_SEPARATOR.join(steps) + f"{STEP_SEPARATOR}#### {total}"
    return {"question": question, "solution": solution, "answer": str(total)}


def make_problems(
    n: int, seed: int, difficulty: Difficulty = Difficulty(), exclude: set[str] | None = None
) -> list[dict]:
    """`n` distinct problems by seed, none of whose question is in `exclude` (for held-out splits)."""
    rng = random.Random(seed)
    seen = set(exclude or ())
    out = []
    for _ in range(1000 * n + 1000):
        if len(out) == n:
            return out
        p = make_problem(rng, difficulty)
        if p["question"] not in seen:
            seen.add(p["question"])
            out.append(p)
    raise ValueError(f"could not draw {n} distinct problems with {difficulty}")


def to_rows(problems: list[dict], split: str) -> list[dict]:
    """verl-style prompt rows: data_source, prompt (chat messages), reward_model, extra_info."""
    return [
        {
            "data_source": DATA_SOURCE,
            "prompt": [{"role": "user", "content": p["question"]}],
            "ability": "math",
            "reward_model": {"style": "rule", "ground_truth": p["answer"]},
            "extra_info": {"split": split, "index": i, "solution": p["solution"]},
        }
        for i, p in enumerate(problems)
    ]
