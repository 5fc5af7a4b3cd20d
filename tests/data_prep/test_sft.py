"""The warm-up's loss target: where it stops a run, fresh or resumed (the trainer's side is in test_train_e2e)."""

import json

import numpy as np
import pytest

from data_prep.sft import LossTarget


def first_crossing(losses: np.ndarray, target: float, window: int) -> int:
    """Brute force: the number of updates after which the mean of the last `window` losses is first <= target."""
    means = np.convolve(losses, np.ones(window) / window, mode="valid")  # means[i]: updates i+1 .. i+window
    below = np.flatnonzero(means <= target)
    return int(below[0]) + window if len(below) else len(losses)


def run(losses, until, start: int = 0, history=None) -> int:
    """Trainer.fit's loop: ask `until` before every update, then update (record its loss)."""
    history = [] if history is None else history
    step = start
    while step < len(losses) and not until(step):
        history.append({"policy/loss": float(losses[step])})
        step += 1
    return step


def write_metrics(path, losses):
    """metrics.jsonl with one record per update, newest first (a reader must order them by step)."""
    records = [json.dumps({"step": i + 1, "policy/loss": float(x)}) for i, x in enumerate(losses)]
    path.write_text("".join(r + "\n" for r in reversed(records)))


def noisy_decay(seed: int, n: int = 400) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.exp(-np.linspace(0, 3, n)) * (1 + 0.3 * rng.standard_normal(n)) + 0.05


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("window", [1, 7, 50])
def test_a_fresh_run_stops_at_the_first_window_mean_at_or_below_the_target(tmp_path, seed, window):
    losses = noisy_decay(seed)
    target = float(np.quantile(losses, 0.3))
    history: list[dict] = []
    stopped = run(losses, LossTarget(target, window, tmp_path, history), history=history)
    assert stopped == first_crossing(losses, target, window)
    assert 0 < stopped < len(losses)  # the target is crossed inside the run, not at its cap


def test_a_target_never_reached_runs_to_the_cap(tmp_path):
    losses = noisy_decay(0)
    history: list[dict] = []
    assert run(losses, LossTarget(0.0, 10, tmp_path, history), history=history) == len(losses)


@pytest.mark.parametrize("resumed_at", [0, 30, 120, "crossing"])
def test_a_resumed_run_stops_where_an_uninterrupted_one_would(tmp_path, resumed_at):
    losses, window = noisy_decay(3), 50
    target = float(np.quantile(losses, 0.4))
    expected = first_crossing(losses, target, window)
    start = expected if resumed_at == "crossing" else resumed_at
    # metrics.jsonl as the killed run left it: StepLog drops records after the resumed checkpoint, but a reader
    # must not rely on that, so a record past it is left here
    write_metrics(tmp_path / "metrics.jsonl", losses[: start + 1])
    history: list[dict] = []  # a new process: the trainer's history starts empty
    until = LossTarget(target, window, tmp_path, history)
    assert run(losses, until, start=start, history=history) == expected
    assert len(history) == expected - start  # a run resumed at its stopping point updates no more
