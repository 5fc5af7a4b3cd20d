"""The offline methods, one `Trainer` subclass each, chosen by `algorithm.name`.

A method declares its models (`roles`), the corpus columns it needs, whether it reads reference
log-probs, and supplies its batch builder, its targets (computed on the driver between forward passes)
and its losses (`losses.py`, pure maths in `algo.py`); the driver base class does the rest.

- `dqo`: Direct Q-function Optimization (token actions by default; `algorithm.granularity=step` for
  blank-line segments).
- `dro`: DQO with the whole response as one action (Remark 4.2 of the DQO paper).
- `sft`: supervised fine-tuning on the responses (the embedded default's warm-up).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import ClassVar

import pandas as pd
import torch
from omegaconf import DictConfig
from tensordict import TensorDict

from dqo_verl import algo
from dqo_verl.cli import InputError
from dqo_verl.data import BatchSpec, build_batch
from dqo_verl.driver import Trainer
from dqo_verl.losses import dqo_policy_loss_fn, dqo_value_loss_fn, sft_loss_fn


class DQOTrainer(Trainer):
    """DQO: a policy whose Q = beta * log(pi/pi_ref) + V and a value model, from outcome (and process) rewards."""

    roles = {"policy": "language_model", "value": "value_model"}
    required_columns = ("prompt_ids", "response_ids", "score")
    uses_reference = True
    default_granularity: ClassVar[str] = "token"
    granularities: ClassVar[tuple[str, ...]] = algo.GRANULARITIES

    def __init__(self, config: DictConfig, corpus: pd.DataFrame | None = None):
        granularity = config.algorithm.granularity or self.default_granularity
        if granularity not in self.granularities:
            raise InputError(
                f"algorithm.granularity={granularity} is not one of {self.granularities} for algorithm.name="
                f"{config.algorithm.name}"
            )
        self.spec_granularity = granularity
        super().__init__(config, corpus)

    def loss_fn(self, role: str) -> Callable:
        if role == "policy":
            return partial(dqo_policy_loss_fn, beta=self.config.algorithm.beta)
        return dqo_value_loss_fn

    def make_batch(self, rows: pd.DataFrame) -> TensorDict:
        spec = BatchSpec(
            pad_token_id=self.pad_token_id,
            granularity=self.spec_granularity,
            use_process_rewards=self.config.algorithm.use_process_rewards,
        )
        return build_batch(rows, spec)

    def update(self, td: TensorDict, step: int) -> dict:
        """Forward passes -> targets on the driver (`algo.dqo_targets`) -> one value and one policy step."""
        a = self.config.algorithm
        out = self.forward(td, ("policy", "value"), step)
        mask = td["response_mask"].bool()
        log_ratio = torch.where(mask, out["policy"] - td["ref_logprobs"], torch.zeros_like(out["policy"]))
        t = algo.dqo_targets(log_ratio, out["value"], td["rewards"], td["action_ends"], a.beta, a.lam, a.is_log_clip)
        ones = torch.ones_like(t.weights)
        fields = {
            "value": {"returns": t.returns, "is_weights": t.weights if a.is_value else ones},
            "policy": {"values": out["value"], "returns": t.returns, "is_weights": t.weights if a.is_policy else ones},
        }
        metrics = self.train(fields, td, step, num_actions=int(t.mask.sum()))
        seq_log_ratio = log_ratio.sum(dim=1)
        metrics.update(
            {
                "dqo/is_weight_mean": t.weights.mean().item(),
                "dqo/is_weight_min": t.weights.min().item(),
                "dqo/is_weight_max": t.weights.max().item(),
                "dqo/is_weight_below_0.05": (t.weights < 0.05).float().mean().item(),
                "dqo/is_weight_clipped": (seq_log_ratio >= a.is_log_clip).float().mean().item(),
                "dqo/kl_seq_mean": seq_log_ratio.mean().item(),
                "dqo/v_first_mean": out["value"][:, 0].mean().item(),
                "dqo/returns_first_mean": t.returns[:, 0].mean().item(),
                "dqo/reward_mean": t.rewards.sum(dim=1).mean().item(),
                "dqo/response_length_mean": mask.sum(dim=1).float().mean().item(),
                "dqo/num_actions": int(t.mask.sum()),
            }
        )
        return metrics


class DROTrainer(DQOTrainer):
    """DRO: DQO with the whole response as one action (H = 1)."""

    default_granularity = "sequence"
    granularities = ("sequence",)


class SFTTrainer(Trainer):
    """Supervised fine-tuning: the mean negative log-likelihood of the response tokens."""

    def loss_fn(self, role: str) -> Callable:
        return sft_loss_fn


TRAINERS: dict[str, type[Trainer]] = {"dqo": DQOTrainer, "dro": DROTrainer, "sft": SFTTrainer}


def make_trainer(config: DictConfig, corpus: pd.DataFrame | None = None) -> Trainer:
    """The trainer of `algorithm.name`."""
    name = config.algorithm.name
    if name not in TRAINERS:
        raise InputError(f"algorithm.name={name} is not one of {sorted(TRAINERS)}")
    return TRAINERS[name](config, corpus)
