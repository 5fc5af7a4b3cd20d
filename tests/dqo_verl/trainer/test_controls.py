"""The training controls (docs/design.md, "Controls") against brute-force loops: loss aggregation, the trajectory
weight's form, the token-level KL; the paper's settings are the defaults."""

import math

import pytest
import torch

from dqo_verl.trainer import algo

LENGTHS = [3, 1, 5, 2]


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    T = max(LENGTHS)
    mask = torch.tensor([[1.0 if t < n else 0.0 for t in range(T)] for n in LENGTHS], dtype=torch.float64)
    x = torch.randn(len(LENGTHS), T, generator=g, dtype=torch.float64)
    x = torch.where(mask.bool(), x, torch.full_like(x, float("nan")))  # garbage outside the mask never leaks in
    return x, mask


def brute_aggregate(x, mask, mode):
    rows = [[x[b, t].item() for t in range(x.shape[1]) if mask[b, t]] for b in range(x.shape[0])]
    rows = [r for r in rows if r]
    if mode == "token-mean":
        return sum(sum(r) for r in rows) / sum(len(r) for r in rows)
    if mode == "seq-mean-token-mean":
        return sum(sum(r) / len(r) for r in rows) / len(rows)
    return sum(sum(r) for r in rows) / len(rows)  # seq-mean-token-sum


@pytest.mark.parametrize("mode", algo.LOSS_AGG_MODES)
def test_aggregate_equals_loops_and_micro_batches_add_up_to_the_batch(mode):
    x, mask = batch()
    assert algo.aggregate(x, mask, mode).item() == pytest.approx(
        brute_aggregate(x, mask, mode), rel=1e-7
    )  # verl guards each row's token count with +1e-8
    # split into micro-batches with the whole batch's counts: the parts sum to the whole
    n, s = mask.sum(), (mask.sum(dim=1) > 0).sum()
    parts = sum(algo.aggregate(x[i : i + 2], mask[i : i + 2], mode, n, s) for i in (0, 2))
    assert parts.item() == pytest.approx(
        brute_aggregate(x, mask, mode), rel=1e-7
    )  # verl guards each row's token count with +1e-8


def test_the_aggregations_differ_when_lengths_differ_and_token_mean_is_the_paper_default():
    x, mask = batch(1)
    got = {m: algo.aggregate(x, mask, m).item() for m in algo.LOSS_AGG_MODES}
    assert len({round(v, 9) for v in got.values()}) == 3
    w = torch.ones(len(LENGTHS), dtype=torch.float64)
    default, _ = algo.dqo_value_loss(torch.zeros_like(x), torch.nan_to_num(x), w, mask)
    assert default.item() == pytest.approx(brute_aggregate(torch.nan_to_num(x) ** 2, mask, "token-mean"))


@pytest.mark.parametrize("mode", algo.LOSS_AGG_MODES)
def test_both_losses_aggregate_their_weighted_squared_errors(mode):
    x, mask = batch(2)
    values, returns = torch.nan_to_num(x), torch.nan_to_num(batch(3)[0])
    w = torch.tensor([0.5, 2.0, 1.0, 0.25], dtype=torch.float64)
    v_loss, _ = algo.dqo_value_loss(values, returns, w, mask, loss_agg_mode=mode)
    want = brute_aggregate(((returns - values) ** 2) * w[:, None], mask, mode)
    assert v_loss.item() == pytest.approx(want, rel=1e-7)  # verl guards each row's token count with +1e-8
    beta, rewards = 0.1, torch.zeros_like(values)
    p_loss, _ = algo.dqo_policy_loss(values, values, rewards, returns, w, mask, beta, loss_agg_mode=mode)
    nxt = torch.nn.functional.pad(returns * mask, (0, 1))[:, 1:]
    want = brute_aggregate(((beta * values + values - nxt) ** 2) * w[:, None], mask, mode)
    assert p_loss.item() == pytest.approx(want, rel=1e-7)  # verl guards each row's token count with +1e-8


def test_length_normalized_weights_are_the_per_action_geometric_mean_clipped():
    lr = torch.tensor([[0.6, 0.6, 0.6, 0.0], [3.0, 0.0, 0.0, 0.0], [-0.2, -0.4, 0.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 0, 0]], dtype=torch.float64)
    product = algo.compute_is_weights(lr, mask, 1.0)
    normalized = algo.compute_is_weights(lr, mask, 1.0, "length-normalized")
    for b, n in enumerate([3, 1, 2]):
        total = sum(lr[b, k].item() for k in range(n))
        assert product[b].item() == pytest.approx(math.exp(min(total, 1.0)))
        assert normalized[b].item() == pytest.approx(math.exp(min(total / n, 1.0)))
    assert product[0].item() == pytest.approx(math.e) and normalized[0].item() == pytest.approx(math.exp(0.6))
    with pytest.raises(ValueError, match="length-normalized"):
        algo.compute_is_weights(lr, mask, 1.0, "sum")


def test_token_kl_estimators_equal_their_formulas():
    lr = torch.tensor([[0.3, -0.7, 2.0], [0.1, 0.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=torch.float64)
    k3 = algo.token_kl(lr, mask, "low_var_kl")
    k1 = algo.token_kl(lr, mask, "kl")
    k2 = algo.token_kl(lr, mask, "mse")
    for b in range(2):
        for t in range(3):
            r = lr[b, t].item()
            on = bool(mask[b, t])
            assert k3[b, t].item() == pytest.approx(math.exp(-r) + r - 1 if on else 0.0)
            assert k1[b, t].item() == pytest.approx(r if on else 0.0)
            assert k2[b, t].item() == pytest.approx(0.5 * r * r if on else 0.0)
    # the KL term pulls log pi toward log pi_ref: its gradient has the sign of the log-ratio (k3: 1 - e^-r)
    x = lr.clone().requires_grad_(True)
    algo.aggregate(algo.token_kl(x, mask, "low_var_kl"), mask).backward()
    assert torch.sign(x.grad[0]).tolist() == [1.0, -1.0, 1.0] and x.grad[1, 1:].abs().sum() == 0


def test_response_classes_right_wrong_cut():
    import pandas as pd

    from dqo_verl.trainer.batches import RESPONSE_CLASSES, response_classes

    rows = pd.DataFrame({"score": [1.0, 0.0, 0.0, 1.0], "cut": [False, False, True, False]})
    assert [RESPONSE_CLASSES[c] for c in response_classes(rows).tolist()] == ["right", "wrong", "cut", "right"]
    assert response_classes(rows.drop(columns="cut")).tolist() == [0, 1, 1, 0]  # no flag: nothing is cut


def test_class_diagnostics_equal_loops():
    g = torch.Generator().manual_seed(4)
    lengths, classes = [3, 1, 4, 2], torch.tensor([0, 1, 2, 1])
    T = max(lengths)
    mask = torch.tensor([[1.0 if t < n else 0.0 for t in range(T)] for n in lengths], dtype=torch.float64)
    lr = torch.randn(4, T, generator=g, dtype=torch.float64) * mask
    logp = -torch.rand(4, T, generator=g, dtype=torch.float64) * mask
    values = torch.randn(4, T, generator=g, dtype=torch.float64) * mask
    rewards = torch.zeros(4, T, dtype=torch.float64)
    for b, n in enumerate(lengths):
        rewards[b, n - 1] = float(classes[b] == 0)
    ends = mask.bool()
    t = algo.dqo_targets(lr, values, rewards, ends, 0.1, 1.0, 0.5)
    vt = algo.value_terms(t.values, t.returns, t.weights, t.mask)
    pt = algo.policy_terms(t.log_ratio, t.values, t.rewards, t.returns, t.weights, t.mask, 0.1)
    got = algo.class_diagnostics(classes, ("right", "wrong", "cut"), t, lr, logp, mask, vt, pt, 0.5)
    for c, name in enumerate(("right", "wrong", "cut")):
        rows = [b for b in range(4) if classes[b] == c]
        mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
        seq = [sum(lr[b, :n].tolist()) for b, n in enumerate(lengths)]
        w = [math.exp(min(s, 0.5)) for s in seq]
        want = {
            "share": len(rows) / 4,
            "seq_log_ratio": mean([seq[b] for b in rows]),
            "weight_mean": mean([w[b] for b in rows]),
            "weight_clipped": mean([float(s >= 0.5) for s in [seq[b] for b in rows]]),
            "v_first": mean([values[b, 0].item() for b in rows]),
            "return_first": mean([t.returns[b, 0].item() for b in rows]),
            "v_last": mean([values[b, lengths[b] - 1].item() for b in rows]),
            "return_last": mean([t.returns[b, lengths[b] - 1].item() for b in rows]),
            "nll": mean([-sum(logp[b, : lengths[b]].tolist()) / lengths[b] for b in rows]),
            "value_loss_share": sum(vt[b].sum().item() for b in rows) / vt.sum().item(),
            "policy_loss_share": sum(pt[b].sum().item() for b in rows) / pt.sum().item(),
        }
        for key, value in want.items():
            assert got[f"diag/{name}/{key}"] == pytest.approx(value, rel=1e-9, abs=1e-12), (name, key)
    assert sum(got[f"diag/{n}/share"] for n in ("right", "wrong", "cut")) == pytest.approx(1.0)
    assert sum(got[f"diag/{n}/value_loss_share"] for n in ("right", "wrong", "cut")) == pytest.approx(1.0)
    # the return at the last state is the final soft reward: r - beta * log-ratio of the last action
    assert got["diag/right/return_last"] == pytest.approx(1.0 - 0.1 * lr[0, 2].item())


def test_the_outcome_verifier_regresses_v_at_the_last_state_on_the_outcome():
    x, mask = batch(5)
    values = torch.nan_to_num(x).requires_grad_(True)
    rewards = torch.zeros_like(values)
    outcome = [1.0, 0.0, 1.0, 0.0]
    for b, n in enumerate(LENGTHS):
        rewards[b, n - 1] = outcome[b]
    loss, _ = algo.outcome_verifier_loss(values, rewards, mask)
    want = sum((values[b, n - 1].item() - outcome[b]) ** 2 for b, n in enumerate(LENGTHS)) / len(LENGTHS)
    assert loss.item() == pytest.approx(want, rel=1e-12)
    loss.backward()
    for b, n in enumerate(LENGTHS):  # only the last state of each response moves
        assert values.grad[b, : n - 1].abs().sum() == 0 and values.grad[b, n:].abs().sum() == 0
        assert values.grad[b, n - 1].item() == pytest.approx(2 * (values[b, n - 1].item() - outcome[b]) / 4)
