"""The CPU platform plugin: registered through verl's registries, chosen only without an accelerator."""

import os
import subprocess
import sys
from importlib.metadata import entry_points

import pytest
import torch
from verl.plugin.platform import PlatformRegistry
from verl.utils.device import get_device_id, get_device_name, get_nccl_backend, get_torch_device
from verl.workers.engine import EngineRegistry
from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead, FSDPEngineWithValueHead

import dqo_verl.workers.cpu_platform as cpu_platform

# every get_torch_device().<name> that verl 0.9.1 calls
VERL_DEVICE_CALLS = [
    "empty_cache",
    "synchronize",
    "is_available",
    "current_stream",
    "set_device",
    "mem_get_info",
    "stream",
    "Stream",
    "set_rng_state",
    "set_per_process_memory_fraction",
    "ipc_collect",
    "get_rng_state",
    "device_count",
    "memory_reserved",
    "memory_allocated",
    "max_memory_reserved",
    "max_memory_allocated",
    "get_device_name",
    "Event",
]


def test_cpu_platform_selected_here():
    assert not torch.cuda.is_available()
    assert get_device_name() == "cpu"
    assert get_nccl_backend() == "gloo"
    assert get_device_id() == "cpu"
    assert torch.zeros(1).to(get_device_id()).device.type == "cpu"
    assert cpu_platform.cpu_platform_active()


def test_cpu_platform_is_probed_after_verls_own():
    names = PlatformRegistry.registered_names()
    assert names[-1] == "cpu" and {"nvidia", "huawei", "amd"} <= set(names)
    assert PlatformRegistry.get("nvidia").__module__.startswith("verl.")


def test_device_module_supplies_what_verl_calls():
    dev = get_torch_device()
    for name in VERL_DEVICE_CALLS:
        assert hasattr(dev, name), name
    free, total = dev.mem_get_info()
    assert 0 < free <= total
    state = dev.get_rng_state()
    a = torch.rand(3)
    dev.set_rng_state(state)
    assert torch.equal(torch.rand(3), a)
    assert dev.max_memory_allocated() == 0


def test_cpu_engines_registered_and_cuda_engines_untouched():
    for backend in ("fsdp", "fsdp2"):
        lm = EngineRegistry.get_engine_cls("language_model", backend)
        vm = EngineRegistry.get_engine_cls("value_model", backend)
        assert issubclass(lm, FSDPEngineWithLMHead) and lm.__module__ == "dqo_verl.workers.cpu_platform"
        assert issubclass(vm, FSDPEngineWithValueHead) and vm.__module__ == "dqo_verl.workers.cpu_platform"
        assert EngineRegistry._engines["language_model"][backend]["cuda"] is FSDPEngineWithLMHead
        assert EngineRegistry._engines["value_model"][backend]["cuda"] is FSDPEngineWithValueHead


def test_plugin_is_a_verl_entry_point():
    eps = {ep.name: ep.value for ep in entry_points(group="verl.plugins")}
    assert eps.get("dqo_verl_cpu") == "dqo_verl.workers.cpu_platform"


def _device_in_subprocess(**env) -> str:
    code = "from verl.utils.device import get_device_name; print(get_device_name())"
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("VERL_")} | env
    out = subprocess.run([sys.executable, "-c", code], env=full_env, capture_output=True, text=True, check=True)
    return out.stdout.strip().splitlines()[-1]


@pytest.mark.slow
def test_verl_alone_has_no_cpu_platform_and_the_plugin_loads_both_ways():
    assert _device_in_subprocess(VERL_USE_EXTERNAL_PLUGINS="none") == "cuda"  # verl's fallback without us
    # (the entry point is how this test process itself got the platform: test_plugin_is_a_verl_entry_point)
    assert (
        _device_in_subprocess(
            VERL_USE_EXTERNAL_PLUGINS="none", VERL_USE_EXTERNAL_MODULES="dqo_verl.workers.cpu_platform"
        )
        == "cpu"
    )


@pytest.mark.gpu
def test_gpu_machine_keeps_verls_cuda_path():
    assert get_device_name() == "cuda"
    assert EngineRegistry.get_engine_cls("language_model", "fsdp2") is FSDPEngineWithLMHead
    assert not cpu_platform.cpu_platform_active()
