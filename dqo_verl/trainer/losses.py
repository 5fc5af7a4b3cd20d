"""verl loss functions (`TrainingWorker.set_loss_fn`) wrapping the DQO losses of `algo.py`.

They run inside the policy / value workers on each micro-batch. verl hands them the model output
(per-token log-probs or values, no-padding layout) and the micro-batch; the driver has put into the
batch, per response position, `ref_logprobs`, `rewards`, `action_ends`, and per action `returns`,
plus per response `is_weights` and the global number of actions `num_actions` of the update.
Each micro-batch contributes `sum(...) / num_actions * dp_size` (FSDP averages gradients over
data-parallel ranks), so the accumulated gradient is that of the loss over the whole batch.
"""

from __future__ import annotations

import torch
from tensordict import TensorDict
from verl.utils import tensordict_utils as tu
from verl.utils.metric import AggregationType, Metric
from verl.workers.utils.padding import no_padding_2_padding

from dqo_verl.trainer import algo


def _batch_fields(data: TensorDict, *names: str) -> list[torch.Tensor]:
    fields = data.select(*names).to_padded_tensor()
    return [fields[name] for name in names]


def _normalizer(data: TensorDict) -> float:
    return tu.get_non_tensor_data(data, "num_actions", None) / data["dp_size"]


def _seq_normalizer(data: TensorDict) -> float | None:
    """The update's responses with an action, over ranks (for the seq-mean aggregations)."""
    n = tu.get_non_tensor_data(data, "num_sequences", None)
    return None if n is None else n / data["dp_size"]


def _metrics(loss: torch.Tensor, metrics: dict, prefix: str) -> dict:
    out = {f"{prefix}/loss": Metric(AggregationType.SUM, loss.detach())}
    for key, value in metrics.items():
        if not key.endswith("_loss"):
            out[f"{prefix}/{key}"] = Metric(AggregationType.MEAN, value)
    return out


def dqo_policy_loss_fn(
    model_output: dict,
    data: TensorDict,
    dp_group=None,
    *,
    beta: float,
    loss_agg_mode: str = "token-mean",
    kl_coef: float = 0.0,
    kl_estimator: str = "low_var_kl",
) -> tuple:
    """DQO policy loss on one micro-batch: Q = beta * log(pi/pi_ref) + Vbar regressed on r + G[t+1]; with
    `kl_coef` > 0, plus kl_coef times a token-level KL(pi || pi_ref) estimate, aggregated the same way."""
    log_probs = no_padding_2_padding(model_output["log_probs"], data).float()
    mask, ref_logprobs, values, rewards, ends, returns, weights = _batch_fields(
        data, "response_mask", "ref_logprobs", "values", "rewards", "action_ends", "returns", "is_weights"
    )
    ends = ends.bool()
    log_ratio = torch.where(mask.bool(), log_probs - ref_logprobs, torch.zeros_like(log_probs))
    loss, metrics = algo.dqo_policy_loss(
        log_ratio=algo.collapse_to_actions(log_ratio, ends),
        values=algo.values_at_action_starts(values, ends),
        rewards=algo.collapse_to_actions(rewards, ends),
        returns=returns,
        weights=weights,
        response_mask=algo.action_mask(ends),
        beta=beta,
        normalizer=_normalizer(data),
        loss_agg_mode=loss_agg_mode,
        seq_normalizer=_seq_normalizer(data),
    )
    if kl_coef:
        kl = algo.aggregate(
            algo.token_kl(log_ratio, mask, kl_estimator),
            mask,
            loss_agg_mode,
            normalizer=tu.get_non_tensor_data(data, "num_tokens", None) / data["dp_size"],
            seq_normalizer=_seq_normalizer(data),
        )
        loss = loss + kl_coef * kl
        metrics["kl"] = kl.detach()
    return loss, _metrics(loss, metrics, "policy")


def dqo_value_loss_fn(
    model_output: dict, data: TensorDict, dp_group=None, *, loss_agg_mode: str = "token-mean"
) -> tuple:
    """DQO value loss on one micro-batch: V(s) at each action's first state regressed on G."""
    values = no_padding_2_padding(model_output["values"], data).float()
    ends, returns, weights = _batch_fields(data, "action_ends", "returns", "is_weights")
    ends = ends.bool()
    loss, metrics = algo.dqo_value_loss(
        values=algo.values_at_action_starts(values, ends),
        returns=returns,
        weights=weights,
        response_mask=algo.action_mask(ends),
        normalizer=_normalizer(data),
        loss_agg_mode=loss_agg_mode,
        seq_normalizer=_seq_normalizer(data),
    )
    return loss, _metrics(loss, metrics, "value")


def outcome_verifier_loss_fn(model_output: dict, data: TensorDict, dp_group=None) -> tuple:
    """The outcome verifier's loss on one micro-batch: V at each response's last state regressed on its outcome."""
    values = no_padding_2_padding(model_output["values"], data).float()
    mask, rewards = _batch_fields(data, "response_mask", "rewards")
    loss, metrics = algo.outcome_verifier_loss(values, rewards, mask, normalizer=_seq_normalizer(data))
    return loss, _metrics(loss, metrics, "value")


def sft_loss_fn(model_output: dict, data: TensorDict, dp_group=None) -> tuple:
    """Supervised fine-tuning: mean negative log-likelihood of the response tokens of the update."""
    log_probs = no_padding_2_padding(model_output["log_probs"], data).float()
    (mask,) = _batch_fields(data, "response_mask")
    loss = -torch.where(mask.bool(), log_probs, torch.zeros_like(log_probs)).sum()
    loss = loss / data["batch_num_tokens"] * data["dp_size"]
    return loss, {"sft/loss": Metric(AggregationType.SUM, loss.detach())}


def sequence_surrogate_loss_fn(model_output: dict, data: TensorDict, dp_group=None) -> tuple:
    """sum_i c_i log pi(y_i|x_i) over the micro-batch, c_i = `seq_coef` from the driver (d loss / d log pi(y_i|x_i)
    of a loss of whole-response log-probs: DPO, KTO): its gradient is the loss's gradient."""
    log_probs = no_padding_2_padding(model_output["log_probs"], data).float()
    mask, coef = _batch_fields(data, "response_mask", "seq_coef")
    sequence = torch.where(mask.bool(), log_probs, torch.zeros_like(log_probs)).sum(dim=1)
    loss = (coef * sequence).sum() * data["dp_size"]
    return loss, {"policy/surrogate": Metric(AggregationType.SUM, loss.detach())}
