"""Training batches: corpus rows into verl's left/right-padded TensorDict, with the per-token fields the DQO
losses read (actions, rewards, reference log-probs), and the seeded order of an epoch's batches.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from tensordict import TensorDict
from verl.utils import tensordict_utils as tu

from dqo_verl.trainer import algo

# the classes a response falls in, for the diagnostics and the cut-response control: right, wrong (stopped, graded
# 0), cut at a length limit (the sampler's or the training budget's)
RESPONSE_CLASSES = ("right", "wrong", "cut")


def response_classes(rows: pd.DataFrame) -> torch.Tensor:
    """Long [B]: the index in RESPONSE_CLASSES of each row (`cut` column when present, else none is cut)."""
    cut = rows["cut"].to_numpy(dtype=bool) if "cut" in rows.columns else np.zeros(len(rows), dtype=bool)
    right = rows["score"].to_numpy(dtype=np.float64) == 1.0 if "score" in rows.columns else np.zeros(len(rows), bool)
    return torch.as_tensor(np.where(cut, 2, np.where(right, 0, 1)), dtype=torch.long)


@dataclass
class BatchSpec:
    """How corpus rows become training tensors."""

    pad_token_id: int
    granularity: str = "token"
    use_process_rewards: bool = False


def _pad(seqs: list, width: int, value, left: bool, dtype) -> torch.Tensor:
    out = torch.full((len(seqs), width), value, dtype=dtype)
    for i, s in enumerate(seqs):
        s = torch.tensor(np.asarray(s), dtype=dtype)
        if left:
            out[i, width - len(s) :] = s
        else:
            out[i, : len(s)] = s
    return out


def build_batch(rows: pd.DataFrame, spec: BatchSpec) -> TensorDict:
    """verl left/right-padded batch (prompts left-, responses right-padded) plus DQO fields.

    Tensor fields: prompts, responses, input_ids, attention_mask, position_ids, response_mask,
    ref_logprobs (0 where absent), rewards (outcome on the last token, process rewards at segment
    ends when enabled), action_ends (bool, per `spec.granularity`), response_class (per row, RESPONSE_CLASSES).
    Non-tensor: temperature = 1.
    """
    prompts = list(rows["prompt_ids"])
    responses = list(rows["response_ids"])
    plen, rlen = max(map(len, prompts)), max(map(len, responses))
    prompt_ids = _pad(prompts, plen, spec.pad_token_id, True, torch.long)
    response_ids = _pad(responses, rlen, spec.pad_token_id, False, torch.long)
    prompt_mask = _pad([[1] * len(p) for p in prompts], plen, 0, True, torch.long)
    response_mask = _pad([[1] * len(r) for r in responses], rlen, 0, False, torch.long)
    attention_mask = torch.cat([prompt_mask, response_mask], dim=1)
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)

    b = len(rows)
    lengths = response_mask.sum(dim=1)
    rewards = torch.zeros(b, rlen, dtype=torch.float32)
    if "score" in rows.columns:
        rewards[torch.arange(b), lengths - 1] = torch.as_tensor(rows["score"].to_numpy(dtype=np.float32))
    seg_mask = torch.zeros(b, rlen, dtype=torch.bool)
    if "segment_ends" in rows.columns:
        for i, ends in enumerate(rows["segment_ends"]):
            if ends is not None and len(ends):
                seg_mask[i, torch.tensor(np.asarray(ends), dtype=torch.long)] = True
    if spec.use_process_rewards:
        if "process_rewards" not in rows.columns:
            raise ValueError("algorithm.use_process_rewards=true but the corpus has no process_rewards column")
        for i, (ends, prs) in enumerate(zip(rows["segment_ends"], rows["process_rewards"])):
            if prs is not None and len(prs):
                idx = torch.tensor(np.asarray(ends), dtype=torch.long)
                rewards[i].index_add_(0, idx, torch.tensor(np.asarray(prs), dtype=torch.float32))
    if "ref_logprobs" in rows.columns:
        ref_logprobs = _pad(
            [np.asarray(x, dtype=np.float32) for x in rows["ref_logprobs"]], rlen, 0.0, False, torch.float32
        )
    else:
        ref_logprobs = torch.zeros(b, rlen, dtype=torch.float32)
    action_ends = algo.compute_action_ends(
        response_mask, spec.granularity, seg_mask if spec.granularity == "step" else None
    )
    return tu.get_tensordict(
        {
            "prompts": prompt_ids,
            "responses": response_ids,
            "input_ids": torch.cat([prompt_ids, response_ids], dim=1),
            "attention_mask": attention_mask,
            "position_ids": position_ids,
            "response_mask": response_mask,
            "ref_logprobs": ref_logprobs,
            "rewards": rewards,
            "action_ends": action_ends,
            "response_class": response_classes(rows),
        },
        non_tensor_dict={"temperature": 1.0},
    )


def epoch_batches(
    num_rows: int, batch_size: int, seed: int, epoch: int, shuffle: bool = True, unit_rows: int = 1
) -> list[np.ndarray]:
    """Row indices of each update in `epoch`: `batch_size` units of `unit_rows` consecutive rows (a DPO pair, ...)
    in an order fixed by (seed, epoch); a last partial batch is dropped."""
    units = num_rows // unit_rows
    order = np.random.default_rng([seed, epoch]).permutation(units) if shuffle else np.arange(units)
    rows = (order[:, None] * unit_rows + np.arange(unit_rows)).reshape(-1)
    size = batch_size * unit_rows
    return [rows[i * size : (i + 1) * size] for i in range(units // batch_size)]
