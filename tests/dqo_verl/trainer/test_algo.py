"""algo.py against an independent loop-by-loop implementation of the maths contract (docs/design.md)."""

import math

import pytest
import torch

from dqo_verl.trainer import algo

BETA = 0.03
T = 7


# ---------------------------------------------------------------- reference (plain Python loops)


def ref_actions(length, granularity, seg_ends):
    """List of (start, end) token spans, inclusive, for one row of `length` tokens."""
    if length == 0:
        return []
    if granularity == "token":
        ends = list(range(length))
    elif granularity == "sequence":
        ends = [length - 1]
    else:
        ends = sorted({e for e in seg_ends if e < length} | {length - 1})
    spans, start = [], 0
    for e in ends:
        spans.append((start, e))
        start = e + 1
    return spans


def ref_row(lr, r, v, spans):
    """Action-level (log_ratio, reward, value at first state) lists of one row."""
    return (
        [sum(lr[s : e + 1]) for s, e in spans],
        [sum(r[s : e + 1]) for s, e in spans],
        [v[s] for s, e in spans],
    )


def ref_returns(r, lr, v, beta, lam):
    """G[h] = delta[h] + (1 - lam) V[h+1] + lam G[h+1], G = V = 0 past the end."""
    n = len(r)
    g = [0.0] * (n + 1)
    vv = list(v) + [0.0]
    for h in reversed(range(n)):
        delta = r[h] - beta * lr[h]
        g[h] = delta + (1 - lam) * vv[h + 1] + lam * g[h + 1]
    return g[:n]


def ref_weight(lr_row, log_clip=1.0):
    return min(math.exp(sum(lr_row)), math.exp(log_clip))


def ref_losses(rows, beta, lam, use_w=True):
    """(value loss, policy loss, d policy / d action log_ratio per row) over action-level rows."""
    num_v = num_p = 0.0
    count = 0
    grads = []
    for lr, r, v, w in rows:
        w = w if use_w else 1.0
        g = ref_returns(r, lr, v, beta, lam)
        row_grad = []
        for h in range(len(r)):
            g_next = g[h + 1] if h + 1 < len(r) else 0.0
            num_v += w * (g[h] - v[h]) ** 2
            resid = v[h] + beta * lr[h] - r[h] - g_next
            num_p += w * resid**2
            row_grad.append(2 * w * beta * resid)
            count += 1
        grads.append(row_grad)
    return num_v / count, num_p / count, [[x / count for x in row] for row in grads]


# ---------------------------------------------------------------- fixtures


def make_batch(lengths, seed=0, garbage=float("nan")):
    """Random [B, T] tensors; outside the mask they hold `garbage`, which must never leak in."""
    g = torch.Generator().manual_seed(seed)
    b = len(lengths)
    mask = torch.zeros(b, T)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    lr = torch.randn(b, T, generator=g, dtype=torch.float64) * 0.3
    rewards = torch.zeros(b, T, dtype=torch.float64)
    for i, n in enumerate(lengths):
        rewards[i, n - 1] = float(torch.randint(0, 2, (1,), generator=g))
        if n > 2:
            rewards[i, 1] = 0.25
    values = torch.rand(b, T, generator=g, dtype=torch.float64)
    for x in (lr, rewards, values):
        x[mask == 0] = garbage
    return lr, rewards, values, mask


def rows_of(lr, rewards, values, mask, granularity="token", seg_ends=None, log_clip=1.0):
    out = []
    for i in range(mask.shape[0]):
        n = int(mask[i].sum())
        spans = ref_actions(n, granularity, (seg_ends or {}).get(i, []))
        lr_row = lr[i, :n].tolist()
        a_lr, a_r, a_v = ref_row(lr_row, rewards[i, :n].tolist(), values[i, :n].tolist(), spans)
        out.append((a_lr, a_r, a_v, ref_weight(lr_row, log_clip)))
    return out


LENGTHS = [1, T, 3, 5]  # a length-1 row and a full-length row


# ---------------------------------------------------------------- tests


@pytest.mark.parametrize("lam", [0.0, 0.5, 0.95, 1.0])
def test_lambda_returns_match_reference(lam):
    lr, rewards, values, mask = make_batch(LENGTHS)
    got = algo.compute_lambda_returns(rewards, lr, values, mask, BETA, lam)
    for i, n in enumerate(LENGTHS):
        want = ref_returns(rewards[i, :n].tolist(), lr[i, :n].tolist(), values[i, :n].tolist(), BETA, lam)
        assert got[i, :n].tolist() == pytest.approx(want, abs=1e-12)
        assert torch.all(got[i, n:] == 0)


def test_lambda_one_is_monte_carlo_soft_return_and_lambda_zero_is_one_step():
    lr, rewards, values, mask = make_batch([T], seed=3)
    delta = rewards - BETA * lr
    mc = algo.compute_lambda_returns(rewards, lr, values, mask, BETA, 1.0)
    assert torch.allclose(mc[0], delta[0].flip(0).cumsum(0).flip(0))
    one_step = algo.compute_lambda_returns(rewards, lr, values, mask, BETA, 0.0)
    next_v = torch.cat([values[0, 1:], torch.zeros(1, dtype=values.dtype)])
    assert torch.allclose(one_step[0], delta[0] + next_v)


def test_lambda_returns_are_detached():
    lr, rewards, values, mask = make_batch(LENGTHS, garbage=0.0)
    values.requires_grad_(True)
    lr.requires_grad_(True)
    got = algo.compute_lambda_returns(rewards, lr, values, mask, BETA, 0.5)
    assert not got.requires_grad


def test_is_weights_clip_at_e():
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 1]], dtype=torch.float64)
    lr = torch.tensor(
        [[0.4, 0.5, 99.0], [1.0, 1.0, 1.0], [-3.0, float("nan"), 0], [-0.2, 0.1, -0.3]], dtype=torch.float64
    )
    w = algo.compute_is_weights(lr, mask)
    assert w.tolist() == pytest.approx([math.exp(0.9), math.e, math.exp(-3.0), math.exp(-0.4)])
    assert w.max().item() == pytest.approx(math.e)
    w2 = algo.compute_is_weights(lr, mask, log_clip=2.0)
    assert w2[1].item() == pytest.approx(math.exp(2.0))


@pytest.mark.parametrize("lam", [0.0, 0.5, 0.95, 1.0])
@pytest.mark.parametrize("use_w", [True, False])
def test_losses_match_reference(lam, use_w):
    lr, rewards, values, mask = make_batch(LENGTHS, seed=1)
    returns = algo.compute_lambda_returns(rewards, lr, values, mask, BETA, lam)
    w = algo.compute_is_weights(lr, mask) if use_w else torch.ones(len(LENGTHS), dtype=torch.float64)
    lv, mv = algo.dqo_value_loss(values, returns, w, mask)
    lp, mp = algo.dqo_policy_loss(lr, values, rewards, returns, w, mask, BETA)
    want_v, want_p, _ = ref_losses(rows_of(lr, rewards, values, mask), BETA, lam, use_w)
    assert lv.item() == pytest.approx(want_v, rel=1e-10)
    assert lp.item() == pytest.approx(want_p, rel=1e-10)
    assert torch.isfinite(lv) and torch.isfinite(lp)
    assert mv["value_loss"].item() == pytest.approx(want_v, rel=1e-10)
    assert mp["policy_loss"].item() == pytest.approx(want_p, rel=1e-10)


def test_lambda_one_policy_and_value_residuals_coincide():
    lr, rewards, values, mask = make_batch(LENGTHS, seed=2)
    returns = algo.compute_lambda_returns(rewards, lr, values, mask, BETA, 1.0)
    w = algo.compute_is_weights(lr, mask)
    lv, _ = algo.dqo_value_loss(values, returns, w, mask)
    lp, _ = algo.dqo_policy_loss(lr, values, rewards, returns, w, mask, BETA)
    assert lv.item() == pytest.approx(lp.item(), rel=1e-10)


def test_policy_gradient_only_through_log_ratio():
    lr, rewards, values, mask = make_batch(LENGTHS, seed=4)
    returns = algo.compute_lambda_returns(rewards, lr, values, mask, BETA, 0.5)
    w = algo.compute_is_weights(lr, mask)
    leaves = {k: x.clone().requires_grad_(True) for k, x in dict(lr=lr, v=values, r=rewards, g=returns, w=w).items()}
    loss, _ = algo.dqo_policy_loss(leaves["lr"], leaves["v"], leaves["r"], leaves["g"], leaves["w"], mask, BETA)
    loss.backward()
    for k in ("v", "r", "g", "w"):
        assert leaves[k].grad is None, k
    _, _, want = ref_losses(rows_of(lr, rewards, values, mask), BETA, 0.5)
    grad = leaves["lr"].grad
    for i, n in enumerate(LENGTHS):
        assert grad[i, :n].tolist() == pytest.approx(want[i], rel=1e-9, abs=1e-15)
        assert torch.all(grad[i, n:] == 0)


def test_value_gradient_only_through_values():
    lr, rewards, values, mask = make_batch(LENGTHS, seed=5)
    returns = algo.compute_lambda_returns(rewards, lr, values, mask, BETA, 0.95)
    w = algo.compute_is_weights(lr, mask)
    v = values.clone().requires_grad_(True)
    g = returns.clone().requires_grad_(True)
    ww = w.clone().requires_grad_(True)
    loss, _ = algo.dqo_value_loss(v, g, ww, mask)
    loss.backward()
    assert g.grad is None and ww.grad is None
    n_tok = mask.sum()
    want = torch.where(mask.bool(), -2 * w[:, None] * (returns - values) / n_tok, torch.zeros_like(values))
    assert torch.allclose(v.grad, want)


def test_normalizer_replaces_token_count():
    lr, rewards, values, mask = make_batch(LENGTHS, seed=6)
    returns = algo.compute_lambda_returns(rewards, lr, values, mask, BETA, 1.0)
    w = algo.compute_is_weights(lr, mask)
    full, _ = algo.dqo_value_loss(values, returns, w, mask)
    halves = [
        algo.dqo_value_loss(values[s], returns[s], w[s], mask[s], normalizer=mask.sum())[0]
        for s in (slice(0, 2), slice(2, 4))
    ]
    assert (halves[0] + halves[1]).item() == pytest.approx(full.item(), rel=1e-12)


# ---------------------------------------------------------------- granularity


def collapse(lr, rewards, values, mask, granularity, seg_mask=None):
    ends = algo.compute_action_ends(mask, granularity, seg_mask)
    am = algo.action_mask(ends)
    return (
        algo.collapse_to_actions(lr, ends),
        algo.collapse_to_actions(rewards, ends),
        algo.values_at_action_starts(values, ends),
        am,
    )


def test_token_granularity_is_identity():
    lr, rewards, values, mask = make_batch(LENGTHS, seed=7)
    a_lr, a_r, a_v, am = collapse(lr, rewards, values, mask, "token")
    assert torch.equal(am, mask.float())
    for x, y in ((a_lr, lr), (a_r, rewards), (a_v, values)):
        assert torch.equal(x[mask.bool()], y[mask.bool()])
        assert torch.all(x[~mask.bool()] == 0)


@pytest.mark.parametrize("lam", [0.0, 1.0])
def test_step_granularity_matches_reference(lam):
    lengths = [T, 5, 1, 4]
    seg = {0: [1, 3], 1: [2], 2: [], 3: [0, 1, 2, 3]}
    lr, rewards, values, mask = make_batch(lengths, seed=8)
    seg_mask = torch.zeros_like(mask)
    for i, ends in seg.items():
        seg_mask[i, ends] = 1
    a_lr, a_r, a_v, am = collapse(lr, rewards, values, mask, "step", seg_mask)
    assert am.sum(1).tolist() == [3, 2, 1, 4]
    returns = algo.compute_lambda_returns(a_r, a_lr, a_v, am, BETA, lam)
    w = algo.compute_is_weights(a_lr, am)
    lv, _ = algo.dqo_value_loss(a_v, returns, w, am)
    lp, _ = algo.dqo_policy_loss(a_lr, a_v, a_r, returns, w, am, BETA)
    want_v, want_p, _ = ref_losses(rows_of(lr, rewards, values, mask, "step", seg), BETA, lam)
    assert lv.item() == pytest.approx(want_v, rel=1e-10)
    assert lp.item() == pytest.approx(want_p, rel=1e-10)


@pytest.mark.parametrize("lam", [0.0, 0.5, 1.0])
def test_sequence_granularity_is_dro(lam):
    """H = 1 (Remark 4.2): DRO's losses, w_b (r_b - beta * log pi/pi_ref(y|x) - V(x))^2 averaged over b."""
    lr, rewards, values, mask = make_batch(LENGTHS, seed=9)
    a_lr, a_r, a_v, am = collapse(lr, rewards, values, mask, "sequence")
    assert am.sum(1).tolist() == [1, 1, 1, 1]
    returns = algo.compute_lambda_returns(a_r, a_lr, a_v, am, BETA, lam)
    w = algo.compute_is_weights(a_lr, am)
    lv, _ = algo.dqo_value_loss(a_v, returns, w, am)
    lp, _ = algo.dqo_policy_loss(a_lr, a_v, a_r, returns, w, am, BETA)
    dro = 0.0
    for i, n in enumerate(LENGTHS):
        seq_lr = lr[i, :n].sum().item()
        r = rewards[i, :n].sum().item()
        v0 = values[i, 0].item()
        dro += min(math.exp(seq_lr), math.e) * (r - BETA * seq_lr - v0) ** 2
    dro /= len(LENGTHS)
    assert lv.item() == pytest.approx(dro, rel=1e-10)
    assert lp.item() == pytest.approx(dro, rel=1e-10)


def test_collapse_is_differentiable_per_token():
    lr, rewards, values, mask = make_batch([4, 2], seed=10, garbage=0.0)
    lr.requires_grad_(True)
    values.requires_grad_(True)
    ends = algo.compute_action_ends(mask, "sequence")
    algo.collapse_to_actions(lr, ends)[:, 0].sum().backward()
    assert torch.equal(lr.grad, mask.double())
    algo.values_at_action_starts(values, ends)[:, 0].sum().backward()
    want = torch.zeros_like(values)
    want[:, 0] = 1
    assert torch.equal(values.grad, want)


def test_unknown_granularity_and_missing_segments_raise():
    mask = torch.ones(1, 3)
    with pytest.raises(ValueError, match="granularity"):
        algo.compute_action_ends(mask, "paragraph")
    with pytest.raises(ValueError, match="segment_ends"):
        algo.compute_action_ends(mask, "step")


@pytest.mark.parametrize("granularity,lam", [("token", 0.5), ("step", 1.0), ("sequence", 0.0), ("step", 0.95)])
def test_dqo_targets_match_reference(granularity, lam):
    """One update's targets from per-token tensors: actions, lambda-returns and weights, row by row."""
    lengths = [T, 5, 1, 4]
    seg = {0: [1, 3], 1: [2], 2: [], 3: [0, 1, 2, 3]}
    lr, rewards, values, mask = make_batch(lengths, seed=11)
    seg_mask = torch.zeros_like(mask)
    for i, ends in seg.items():
        seg_mask[i, ends] = 1
    ends = algo.compute_action_ends(mask, granularity, seg_mask if granularity == "step" else None)
    t = algo.dqo_targets(lr, values, rewards, ends, BETA, lam, is_log_clip=0.5)
    for i, (a_lr, a_r, a_v, w) in enumerate(rows_of(lr, rewards, values, mask, granularity, seg, log_clip=0.5)):
        n = len(a_lr)
        assert t.mask[i].tolist() == [1.0] * n + [0.0] * (T - n)
        assert t.log_ratio[i, :n].tolist() == pytest.approx(a_lr, abs=1e-12)
        assert t.rewards[i, :n].tolist() == pytest.approx(a_r, abs=1e-12)
        assert t.values[i, :n].tolist() == pytest.approx(a_v, abs=1e-12)
        assert t.returns[i, :n].tolist() == pytest.approx(ref_returns(a_r, a_lr, a_v, BETA, lam), abs=1e-12)
        assert t.weights[i].item() == pytest.approx(w, rel=1e-12)
        assert torch.all(t.returns[i, n:] == 0)


# ---------------------------------------------------------------- preference baselines, against loops over examples


def test_dpo_loss_matches_a_loop_over_pairs():
    g = torch.Generator().manual_seed(3)
    chosen, rejected, beta = torch.randn(7, generator=g), torch.randn(7, generator=g), 0.1
    loss, metrics = algo.dpo_loss(chosen, rejected, beta)
    ref = sum(-math.log(1 / (1 + math.exp(-beta * (w - r)))) for w, r in zip(chosen.tolist(), rejected.tolist())) / 7
    assert loss.item() == pytest.approx(ref, rel=1e-6)
    assert metrics["accuracy"] == pytest.approx(sum(w > r for w, r in zip(chosen.tolist(), rejected.tolist())) / 7)


def test_kto_loss_matches_a_loop_over_responses():
    g = torch.Generator().manual_seed(4)
    r, labels, beta, wd, wu = torch.randn(9, generator=g), torch.tensor([1, 0, 1, 1, 0, 0, 1, 0, 0]), 0.1, 1.0, 1.33
    mismatched = torch.randn(9, generator=g) + 0.5
    z0 = algo.kto_reference_point(mismatched)
    assert z0.item() == pytest.approx(max(0.0, sum(mismatched.tolist()) / 9), rel=1e-6)
    assert algo.kto_reference_point(torch.tensor([-1.0, -2.0])).item() == 0.0  # a KL estimate is never negative
    loss, _ = algo.kto_loss(r, labels, z0, beta, wd, wu)

    def sigmoid(x):
        return 1 / (1 + math.exp(-x))

    ref = 0.0
    for ri, yi in zip(r.tolist(), labels.tolist()):
        ref += wd * (1 - sigmoid(beta * (ri - z0.item()))) if yi else wu * (1 - sigmoid(beta * (z0.item() - ri)))
    assert loss.item() == pytest.approx(ref / 9, rel=1e-6)


@pytest.mark.parametrize("method", ["dpo", "kto"])
def test_a_step_on_the_sequence_surrogate_is_a_step_on_the_loss(method):
    """The driver turns a loss of whole-response log-probs into coefficients c_i; the workers' surrogate
    sum_i c_i log pi(y_i) has the loss's gradient (a toy 'policy': per-token logits as parameters)."""
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(6, 5, 11, generator=g, requires_grad=True)  # 6 responses, 5 tokens, vocab 11
    tokens = torch.randint(0, 11, (6, 5), generator=g)
    mask = torch.ones(6, 5)
    mask[1, 3:] = 0
    ref = torch.randn(6, generator=g)

    def sequence_log_probs():
        logp = torch.log_softmax(logits, -1).gather(-1, tokens[..., None])[..., 0]
        return (logp * mask).sum(-1)

    def loss_of(seq):
        if method == "dpo":
            return algo.dpo_loss(seq[0::2] - ref[0::2], seq[1::2] - ref[1::2], beta=0.1)[0]
        z0 = algo.kto_reference_point(torch.tensor([0.2, 0.4]))
        return algo.kto_loss(seq - ref, torch.tensor([1, 0, 1, 1, 0, 0]), z0, beta=0.1, undesirable_weight=1.5)[0]

    (true_grad,) = torch.autograd.grad(loss_of(sequence_log_probs()), logits)
    seq = sequence_log_probs().detach().requires_grad_(True)
    c = algo.sequence_coefficients(loss_of(seq), seq)
    (surrogate_grad,) = torch.autograd.grad((c * sequence_log_probs()).sum(), logits)
    assert torch.allclose(surrogate_grad, true_grad, atol=1e-7) and true_grad.abs().sum() > 0
