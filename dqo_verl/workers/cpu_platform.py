"""verl on CPU, as a plugin: a `cpu` platform and the FSDP engines for device `cpu`.

verl 0.9.1 has no CPU platform. This module registers one through verl's own plugin points
(`PlatformRegistry`, `EngineRegistry`); it is loaded in every process that imports verl, through
the `verl.plugins` entry point of this package, and by `VERL_USE_EXTERNAL_MODULES` in the Ray
runtime env (see `dqo_verl.workers.groups`). verl probes its built-in CUDA/NPU/ROCm platforms first
(nvidia-smi included), so a machine with an accelerator never selects this one and keeps verl's
own CUDA path untouched.
"""

from __future__ import annotations

import re
import types
import warnings
from contextlib import contextmanager
from typing import Any

import psutil
import torch
from verl.plugin.platform import PlatformBase, PlatformRegistry, get_platform


def _make_cpu_device_module() -> types.ModuleType:
    """`torch.cpu` plus the `torch.cuda`-style calls verl makes on `get_torch_device()`."""
    mod = types.ModuleType("dqo_verl_cpu_device")
    for name in dir(torch.cpu):
        if not name.startswith("_"):
            setattr(mod, name, getattr(torch.cpu, name))

    def _zero(*args, **kwargs) -> int:
        return 0

    def _noop(*args, **kwargs) -> None:
        return None

    def mem_get_info(*args, **kwargs) -> tuple[int, int]:
        vm = psutil.virtual_memory()
        return vm.available, vm.total

    mod.current_device = lambda: "cpu"
    mod.device_count = lambda: 1
    mod.set_device = _noop
    mod.synchronize = _noop
    mod.empty_cache = _noop
    mod.ipc_collect = _noop
    mod.reset_peak_memory_stats = _noop
    mod.set_per_process_memory_fraction = _noop
    for name in ("memory_allocated", "memory_reserved", "max_memory_allocated", "max_memory_reserved"):
        setattr(mod, name, _zero)
    mod.mem_get_info = mem_get_info
    mod.get_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    mod.set_rng_state = lambda state, *args, **kwargs: torch.set_rng_state(state)
    mod.manual_seed = torch.manual_seed
    mod.manual_seed_all = torch.manual_seed
    mod.get_device_name = lambda *args, **kwargs: "cpu"
    mod.is_available = lambda: True
    return mod


@PlatformRegistry.register(platform="cpu")
class PlatformCPU(PlatformBase):
    """CPU platform: gloo collectives, no device memory, Ray resource `CPU`."""

    _device_module = _make_cpu_device_module()

    @property
    def device_name(self) -> str:
        return "cpu"

    @property
    def vendor_name(self) -> str:
        return "cpu"

    @property
    def device_module(self) -> types.ModuleType:
        return self._device_module

    def is_available(self) -> bool:
        return True

    def is_platform_available(self, use_smi_check: bool = False) -> bool:
        # Probed after verl's built-in platforms (registered first), so this is the fallback.
        return True

    def current_device(self) -> Any:  # verl uses the result as a torch device
        return "cpu"

    def device_count(self) -> int:
        return 1

    def set_device(self, device_index: int) -> None:
        return None

    def synchronize(self, device_index: int | None = None) -> None:
        return None

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)

    def manual_seed_all(self, seed: int) -> None:
        torch.manual_seed(seed)

    def set_allocator_settings(self, settings: str) -> None:
        return None

    def empty_cache(self) -> None:
        return None

    def get_device_capability(self, device_index: int = 0) -> tuple[int | None, int | None]:
        return None, None

    def communication_backend_name(self) -> str:
        return "gloo"

    def visible_devices_envvar(self) -> str:
        return "CUDA_VISIBLE_DEVICES"

    @contextmanager
    def nvtx_range(self, msg: str):
        yield

    def profiler_start(self) -> None:
        return None

    def profiler_stop(self) -> None:
        return None

    def ray_resource_name(self) -> str:
        return "CPU"

    def ray_resource_options(self, num_gpus: float) -> dict[str, Any]:
        return {}

    def ray_noset_envvars(self) -> list[str]:
        return []

    def is_ipc_supported(self) -> bool:
        return False

    def cudart(self) -> Any:
        return None


# verl's engines read the device name when they are imported: only now, with the platform registered
with warnings.catch_warnings():  # verl warns about every optional engine (megatron, ...) it lacks
    warnings.simplefilter("ignore", UserWarning)
    from verl.workers.engine import EngineRegistry  # noqa: E402
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead, FSDPEngineWithValueHead  # noqa: E402


class HostMemoryMixin:
    """verl gives forward-only (reference) engines a pinned-memory CPU offload policy; a CPU-only
    torch cannot pin memory, and parameters already live in host memory: build them as usual."""

    def _build_fsdp_module(self, module):
        forward_only = self.engine_config.forward_only
        self.engine_config.forward_only = False
        try:
            return super()._build_fsdp_module(module)
        finally:
            self.engine_config.forward_only = forward_only


class CPUFSDPEngineWithLMHead(HostMemoryMixin, FSDPEngineWithLMHead):
    """verl's FSDP language-model engine on host memory."""


class CPUFSDPEngineWithValueHead(HostMemoryMixin, FSDPEngineWithValueHead):
    """verl's value loader hard-codes `flash_attention_2` (absent on CPU). Load the value model
    through the checkpoint's `...ForTokenClassification` auto class instead, with the
    configured attention (`override_config.attn_implementation`), same settings as verl's."""

    def _build_module(self):
        hf_config = self.model_config.hf_config
        hf_config.num_labels = 1
        hf_config.classifier_dropout = 0.0
        hf_config.architectures = [re.sub(r"For\w+$", "ForTokenClassification", hf_config.architectures[0])]
        self.model_config.model_type = "language_model"
        try:
            return super()._build_module()
        finally:
            self.model_config.model_type = "value_model"


def cpu_platform_active() -> bool:
    """True when this process runs verl on the CPU platform."""
    return get_platform().device_name == "cpu"


# the FSDP engines for device `cpu` (looked up only on the CPU platform; a GPU machine never sees them)
if "cpu" not in EngineRegistry._engines.get("language_model", {}).get("fsdp2", {}):
    EngineRegistry.register(model_type="language_model", backend=["fsdp", "fsdp2"], device="cpu")(
        CPUFSDPEngineWithLMHead
    )
    EngineRegistry.register(model_type="value_model", backend=["fsdp", "fsdp2"], device="cpu")(
        CPUFSDPEngineWithValueHead
    )
