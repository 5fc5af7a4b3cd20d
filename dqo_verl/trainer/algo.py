"""DQO maths: the pure functions of the maths contract in docs/design.md.

Direct Q-function Optimization (Ji, Liu, Dai et al.) treats generation as a token-level MDP with the
soft Q-function parameterised by the policy, Q(s, a) = beta * log pi(a|s) / pi_ref(a|s) + V(s)
(eq. 4.4). A value model V_phi is regressed on soft Bellman targets (eq. 4.3; with lambda-returns and
importance weights, eq. 4.6), and the policy's Q on the same targets (eq. 4.5; eq. 4.7).

Conventions: tensors are [B, T] over response positions t = 0..T-1; `response_mask` is 1 on real
response tokens. `values[b, t]` = V(s_t), the value of the state *before* response token t.
Entries outside the mask are ignored on input and 0 on output.

Action granularity (§4.2 and Remark 4.2): the same functions serve token-level DQO, step-level
actions (blank-line segments) and whole-sequence actions (DRO) once the per-token tensors are
collapsed with `collapse_to_actions` / `values_at_action_starts`: action k sits in column k and
the action mask is `action_mask(action_ends)`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from verl.trainer.ppo.core_algos import agg_loss, kl_penalty

GRANULARITIES = ("token", "step", "sequence")
# how a loss matrix [B, T] becomes the loss (verl's `agg_loss` modes): the paper's is token-mean
LOSS_AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")
# the trajectory importance weight: the paper's product of per-action ratios, or its per-action geometric mean
IS_WEIGHT_FORMS = ("product", "length-normalized")


def _masked(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x where mask, else 0 (garbage outside the mask, even NaN, never leaks in)."""
    return torch.where(mask.bool(), x, torch.zeros_like(x))


def last_token_mask(response_mask: torch.Tensor) -> torch.Tensor:
    """Bool [B, T]: True at the last real token of each row (none for empty rows)."""
    mask = response_mask.bool()
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    last = torch.where(mask, positions, -1).amax(dim=1, keepdim=True)
    return (positions == last) & mask


def compute_action_ends(
    response_mask: torch.Tensor, granularity: str, segment_ends: torch.Tensor | None = None
) -> torch.Tensor:
    """Bool [B, T]: True at the last token of each action.

    token: every real token; step: every segment end plus the last token; sequence: the last token.
    """
    mask = response_mask.bool()
    if granularity == "token":
        return mask.clone()
    last = last_token_mask(mask)
    if granularity == "sequence":
        return last
    if granularity == "step":
        if segment_ends is None:
            raise ValueError("granularity='step' needs segment_ends")
        return (segment_ends.bool() & mask) | last
    raise ValueError(f"unknown granularity {granularity!r}; expected one of {GRANULARITIES}")


def _action_index(action_ends: torch.Tensor) -> torch.Tensor:
    """Long [B, T]: index of the action that token t belongs to."""
    ends = action_ends.long()
    return (ends.cumsum(dim=1) - ends).clamp(max=ends.shape[1] - 1)


def _tokens_in_actions(action_ends: torch.Tensor) -> torch.Tensor:
    """Bool [B, T]: tokens up to the last action end (those that belong to an action)."""
    ends = action_ends.long()
    return ends.flip(1).cumsum(dim=1).flip(1) > 0


def action_mask(action_ends: torch.Tensor) -> torch.Tensor:
    """Float [B, T]: 1 on the first n_b columns, n_b = number of actions in row b."""
    n_actions = action_ends.long().sum(dim=1, keepdim=True)
    columns = torch.arange(action_ends.shape[1], device=action_ends.device)
    return (columns < n_actions).float()


def collapse_to_actions(x: torch.Tensor, action_ends: torch.Tensor) -> torch.Tensor:
    """[B, T] -> [B, T]: column k holds the sum of `x` over the tokens of action k (differentiable)."""
    src = _masked(x, _tokens_in_actions(action_ends))
    return torch.zeros_like(x).scatter_add(1, _action_index(action_ends), src)


def values_at_action_starts(values: torch.Tensor, action_ends: torch.Tensor) -> torch.Tensor:
    """[B, T] -> [B, T]: column k holds V at the first state of action k (differentiable)."""
    inside = _tokens_in_actions(action_ends)
    previous_is_end = torch.nn.functional.pad(action_ends.bool()[:, :-1], (1, 0), value=True)
    is_start = inside & previous_is_end
    src = _masked(values, is_start)
    return torch.zeros_like(values).scatter_add(1, _action_index(action_ends), src)


def compute_lambda_returns(
    rewards: torch.Tensor,
    log_ratio: torch.Tensor,
    values: torch.Tensor,
    response_mask: torch.Tensor,
    beta: float,
    lam: float,
) -> torch.Tensor:
    """lambda-returns of the KL-regularised reward, [B, T], detached (the targets of eq. 4.6 and 4.7).

    delta_t = r_t - beta * log(pi/pi_ref)_t                          (the soft reward)
    G_t = delta_t + (1 - lam) * V_{t+1} + lam * G_{t+1},  G = V = 0 after the last real token.
    lam = 1: Monte-Carlo soft return; lam = 0: one-step target of eq. 4.3. This is the normalised
    lambda-return (weights sum to 1); the paper's displayed sum omits the tail weight lam^(H-h).
    """
    mask = response_mask.to(values.dtype)
    delta = _masked(rewards.detach() - beta * log_ratio.detach(), mask)
    v = _masked(values.detach(), mask)
    returns = torch.zeros_like(v)
    next_return = torch.zeros_like(v[:, 0])
    next_value = torch.zeros_like(v[:, 0])
    for t in reversed(range(v.shape[1])):
        g = (delta[:, t] + (1.0 - lam) * next_value + lam * next_return) * mask[:, t]
        returns[:, t] = g
        next_return, next_value = g, v[:, t]
    return returns


def compute_is_weights(
    log_ratio: torch.Tensor, response_mask: torch.Tensor, log_clip: float = 1.0, form: str = "product"
) -> torch.Tensor:
    """Per-trajectory importance weights [B], detached (eq. 4.6, 4.7):

    product (the paper's):    w_b = min(pi(y|x) / pi_ref(y|x), e^log_clip) = exp(min(sum_k lr_bk, log_clip))
    length-normalized:        w_b = exp(min(sum_k lr_bk / n_b, log_clip))   (n_b actions; a per-action ratio)
    """
    mask = response_mask.to(log_ratio.dtype)
    seq_log_ratio = _masked(log_ratio.detach(), mask).sum(dim=1)
    if form == "length-normalized":
        seq_log_ratio = seq_log_ratio / mask.sum(dim=1).clamp(min=1)
    elif form != "product":
        raise ValueError(f"unknown importance-weight form {form!r}; expected one of {IS_WEIGHT_FORMS}")
    return torch.exp(seq_log_ratio.clamp(max=log_clip))


def aggregate(
    loss_mat: torch.Tensor,
    mask: torch.Tensor,
    mode: str = "token-mean",
    normalizer: float | None = None,
    seq_normalizer: float | None = None,
) -> torch.Tensor:
    """The loss of a batch from its per-action terms (verl's `agg_loss`; docs/design.md, "Loss aggregation"):

    token-mean (the paper's, eq. 4.6/4.7): sum_{b,k} m l / N,        N = `normalizer` (default: sum m)
    seq-mean-token-mean:                   sum_b (sum_k m l / n_b) / S, S = `seq_normalizer` (default: rows with
    seq-mean-token-sum:                    sum_b (sum_k m l) / S         an action), n_b = actions of row b
    A global N or S (the whole update's, over ranks and micro-batches) makes micro-batch losses add up to it.
    """
    if mode not in LOSS_AGG_MODES:
        raise ValueError(f"unknown loss aggregation {mode!r}; expected one of {LOSS_AGG_MODES}")
    mask = mask.to(loss_mat.dtype)
    loss_mat = _masked(loss_mat, mask)
    if mode == "token-mean":
        normalizer = mask.sum().clamp(min=1) if normalizer is None else normalizer
    elif seq_normalizer is None:
        seq_normalizer = (mask.sum(dim=1) > 0).sum().clamp(min=1)
    return agg_loss(loss_mat, mask, mode, batch_num_tokens=normalizer, global_batch_size=seq_normalizer)


def token_kl(log_ratio: torch.Tensor, response_mask: torch.Tensor, estimator: str = "low_var_kl") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from log(pi/pi_ref) at the sampled tokens (verl's `kl_penalty`
    estimators: kl/k1, mse/k2, low_var_kl/k3 (clamped), with `+` for the k2 gradient), 0 outside the mask."""
    return _masked(kl_penalty(log_ratio, torch.zeros_like(log_ratio), estimator), response_mask)


def value_terms(values: torch.Tensor, returns: torch.Tensor, weights: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, T]: the value loss's terms w_b (G_bt - V(s_bt))^2 (eq. 4.6), 0 outside the mask."""
    err = _masked(returns.detach() - values, mask)  # masked first: garbage outside never reaches a gradient
    return err.square() * weights.detach().unsqueeze(1)


def policy_terms(
    log_ratio: torch.Tensor,
    values: torch.Tensor,
    rewards: torch.Tensor,
    returns: torch.Tensor,
    weights: torch.Tensor,
    mask: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """[B, T]: the policy loss's terms w_b (beta log_ratio_t + Vbar_t - r_t - G_{t+1})^2 (eq. 4.7), 0 outside."""
    mask = mask.to(log_ratio.dtype)
    next_returns = torch.nn.functional.pad(_masked(returns.detach(), mask)[:, 1:], (0, 1))  # G_{t+1}; 0 at the end
    err = _masked(beta * log_ratio + values.detach() - rewards.detach() - next_returns, mask)
    return err.square() * weights.detach().unsqueeze(1)


def dqo_value_loss(
    values: torch.Tensor,
    returns: torch.Tensor,
    weights: torch.Tensor,
    response_mask: torch.Tensor,
    normalizer: float | None = None,
    loss_agg_mode: str = "token-mean",
    seq_normalizer: float | None = None,
) -> tuple[torch.Tensor, dict]:
    """L_V = sum_{b,t} m * w_b * (G_bt - V_phi(s_bt))^2 / sum m (eq. 4.3, 4.6); gradient only through `values`.

    `normalizer` replaces `sum m` (a global count when the batch is split across ranks/micro-batches);
    `loss_agg_mode` / `seq_normalizer`: another aggregation of the same terms (`aggregate`).
    """
    mask = response_mask.to(values.dtype)
    err = _masked(returns.detach() - values, mask)
    loss = aggregate(value_terms(values, returns, weights, mask), mask, loss_agg_mode, normalizer, seq_normalizer)
    n = mask.sum().clamp(min=1)
    metrics = {
        "value_loss": loss.detach(),
        "values_mean": _masked(values.detach(), mask).sum() / n,
        "returns_mean": _masked(returns.detach(), mask).sum() / n,
        "value_abs_err": err.detach().abs().sum() / n,
    }
    return loss, metrics


def dqo_policy_loss(
    log_ratio: torch.Tensor,
    values: torch.Tensor,
    rewards: torch.Tensor,
    returns: torch.Tensor,
    weights: torch.Tensor,
    response_mask: torch.Tensor,
    beta: float,
    normalizer: float | None = None,
    loss_agg_mode: str = "token-mean",
    seq_normalizer: float | None = None,
) -> tuple[torch.Tensor, dict]:
    """L_pi = sum m * w_b * (Vbar_t + beta * log_ratio_t - r_t - G_{t+1})^2 / sum m  (eq. 4.5, 4.7).

    Q_theta(s_t, a_t) = beta * log_ratio_t + Vbar(s_t) is regressed on r_t + G_{t+1}; gradient only
    through `log_ratio` (Vbar, rewards, returns, weights detached); G_{T_b} = 0. Aggregation as in
    `dqo_value_loss`.
    """
    mask = response_mask.to(log_ratio.dtype)
    q = _masked(beta * log_ratio + values.detach(), mask)
    terms = policy_terms(log_ratio, values, rewards, returns, weights, mask, beta)
    loss = aggregate(terms, mask, loss_agg_mode, normalizer, seq_normalizer)
    n = mask.sum().clamp(min=1)
    metrics = {
        "policy_loss": loss.detach(),
        "log_ratio_mean": _masked(log_ratio.detach(), mask).sum() / n,
        "q_mean": q.detach().sum() / n,
    }
    return loss, metrics


@dataclass
class DQOTargets:
    """What the losses of one DQO update need, per action (action k in column k), all detached."""

    log_ratio: torch.Tensor  # log(pi/pi_ref) summed over each action
    rewards: torch.Tensor  # rewards summed over each action
    values: torch.Tensor  # V at each action's first state
    mask: torch.Tensor  # 1 on the first n_b columns of row b
    returns: torch.Tensor  # lambda-returns G
    weights: torch.Tensor  # importance weights [B]


def dqo_targets(
    log_ratio: torch.Tensor,
    values: torch.Tensor,
    rewards: torch.Tensor,
    action_ends: torch.Tensor,
    beta: float,
    lam: float,
    is_log_clip: float = 1.0,
    is_weight_form: str = "product",
) -> DQOTargets:
    """Targets of one update from per-token log-ratios, values and rewards ([B, T], zero outside the response).

    Collapses tokens into actions (`action_ends`, see `compute_action_ends`), then computes the
    lambda-returns (eq. 4.6, 4.7) and the importance weights of each trajectory.
    """
    a_log_ratio = collapse_to_actions(log_ratio.detach(), action_ends)
    a_rewards = collapse_to_actions(rewards.detach(), action_ends)
    a_values = values_at_action_starts(values.detach(), action_ends)
    mask = action_mask(action_ends)
    return DQOTargets(
        log_ratio=a_log_ratio,
        rewards=a_rewards,
        values=a_values,
        mask=mask,
        returns=compute_lambda_returns(a_rewards, a_log_ratio, a_values, mask, beta, lam),
        weights=compute_is_weights(a_log_ratio, mask, is_log_clip, is_weight_form),
    )


def class_diagnostics(
    classes: torch.Tensor,
    names: tuple[str, ...],
    t: DQOTargets,
    token_log_ratio: torch.Tensor,
    token_log_probs: torch.Tensor,
    token_mask: torch.Tensor,
    value_terms: torch.Tensor,
    policy_terms: torch.Tensor,
    log_clip: float,
) -> dict[str, float]:
    """What an update did to each class of response (`classes` [B]: index into `names`), as `diag/<class>/<key>`:
    share of the rows; mean sequence log-ratio log pi(y|x)/pi_ref(y|x); trajectory-weight mean and the share of
    weights at the clip; V and the return G at the first state and at the last action's state; the mean
    per-token NLL of the responses under the policy (-log pi(y_t|s_t), the entropy's sample estimate on
    on-policy data); and the share of each loss's summed terms."""
    out: dict[str, float] = {}
    tm = token_mask.bool()
    seq_lr = _masked(token_log_ratio, tm).sum(dim=1)
    nll = -_masked(token_log_probs, tm).sum(dim=1) / tm.sum(dim=1).clamp(min=1)
    last = (t.mask.sum(dim=1) - 1).clamp(min=0).long().unsqueeze(1)
    v_last, g_last = t.values.gather(1, last).squeeze(1), t.returns.gather(1, last).squeeze(1)
    v_sum, p_sum = value_terms.sum(dim=1), policy_terms.sum(dim=1)
    v_total, p_total = float(v_sum.sum()), float(p_sum.sum())
    clipped = t.weights >= math.exp(log_clip) * (1 - 1e-6)
    for c, name in enumerate(names):
        rows = classes == c
        if not rows.any():
            continue
        k = f"diag/{name}"
        out[f"{k}/share"] = rows.double().mean().item()
        out[f"{k}/seq_log_ratio"] = seq_lr[rows].mean().item()
        out[f"{k}/weight_mean"] = t.weights[rows].mean().item()
        out[f"{k}/weight_clipped"] = clipped[rows].double().mean().item()
        out[f"{k}/v_first"] = t.values[rows, 0].mean().item()
        out[f"{k}/return_first"] = t.returns[rows, 0].mean().item()
        out[f"{k}/v_last"] = v_last[rows].mean().item()
        out[f"{k}/return_last"] = g_last[rows].mean().item()
        out[f"{k}/nll"] = nll[rows].mean().item()
        out[f"{k}/value_loss_share"] = float(v_sum[rows].sum()) / v_total if v_total > 0 else 0.0
        out[f"{k}/policy_loss_share"] = float(p_sum[rows].sum()) / p_total if p_total > 0 else 0.0
    return out


def outcome_verifier_loss(
    values: torch.Tensor, rewards: torch.Tensor, response_mask: torch.Tensor, normalizer: float | None = None
) -> tuple[torch.Tensor, dict]:
    """A plain outcome verifier (ORM), the baseline for DQO's V: V at the state that emits each response's last
    token regressed on its outcome R_b = sum_t r_bt, L = sum_b (V(s_b,last) - R_b)^2 / B (B = `normalizer`,
    default the rows with a response token); gradient only through `values`."""
    last = last_token_mask(response_mask)
    has = last.any(dim=1)
    err = torch.where(has, _masked(values, last).sum(dim=1) - _masked(rewards.detach(), response_mask).sum(dim=1), 0.0)
    denom = has.sum().clamp(min=1) if normalizer is None else normalizer
    loss = err.square().sum() / denom
    n = has.sum().clamp(min=1)
    return loss, {"outcome_loss": loss.detach(), "final_value_mean": _masked(values.detach(), last).sum() / n}


def dpo_loss(
    chosen_log_ratio: torch.Tensor, rejected_log_ratio: torch.Tensor, beta: float
) -> tuple[torch.Tensor, dict]:
    """DPO (Rafailov et al., 2023), sigmoid form: mean over pairs [P] of -log sigmoid(beta * (r_w - r_l))."""
    margin = beta * (chosen_log_ratio - rejected_log_ratio)
    loss = -torch.nn.functional.logsigmoid(margin).mean()
    return loss, {"margin": margin.detach().mean().item(), "accuracy": (margin > 0).float().mean().item()}


def kto_reference_point(mismatched_log_ratio: torch.Tensor) -> torch.Tensor:
    """KTO's z0: the batch's estimate of KL(pi || pi_ref) from responses paired with other prompts; >= 0, detached."""
    return mismatched_log_ratio.detach().mean().clamp(min=0.0)


def kto_loss(
    log_ratio: torch.Tensor,
    desirable: torch.Tensor,
    z0: torch.Tensor,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[torch.Tensor, dict]:
    """KTO (Ethayarajh et al., 2024): mean over responses [N] of lambda_D (1 - sigmoid(beta (r - z0))) for
    desirable ones and lambda_U (1 - sigmoid(beta (z0 - r))) for undesirable ones."""
    good = desirable.bool()
    value = torch.where(good, torch.sigmoid(beta * (log_ratio - z0)), torch.sigmoid(beta * (z0 - log_ratio)))
    weight = torch.where(good, desirable_weight, undesirable_weight).to(log_ratio.dtype)
    loss = (weight * (1.0 - value)).mean()
    return loss, {"z0": float(z0), "log_ratio_desirable": log_ratio[good].detach().mean().item() if good.any() else 0.0}


def sequence_coefficients(loss: torch.Tensor, sequence_log_probs: torch.Tensor) -> torch.Tensor:
    """d loss / d log pi(y_i|x_i) for each response: a loss of whole-response log-probs has the gradient
    sum_i c_i * grad log pi(y_i|x_i), so a policy step on the surrogate sum_i c_i log pi(y_i|x_i) (c_i fixed)
    is a step on the loss itself (docs/design.md, "Preference baselines")."""
    (grad,) = torch.autograd.grad(loss, sequence_log_probs)
    return grad.detach()
