"""LoRA for the policy and the value model, as verl configures it (`<role>.model.lora_rank`, `lora_alpha`,
`target_modules`, `exclude_modules`), so that a 7B run fits fewer or smaller GPUs (docs/design.md, "LoRA").

- The policy: verl's FSDP engine wraps the causal LM with peft itself.
- The value model: verl wraps every model as a causal LM, which a token-classification model is not;
  `value_lora_module` (installed on value models by the worker) uses peft's token-classification task
  instead, with the `score` head trained in full (`modules_to_save`).
- Checkpoints: verl writes the peft-wrapped weights under `<role>/huggingface`; `merge_lora_folder`
  rewrites them as the plain model with each adapter merged in (W + alpha / r * B A), which evaluation,
  vLLM and the export load. Resuming reads the sharded checkpoint, which keeps the adapters apart.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from safetensors import safe_open
from safetensors.torch import save_file

PEFT_PREFIX = "base_model.model."

HEAD = "score"


def _plain(value):
    """A config value (an OmegaConf list, a tuple) as a plain str / list, as peft wants it."""
    return value if value is None or isinstance(value, str) else list(value)


def value_lora_module(engine, module: torch.nn.Module) -> torch.nn.Module:
    """A value model with LoRA adapters on `target_modules` and its `score` head trained in full.

    Stands in for verl's `FSDPEngine._build_lora_module` on value models (same settings, the token-classification
    task instead of the causal-LM one)."""
    module.enable_input_require_grads()
    c = engine.model_config
    if c.lora_adapter_path:
        return PeftModel.from_pretrained(module, c.lora_adapter_path, is_trainable=True)
    exclude = _plain(c.exclude_modules)
    head = rf"(.*\.)?{HEAD}"  # "all-linear" would put an adapter on the head, which is trained in full instead
    config = LoraConfig(
        task_type=TaskType.TOKEN_CLS,
        r=c.lora_rank,
        lora_alpha=c.lora_alpha,
        target_modules=_plain(c.target_modules),
        exclude_modules=f"({exclude})|{head}" if isinstance(exclude, str) else [*(exclude or []), HEAD],
        modules_to_save=[HEAD],
        bias="none",
    )
    return get_peft_model(module, config)


def merged_name(key: str) -> str | None:
    """The plain model's name of a peft state-dict key; None for keys the merge folds in or drops."""
    name = key.removeprefix(PEFT_PREFIX)
    if ".lora_A." in name or ".lora_B." in name or ".original_module." in name:
        return None
    return name.replace(".base_layer.", ".").replace(".modules_to_save.default.", ".")


def merge_lora_folder(folder: Path, scaling: float) -> bool:
    """Rewrite an HF folder saved from a peft-wrapped model (keys `base_model.model.*`) as the plain model,
    each LoRA adapter merged in: W + scaling * B @ A (scaling = lora_alpha / r). One shard in memory at a
    time; each file replaced atomically. False when the folder holds no peft weights (nothing to do)."""
    files = sorted(Path(folder).glob("*.safetensors"))
    where = {}
    for f in files:
        with safe_open(f, "pt") as h:
            where.update(dict.fromkeys(h.keys(), f))
    if not any(k.startswith(PEFT_PREFIX) for k in where):
        return False

    def tensor(key: str) -> torch.Tensor:
        with safe_open(where[key], "pt") as h:
            return h.get_tensor(key)

    for f in files:
        merged = {}
        for key in [k for k, file in where.items() if file == f]:
            name = merged_name(key)
            if name is None:
                continue
            value = tensor(key)
            stem = key[: -len(".base_layer.weight")] if key.endswith(".base_layer.weight") else None
            if stem and f"{stem}.lora_A.default.weight" in where:
                a, b = tensor(f"{stem}.lora_A.default.weight"), tensor(f"{stem}.lora_B.default.weight")
                value = (value.double() + scaling * (b.double() @ a.double())).to(value.dtype)
            merged[name] = value.contiguous()
        tmp = f.with_name(f".{f.name}.tmp")
        save_file(merged, tmp, metadata={"format": "pt"})
        os.replace(tmp, f)
    index = Path(folder) / "model.safetensors.index.json"
    if index.exists():
        meta = json.loads(index.read_text())
        meta["weight_map"] = {merged_name(k): v for k, v in meta["weight_map"].items() if merged_name(k)}
        tmp = index.with_name(f".{index.name}.tmp")
        tmp.write_text(json.dumps(meta, indent=2))
        os.replace(tmp, index)
    return True
