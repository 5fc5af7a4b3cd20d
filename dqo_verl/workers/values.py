"""The value model served on Ray workers (a verl single-controller group): V at every state of responses.

`ValueGroup(model, ...).state_values(prompt_ids, response_ids)` gives, for each response of T tokens, the T + 1
values V(s_0) .. V(s_T), s_t being the state before response token t (s_T: after the whole response), read
as in training: the value model's output at the last token before response token t. `final_value` is the
value the evaluation uses for a whole response, `step_q` the Q of a step (docs/design.md, "Using V"); with
`load_policies`, the workers also give log(pi/pi_ref) of every response token.
"""

from __future__ import annotations

import numpy as np
import ray
import torch
from transformers import AutoModelForCausalLM, AutoModelForTokenClassification
from verl import DataProto
from verl.single_controller.base import Worker
from verl.single_controller.base.decorator import Dispatch, register
from verl.single_controller.ray import RayClassWithInitArgs, RayResourcePool, RayWorkerGroup
from verl.utils.device import get_device_name

from dqo_verl.workers.groups import Call, release, release_pool
from dqo_verl.workers.rollout import objects


def final_value(values: np.ndarray, response_ids: list[int], eos_token_id: int | None = None) -> float:
    """V at the state that emitted the response's last token (its eos, or the token where it was cut): the last
    state the value loss trains on. (`eos_token_id` is kept for callers; a cut response is scored at its last
    state too, not after it, where V was never trained.)"""
    return float(values[max(len(response_ids) - 1, 0)])


def step_q(values: np.ndarray, log_ratio: np.ndarray, start: int, beta: float) -> float:
    """Q of the step that takes state s_start to the end of the response: V(s_start) + beta * the sum of
    log(pi/pi_ref) over the step's tokens (Q = beta * log(pi/pi_ref) + V, summed over a multi-token action)."""
    return float(values[start] + beta * np.sum(log_ratio[start:]))


def _right_padded(prompts: list[list[int]], responses: list[list[int]], pad_token_id: int):
    rows = [list(p) + list(r) for p, r in zip(prompts, responses)]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return ids, mask


def forward_values(model, prompts: list[list[int]], responses: list[list[int]], pad_token_id: int) -> list:
    """V(s_0..s_T) of each (prompt, response), from one right-padded forward of them all."""
    ids, mask = _right_padded(prompts, responses, pad_token_id)
    with torch.no_grad():
        out = model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device)).logits[..., 0]
    out = out.float().cpu().numpy()
    return [out[i, len(p) - 1 : len(p) + len(r)].astype(np.float64) for i, (p, r) in enumerate(zip(prompts, responses))]


def forward_logprobs(model, prompts: list[list[int]], responses: list[list[int]], pad_token_id: int) -> list:
    """log p(response token t | prompt, response tokens < t) of each (prompt, response): one right-padded forward
    of the decoder, then the LM head (and the model's logit soft-cap, if any) on one response's states at a time,
    so the logits held are one response's, not the batch's."""
    ids, mask = _right_padded(prompts, responses, pad_token_id)
    head, cap = model.get_output_embeddings(), getattr(model.config, "final_logit_softcapping", None)
    with torch.no_grad():
        hidden = model.base_model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device))[0]
        out = []
        for i, (p, r) in enumerate(zip(prompts, responses)):
            logits = head(hidden[i, len(p) - 1 : len(p) + len(r) - 1]).float()
            if cap is not None:
                logits = torch.tanh(logits / cap) * cap
            logp = torch.log_softmax(logits, dim=-1)
            token = ids[i, len(p) : len(p) + len(r), None].to(logp.device)
            out.append(logp.gather(-1, token)[:, 0].cpu().numpy().astype(np.float64))
    return out


class ValueWorker(Worker):
    """One copy of the value model; `values` answers a shard of (prompt, response) rows."""

    def __init__(self, config: dict):
        super().__init__()
        self.config = config
        self.model = None
        self.policies = None  # (policy, reference) for log(pi/pi_ref)

    @staticmethod
    def _load(model_class, model: str):
        device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch.float32 if device == "cpu" else torch.bfloat16
        return model_class.from_pretrained(model, dtype=dtype).to(device).eval()

    @register(dispatch_mode=Dispatch.ONE_TO_ALL, blocking=False)
    def load(self, model: str) -> None:
        self.model = self._load(AutoModelForTokenClassification, model)
        pad = self.model.config.pad_token_id
        self.pad_token_id = 0 if pad is None else pad

    @register(dispatch_mode=Dispatch.ONE_TO_ALL, blocking=False)
    def load_policies(self, policy: str, reference: str) -> None:
        self.policies = (self._load(AutoModelForCausalLM, policy), self._load(AutoModelForCausalLM, reference))

    @register(dispatch_mode=Dispatch.DP_COMPUTE_PROTO, blocking=False)
    def values(self, data: DataProto) -> DataProto:
        prompts, responses = data.non_tensor_batch["prompt_ids"], data.non_tensor_batch["response_ids"]
        size = self.config["batch_size"]
        ratios = data.meta_info.get("log_ratios", False)
        if ratios and self.policies is None:
            raise RuntimeError("log-ratios asked before load_policies")
        values, log_ratios = [], []
        for i in range(0, len(prompts), size):
            batch = (prompts[i : i + size], responses[i : i + size], self.pad_token_id)
            values += forward_values(self.model, *batch)
            if ratios:
                policy, reference = (forward_logprobs(m, *batch) for m in self.policies)
                log_ratios += [a - b for a, b in zip(policy, reference)]
        out = {"values": objects(values)}
        if ratios:
            out["log_ratios"] = objects(log_ratios)
        return DataProto.from_single_dict(out)


class ValueGroup:
    """Driver-side handle: `state_values(prompt_ids, response_ids)` over all value workers."""

    def __init__(self, model: str, nnodes: int, workers_per_node: int, batch_size: int = 16):
        self.pool = RayResourcePool(
            [workers_per_node] * nnodes, use_gpu=get_device_name() != "cpu", max_colocate_count=1, name_prefix="value"
        )
        self.group = RayWorkerGroup(
            resource_pool=self.pool,
            ray_cls_with_init=RayClassWithInitArgs(ray.remote(ValueWorker), config={"batch_size": batch_size}),
            device_name=get_device_name(),
            name_prefix="value_",
        )
        Call("value", self.group.load(model)).result(f"loading {model}")

    def load_policies(self, policy: str, reference: str) -> None:
        """Serve log(pi/pi_ref) of `policy` against `reference` too (`values_and_log_ratios`)."""
        Call("value", self.group.load_policies(policy, reference)).result(f"loading {policy} and {reference}")

    def _values(self, prompt_ids: list[list[int]], response_ids: list[list[int]], log_ratios: bool = False) -> dict:
        data = DataProto.from_single_dict(
            {
                "prompt_ids": objects([list(p) for p in prompt_ids]),
                "response_ids": objects([list(r) for r in response_ids]),
            },
            meta_info={"log_ratios": log_ratios},
            auto_padding=True,
        )
        out = Call("value", self.group.values(data)).result(f"computing values of {len(prompt_ids)} responses")
        return {k: list(v[: len(prompt_ids)]) for k, v in out.non_tensor_batch.items()}

    def state_values(self, prompt_ids: list[list[int]], response_ids: list[list[int]]) -> list[np.ndarray]:
        """V(s_0..s_T) of each response, in request order."""
        return self._values(prompt_ids, response_ids)["values"]

    def values_and_log_ratios(
        self, prompt_ids: list[list[int]], response_ids: list[list[int]]
    ) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """V(s_0..s_T) and log(pi/pi_ref) of response tokens 0..T-1 of each response (after `load_policies`)."""
        out = self._values(prompt_ids, response_ids, log_ratios=True)
        return out["values"], out["log_ratios"]

    def shutdown(self) -> None:
        release([self.group])
        release_pool(self.pool)
