"""The offline methods, one `Trainer` subclass each, chosen by `algorithm.name`.

A method declares its models (`roles`), the corpus columns it needs, whether it reads reference
log-probs, and supplies its batch builder, its targets (computed on the driver between forward passes)
and its losses (`losses.py`, pure maths in `algo.py`); the driver base class does the rest.

- `dqo`: Direct Q-function Optimization (token actions by default; `algorithm.granularity=step` for
  blank-line segments).
- `dro`: DQO with the whole response as one action (Remark 4.2 of the DQO paper).
- `sft`: supervised fine-tuning on the responses (the embedded default's warm-up).
- `rs`: rejection sampling: supervised fine-tuning on the correct responses.
- `dpo`: DPO (sigmoid) on (correct, incorrect) pairs of one prompt.
- `kto`: KTO on every labelled response, its reference point from responses paired with other prompts.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import ClassVar

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig
from tensordict import TensorDict

from dqo_verl.config.errors import InputError, check_choice
from dqo_verl.data.pairs import preference_pairs
from dqo_verl.trainer import algo
from dqo_verl.trainer.base import Trainer
from dqo_verl.trainer.batches import RESPONSE_CLASSES, BatchSpec, build_batch
from dqo_verl.trainer.losses import (
    dqo_policy_loss_fn,
    dqo_value_loss_fn,
    outcome_verifier_loss_fn,
    sequence_surrogate_loss_fn,
    sft_loss_fn,
)


class DQOTrainer(Trainer):
    """DQO: a policy whose Q = beta * log(pi/pi_ref) + V and a value model, from outcome (and process) rewards."""

    roles = {"policy": "language_model", "value": "value_model"}
    required_columns = ("prompt_ids", "response_ids", "score")
    uses_reference = True
    default_granularity: ClassVar[str] = "token"
    granularities: ClassVar[tuple[str, ...]] = algo.GRANULARITIES
    default_is_weights: ClassVar[bool] = True  # on both losses unless algorithm.is_policy / is_value say otherwise

    def __init__(self, config: DictConfig):
        granularity = config.algorithm.granularity or self.default_granularity
        if granularity not in self.granularities:
            raise InputError(
                f"algorithm.granularity={granularity} is not one of {self.granularities} for algorithm.name="
                f"{config.algorithm.name}"
            )
        self.spec_granularity = granularity
        a = config.algorithm
        self.is_policy = self.default_is_weights if a.is_policy is None else bool(a.is_policy)
        self.is_value = self.default_is_weights if a.is_value is None else bool(a.is_value)
        super().__init__(config)
        if config.trainer.critic_warmup >= self.total_steps:
            raise InputError(
                f"trainer.critic_warmup={config.trainer.critic_warmup} leaves none of the run's {self.total_steps} "
                "updates to the policy"
            )

    def steps_per_update(self, role: str) -> int:
        return int(self.config.value.get("updates_per_batch") or 1) if role == "value" else 1

    def diagnostics(
        self,
        t: algo.DQOTargets,
        classes: torch.Tensor,
        log_ratio: torch.Tensor,
        log_probs: torch.Tensor,
        mask: torch.Tensor,
        w_value: torch.Tensor,
        w_policy: torch.Tensor,
    ) -> dict[str, float]:
        """`algo.class_diagnostics` of this update, before its step: by response class (right, wrong, cut)."""
        a = self.config.algorithm
        return algo.class_diagnostics(
            classes,
            RESPONSE_CLASSES,
            t,
            log_ratio,
            log_probs,
            mask,
            algo.value_terms(t.values, t.returns, w_value, t.mask),
            algo.policy_terms(t.log_ratio, t.values, t.rewards, t.returns, w_policy, t.mask, a.beta),
            a.is_log_clip,
        )

    def loss_fn(self, role: str) -> Callable:
        a = self.config.algorithm
        if role == "policy":
            return partial(
                dqo_policy_loss_fn,
                beta=a.beta,
                loss_agg_mode=a.policy_loss_agg,
                kl_coef=a.kl_coef,
                kl_estimator=a.kl_estimator,
            )
        return partial(dqo_value_loss_fn, loss_agg_mode=a.value_loss_agg)

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
        t = algo.dqo_targets(
            log_ratio, out["value"], td["rewards"], td["action_ends"], a.beta, a.lam, a.is_log_clip, a.is_weight_form
        )
        classes = td["response_class"]
        # data.cut_responses=mask: responses cut at a length limit stay in the batch, out of both losses and counts
        keep = (classes != RESPONSE_CLASSES.index("cut")).to(t.weights.dtype)
        if self.config.data.get("cut_responses") != "mask":
            keep = torch.ones_like(keep)
        ones = torch.ones_like(t.weights)
        w_value, w_policy = (
            (t.weights if self.is_value else ones) * keep,
            (t.weights if self.is_policy else ones) * keep,
        )
        fields = {"value": {"returns": t.returns, "is_weights": w_value}}
        warmup = step < self.config.trainer.critic_warmup  # verl's critic warm-up: V alone for the first updates
        if not warmup:
            fields["policy"] = {"values": out["value"], "returns": t.returns, "is_weights": w_policy}
        counts = {
            "num_actions": max(1, int((t.mask * keep[:, None]).sum())),
            "num_sequences": max(1, int(((t.mask.sum(dim=1) > 0) & keep.bool()).sum())),
            "num_tokens": max(1, int((mask & keep.bool()[:, None]).sum())),
        }
        metrics = self.train(fields, td, step, **counts)
        for _ in range(self.steps_per_update("value") - 1):  # more value steps on the same targets
            metrics.update(self.train({"value": fields["value"]}, td, step, **counts))
        metrics.update(self.diagnostics(t, classes, log_ratio, out["policy"], mask, w_value, w_policy))
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
                "dqo/critic_warmup": float(warmup),
            }
        )
        return metrics


class DROTrainer(DQOTrainer):
    """DRO (Richemond et al., 2024): DQO with the whole response as one action (H = 1) and, unless asked,
    no importance weights."""

    default_granularity = "sequence"
    granularities = ("sequence",)
    default_is_weights = False


class SFTTrainer(Trainer):
    """Supervised fine-tuning: the mean negative log-likelihood of the response tokens."""

    def loss_fn(self, role: str) -> Callable:
        return sft_loss_fn


class VerifierTrainer(Trainer):
    """A plain outcome verifier (the baseline for DQO's V): the value model alone, V at each response's last state
    regressed on its outcome, same backbone and corpus as DQO; exported as `export/value` for evaluation's
    value-guided decodings (`evaluate.value.model`)."""

    roles = {"value": "value_model"}
    required_columns = ("prompt_ids", "response_ids", "score")

    def loss_fn(self, role: str) -> Callable:
        return outcome_verifier_loss_fn

    def update(self, td: TensorDict, step: int) -> dict:
        return self.train({"value": {}}, td, step, num_sequences=len(td))


class RSTrainer(SFTTrainer):
    """Rejection sampling: supervised fine-tuning on the correct responses of the corpus."""

    required_columns = ("prompt_ids", "response_ids", "score")

    def prepare_corpus(self, corpus: pd.DataFrame) -> pd.DataFrame:
        kept = corpus[corpus["score"] == 1]
        if kept.empty:
            raise InputError(f"{self.config.data.train_files}: no correct response to train rejection sampling on")
        return kept


class PreferenceTrainer(Trainer):
    """A loss of whole-response log-ratios r_i = log pi(y_i|x_i) / pi_ref(y_i|x_i) (DPO, KTO).

    Each update: the policy's log-probs (a forward pass), the loss and its coefficients c_i = d loss / d log
    pi(y_i|x_i) on the driver (`algo.sequence_coefficients`), then one policy step on sum_i c_i log pi(y_i|x_i),
    whose gradient is the loss's (docs/design.md, "Preference baselines"). Rows come in units of two.
    """

    required_columns = ("prompt_ids", "response_ids", "score")
    uses_reference = True
    unit_rows = 2

    def loss_fn(self, role: str) -> Callable:
        return sequence_surrogate_loss_fn

    def preference_loss(self, log_ratio: torch.Tensor, td: TensorDict) -> tuple[torch.Tensor, dict]:
        """The method's loss of the batch's sequence log-ratios [B] (rows in units of two)."""
        raise NotImplementedError

    def update(self, td: TensorDict, step: int) -> dict:
        log_probs = self.forward(td, ("policy",), step)["policy"]
        mask = td["response_mask"].bool()
        sequence = torch.where(mask, log_probs, torch.zeros_like(log_probs)).sum(dim=1).requires_grad_(True)
        reference = torch.where(mask, td["ref_logprobs"], torch.zeros_like(log_probs)).sum(dim=1)
        loss, extra = self.preference_loss(sequence - reference, td)
        coef = algo.sequence_coefficients(loss, sequence)
        metrics = self.train({"policy": {"seq_coef": coef}}, td, step)
        name = self.config.algorithm.name
        metrics.update({f"{name}/loss": loss.item(), **{f"{name}/{k}": v for k, v in extra.items()}})
        metrics["policy/loss"] = loss.item()  # the method's loss, not the surrogate's value
        return metrics


class DPOTrainer(PreferenceTrainer):
    """DPO: (correct, incorrect) pairs of one prompt (`data.preference_pairs`, the baselines stage's DPO set)."""

    corpus_tag = "dpo"

    def prepare_corpus(self, corpus: pd.DataFrame) -> pd.DataFrame:
        pairs = preference_pairs(corpus, self.config.trainer.seed)
        if not pairs:
            raise InputError(f"{self.config.data.train_files}: no prompt has both a correct and an incorrect response")
        return corpus.loc[[row for pair in pairs for row in pair]]  # chosen, rejected, ...

    def preference_loss(self, log_ratio: torch.Tensor, td: TensorDict) -> tuple[torch.Tensor, dict]:
        return algo.dpo_loss(log_ratio[0::2], log_ratio[1::2], self.config.algorithm.beta)


class KTOTrainer(PreferenceTrainer):
    """KTO: every response with its label; each is followed by itself under another prompt (a fixed, seeded
    pairing: its reference log-probs are cached), whose log-ratios give the batch's reference point z0."""

    corpus_tag = "kto"

    def prepare_corpus(self, corpus: pd.DataFrame) -> pd.DataFrame:
        if corpus["uid"].nunique() < 2:
            raise InputError(f"{self.config.data.train_files}: KTO's reference point needs at least two prompts")
        rng = np.random.default_rng(self.config.trainer.seed)
        uids = corpus["uid"].to_numpy()
        partner = rng.permutation(len(corpus))
        for i in np.flatnonzero(uids[partner] == uids):  # another prompt's row for each response
            while uids[partner[i]] == uids[i]:
                partner[i] = rng.integers(len(corpus))
        own = corpus.assign(prompt_row=corpus.index)
        mismatched = corpus.assign(prompt_row=corpus.index[partner])
        return pd.concat([own, mismatched]).sort_index(kind="stable")  # row i, then row i under another prompt

    def preference_loss(self, log_ratio: torch.Tensor, td: TensorDict) -> tuple[torch.Tensor, dict]:
        k = self.config.algorithm.kto
        desirable = td["rewards"][0::2].sum(dim=1) > 0.5
        z0 = algo.kto_reference_point(log_ratio[1::2])
        return algo.kto_loss(
            log_ratio[0::2], desirable, z0, self.config.algorithm.beta, k.desirable_weight, k.undesirable_weight
        )


TRAINERS: dict[str, type[Trainer]] = {
    "dqo": DQOTrainer,
    "dro": DROTrainer,
    "sft": SFTTrainer,
    "rs": RSTrainer,
    "dpo": DPOTrainer,
    "kto": KTOTrainer,
    "verifier": VerifierTrainer,
}


def method(name: str) -> type[Trainer]:
    """The Trainer class of `algorithm.name`; an InputError naming the key and the choices for any other name."""
    check_choice("algorithm.name", name, TRAINERS)
    return TRAINERS[name]


def check_method(cfg: DictConfig) -> None:
    """`algorithm.name` names a method (checked before anything runs)."""
    method(cfg.algorithm.name)


def make_trainer(config: DictConfig) -> Trainer:
    """The trainer of `algorithm.name`."""
    return method(config.algorithm.name)(config)
