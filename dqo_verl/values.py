"""The value model served on Ray workers (a verl single-controller group): V at every state of responses.

`ValueGroup(model, ...).state_values(prompt_ids, response_ids)` gives, for each response of T tokens, the T + 1
values V(s_0) .. V(s_T), s_t being the state before response token t (s_T: after the whole response), read
as in training: the value model's output at the last token before response token t. `final_value` is the
value the evaluation uses for a whole response (docs/design.md, "Using V").
"""

from __future__ import annotations

import numpy as np
import ray
import torch
from transformers import AutoModelForTokenClassification
from verl import DataProto
from verl.single_controller.base import Worker
from verl.single_controller.base.decorator import Dispatch, register
from verl.single_controller.ray import RayClassWithInitArgs, RayResourcePool, RayWorkerGroup
from verl.utils.device import get_device_name

from dqo_verl.rollout import objects
from dqo_verl.workers import Call, release, release_pool


def final_value(values: np.ndarray, response_ids: list[int], eos_token_id: int) -> float:
    """V at the state that emitted the response's eos, or after its last token when it was cut (no eos)."""
    ends = len(response_ids) > 0 and response_ids[-1] == eos_token_id
    return float(values[len(response_ids) - 1] if ends else values[len(response_ids)])


def forward_values(model, prompts: list[list[int]], responses: list[list[int]], pad_token_id: int) -> list:
    """V(s_0..s_T) of each (prompt, response), from one right-padded forward of them all."""
    rows = [list(p) + list(r) for p, r in zip(prompts, responses)]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    with torch.no_grad():
        out = model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device)).logits[..., 0]
    out = out.float().cpu().numpy()
    return [out[i, len(p) - 1 : len(p) + len(r)].astype(np.float64) for i, (p, r) in enumerate(zip(prompts, responses))]


class ValueWorker(Worker):
    """One copy of the value model; `values` answers a shard of (prompt, response) rows."""

    def __init__(self, config: dict):
        super().__init__()
        self.config = config
        self.model = None

    @register(dispatch_mode=Dispatch.ONE_TO_ALL, blocking=False)
    def load(self, model: str) -> None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch.float32 if device == "cpu" else torch.bfloat16
        self.model = AutoModelForTokenClassification.from_pretrained(model, dtype=dtype).to(device).eval()
        pad = self.model.config.pad_token_id
        self.pad_token_id = 0 if pad is None else pad

    @register(dispatch_mode=Dispatch.DP_COMPUTE_PROTO, blocking=False)
    def values(self, data: DataProto) -> DataProto:
        prompts, responses = data.non_tensor_batch["prompt_ids"], data.non_tensor_batch["response_ids"]
        size = self.config["batch_size"]
        out = []
        for i in range(0, len(prompts), size):
            out += forward_values(self.model, prompts[i : i + size], responses[i : i + size], self.pad_token_id)
        return DataProto.from_single_dict({"values": objects(out)})


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

    def state_values(self, prompt_ids: list[list[int]], response_ids: list[list[int]]) -> list[np.ndarray]:
        """V(s_0..s_T) of each response, in request order."""
        data = DataProto.from_single_dict(
            {
                "prompt_ids": objects([list(p) for p in prompt_ids]),
                "response_ids": objects([list(r) for r in response_ids]),
            },
            auto_padding=True,
        )
        out = Call("value", self.group.values(data)).result(f"computing values of {len(prompt_ids)} responses")
        return list(out.non_tensor_batch["values"][: len(prompt_ids)])

    def shutdown(self) -> None:
        release([self.group])
        release_pool(self.pool)
