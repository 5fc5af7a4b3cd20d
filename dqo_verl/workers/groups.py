"""Ray plumbing of every job: the Ray connection, resource pools, training worker groups, fail-fast calls.

A job's models (policy, value; a reference when it is not the initial policy) are verl `TrainingWorker`s.
The roles a job trains share one process per rank (verl's colocated worker, as its PPO trainer does for
actor and critic), so a rank imports torch and verl once and every role's FSDP shards sit side by side.

Every call into a worker group fails fast: the driver waits on each rank separately and stops, naming
the group, as soon as one rank fails. Waiting on all ranks at once would hang: the surviving ranks of an
FSDP group block in a collective, waiting for the one that died.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import ray
import torch
from omegaconf import DictConfig
from ray.util import placement_group_table
from ray.util.placement_group import remove_placement_group
from tensordict import TensorDict
from verl.single_controller.base.decorator import Dispatch, register
from verl.single_controller.ray import RayClassWithInitArgs, RayResourcePool, RayWorkerGroup
from verl.single_controller.ray.base import create_colocated_worker_cls
from verl.utils import tensordict_utils as tu
from verl.utils.config import omega_conf_to_dataclass
from verl.utils.device import get_device_name
from verl.utils.distributed import initialize_global_process_group_ray
from verl.workers.config import TrainingWorkerConfig
from verl.workers.engine_workers import TrainingWorker

import dqo_verl.workers.cpu_platform  # noqa: F401  (registers the CPU platform in this process)
from dqo_verl.config.errors import RunError
from dqo_verl.workers.lora import merge_lora_folder, value_lora_module

# every process of a job loads the CPU platform plugin (a no-op on GPU machines)
PLUGIN_ENV = {"VERL_USE_EXTERNAL_MODULES": "dqo_verl.workers.cpu_platform", "TOKENIZERS_PARALLELISM": "false"}

# a rank's slot holds the job's colocated training process and, while it runs, a separate reference group
GROUPS_PER_RANK = 2
_SESSION_LOGS: Path | None = None  # this node's Ray log folder, when `init_ray` started or joined Ray quietly


def ranks(config: DictConfig) -> int:
    """Ranks of the job's resource pool: trainer.nnodes x trainer.n_gpus_per_node."""
    return config.trainer.nnodes * config.trainer.n_gpus_per_node


def engines_per_node(config: DictConfig) -> int:
    """Rollout engines per node: rollout.engines_per_node, or one per tensor-parallel group of the node's GPUs."""
    r = config.rollout
    return r.engines_per_node or max(1, config.trainer.n_gpus_per_node // r.tensor_parallel_size)


@contextmanager
def ray_scope() -> Iterator[None]:
    """Shut down, at the end of the block, the Ray that the block started; a Ray running before it (a notebook's,
    a test session's) is left running."""
    running_before = ray.is_initialized()
    try:
        yield
    finally:
        if not running_before and ray.is_initialized():
            ray.shutdown()


def init_ray(config: DictConfig) -> None:
    """Connect to the Ray cluster (ray_init.address, or RAY_ADDRESS as `ray job submit` sets) or start a local one.

    A local Ray gets enough CPU slots for a training pool and a rollout group side by side (the SFT
    warm-up checks its checkpoints by generating while its training processes live).
    """
    if ray.is_initialized():
        return
    # quiet: the workers' chatter (vLLM's INFO lines, FSDP's warnings) goes to Ray's log files, not the console
    verbose = bool(config.ray_init.get("log_to_driver"))
    kwargs: dict[str, Any] = {"runtime_env": {"env_vars": dict(PLUGIN_ENV)}, "log_to_driver": verbose}
    address = config.ray_init.address or os.environ.get("RAY_ADDRESS")
    if address:
        kwargs["address"] = address
    else:
        slots = GROUPS_PER_RANK * ranks(config) + engines_per_node(config) * config.trainer.nnodes + 1
        kwargs["num_cpus"] = config.ray_init.num_cpus or max(os.cpu_count() or 1, slots)
        kwargs["include_dashboard"] = False
    context = ray.init(**kwargs)
    global _SESSION_LOGS
    _SESSION_LOGS = None if verbose else Path(context.address_info["session_dir"]) / "logs"
    if not verbose:
        logs = _SESSION_LOGS
        print(f"[ray] workers' output: {logs} (each stage's copy in <paths.root>/logs/; ray_init.log_to_driver=true)")


def wait(refs: list, group: str, what: str) -> list:
    """The results of one call on every rank of `group`; the first rank that fails raises RunError."""
    pending = list(refs)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        try:
            ray.get(ready[0])
        except ray.exceptions.RayError as exc:  # a task's own error, a dead actor, a lost object
            raise RunError(f"worker group '{group}' failed {what}: {type(exc).__name__}: {exc}") from exc
    return ray.get(list(refs))


@dataclass
class Call:
    """A call in flight on every rank of one group."""

    group: str
    output: Any  # verl's future (`.futures`, `.get()`) or a list of Ray object refs

    def result(self, what: str):
        refs = self.output.futures if hasattr(self.output, "futures") else self.output
        values = wait(refs, self.group, what)
        return self.output.get() if hasattr(self.output, "get") else values


class DQOWorker(TrainingWorker):
    """verl's `TrainingWorker`, with two changes.

    - On the CPU platform its process group is plain gloo: verl's default backend string
      "cpu:gloo,<device>:<backend>" names the cpu device twice there, which torch rejects.
    - Its blocking methods return futures, so that the driver can wait on each rank and fail fast.
    - With LoRA (`model.lora_rank` > 0), a value model gets its adapters from `lora.value_lora_module`, and
      the HF copy in each checkpoint is rewritten with the adapters merged in (`lora.merge_lora_folder`).
    """

    def __init__(self, config):
        if get_device_name() == "cpu":
            initialize_global_process_group_ray(backend="gloo")
        super().__init__(config)
        self.lora_scaling = None
        if self.model_config.lora_rank > 0:
            self.lora_scaling = self.model_config.lora_alpha / self.model_config.lora_rank
            if self.config.model_type == "value_model":
                self.engine._build_lora_module = partial(value_lora_module, self.engine)

    @register(dispatch_mode=Dispatch.ONE_TO_ALL, blocking=False)
    def set_loss_fn(self, loss_fn):
        return super().set_loss_fn(loss_fn)

    @register(dispatch_mode=Dispatch.ONE_TO_ALL, blocking=False)
    def reset(self):
        return super().reset()

    @register(dispatch_mode=Dispatch.ONE_TO_ALL, blocking=False)
    def save_checkpoint(self, local_path, hdfs_path=None, global_step=0, max_ckpt_to_keep=None):
        out = super().save_checkpoint(local_path, hdfs_path, global_step, max_ckpt_to_keep)
        hf_folder = Path(local_path) / "huggingface"
        if self.lora_scaling is not None and self.rank == 0 and hf_folder.is_dir():
            merge_lora_folder(hf_folder, self.lora_scaling)
        return out

    @register(dispatch_mode=Dispatch.ONE_TO_ALL, blocking=False)
    def load_checkpoint(self, local_path, hdfs_path=None, del_local_after_load=False):
        return super().load_checkpoint(local_path, hdfs_path, del_local_after_load)

    @register(dispatch_mode=Dispatch.ONE_TO_ALL, blocking=False)
    def zero_value_head(self) -> None:
        """Zero a value model's output layer (`score`, or trl's `v_head.summary`): V = 0 on every state."""
        heads = [m for name, m in self.engine.module.named_modules() if name.split(".")[-1] in ("score", "summary")]
        heads = [
            m.modules_to_save["default"] if hasattr(m, "modules_to_save") else m for m in heads
        ]  # LoRA: the trained copy
        if len(heads) != 1 or not isinstance(heads[0], torch.nn.Linear) or heads[0].out_features != 1:
            raise ValueError(f"expected one 1-unit `score` head in a value model, found {len(heads)} candidate(s)")
        with torch.no_grad():
            for param in heads[0].parameters():
                param.zero_()


class Group:
    """Driver-side handle of one model (role) on every rank; each call fails fast naming the role."""

    def __init__(self, name: str, worker_group: RayWorkerGroup):
        self.name = name
        self.worker_group = worker_group

    def call(self, method: str, *args, **kwargs) -> Call:
        """Start `method` on every rank; `.result(what)` waits for it."""
        return Call(self.name, getattr(self.worker_group, method)(*args, **kwargs))

    def infer(self, td: TensorDict, what: str, **meta) -> TensorDict:
        """Forward pass only (verl `infer_batch`): per-token outputs, no-padding layout."""
        return self.call("infer_batch", with_meta(td, compute_loss=False, **meta)).result(what)

    def save(self, path: str, step: int) -> None:
        self.call("save_checkpoint", local_path=path, global_step=step).result(f"at step {step}, saving {path}")

    def load(self, path: str) -> None:
        self.call("load_checkpoint", local_path=path).result(f"loading {path}")


@dataclass
class Role:
    """One model a job runs: its verl model type, config section (model / engine / optim) and loss."""

    model_type: str  # language_model | value_model
    config: DictConfig
    loss_fn: Callable | None = None
    forward_only: bool = False
    steps_per_update: int = 1  # optimizer steps per update of the run (its LR schedule spans all of them)


def make_resource_pool(nnodes: int, n_gpus_per_node: int, name: str) -> RayResourcePool:
    """nnodes x n_gpus_per_node ranks (processes on CPU), each slot shared by up to GROUPS_PER_RANK groups."""
    return RayResourcePool(
        process_on_nodes=[n_gpus_per_node] * nnodes,
        use_gpu=get_device_name() != "cpu",
        max_colocate_count=GROUPS_PER_RANK,
        name_prefix=name,
    )


def _worker_class(role: Role, checkpoint: DictConfig, total_steps: int) -> RayClassWithInitArgs:
    engine = omega_conf_to_dataclass(role.config.engine)
    engine.forward_only = role.forward_only
    optimizer = omega_conf_to_dataclass(role.config.optim)
    optimizer.total_training_steps = total_steps * role.steps_per_update
    config = TrainingWorkerConfig(
        model_type=role.model_type,
        model_config=omega_conf_to_dataclass(role.config.model),
        engine_config=engine,
        optimizer_config=optimizer,
        checkpoint_config=omega_conf_to_dataclass(checkpoint),
    )
    return RayClassWithInitArgs(ray.remote(DQOWorker), config=config)


def start_groups(
    pool: RayResourcePool, roles: dict[str, Role], checkpoint: DictConfig, total_steps: int = 1
) -> dict[str, Group]:
    """Start the roles in one colocated process per rank of `pool`; returns a started handle per role."""
    classes = {name: _worker_class(role, checkpoint, total_steps) for name, role in roles.items()}
    colocated = RayWorkerGroup(
        resource_pool=pool,
        ray_cls_with_init=create_colocated_worker_cls(classes),
        device_name=get_device_name(),
        name_prefix=f"{pool.name_prefix}_{'_'.join(roles)}_",
    )
    groups = {name: Group(name, wg) for name, wg in colocated.spawn(prefix_set=list(roles)).items()}
    for name, role in roles.items():
        if role.loss_fn is not None:
            groups[name].call("set_loss_fn", loss_fn=role.loss_fn).result("setting its loss")
    starts = [groups[name].call("reset") for name in roles]  # FSDP wrap, weights, optimizer
    for start in starts:
        start.result("starting")
    for group in groups.values():
        # verl asks every rank for its data-parallel layout after the first call on the "train" mesh; a rank
        # stuck in a collective would never answer then, so ask now, while every rank is free
        wg = group.worker_group
        wg._dispatch_info["train"] = wg._query_dispatch_info("train")
        wg._collect_info["train"] = wg._query_collect_info("train")
    return groups


def pool_nodes(pool: RayResourcePool) -> list[str]:
    """Ray node id of every rank slot of a (placed) pool."""
    nodes = []
    for pg in pool.pgs or []:
        table = placement_group_table(pg)["bundles_to_node_id"]
        nodes.extend(table[i] for i in sorted(table))
    return nodes


def release(worker_groups: Iterable[RayWorkerGroup]) -> None:
    """Kill the groups' processes (colocated roles share them), freeing their slots and memory."""
    for worker in {worker for group in worker_groups for worker in group.workers}:
        ray.kill(worker)


def release_pool(pool: RayResourcePool) -> None:
    """Remove the pool's placement groups (after its groups are released)."""
    for pg in pool.pgs or []:
        remove_placement_group(pg)
    pool.pgs = None


def with_meta(td: TensorDict, **meta) -> TensorDict:
    """Shallow copy of `td` with extra non-tensor entries (the original is left as it was)."""
    out = td.copy()
    tu.assign_non_tensor(out, **meta)
    return out


class WorkerLogs:
    """This node's Ray worker output (the session's logs/worker-* files), copied a stage at a time: `mark()` before
    the stage, `copy(out)` after it appends what the workers wrote in between to `out`. Only with a Ray this
    process started quietly (`init_ray`, ray_init.log_to_driver=false); otherwise it does nothing."""

    def __init__(self):
        self.sizes: dict[Path, int] = {}

    def mark(self) -> None:
        self.sizes = {f: f.stat().st_size for f in self.files()}

    def copy(self, out: Path) -> Path | None:
        """Append the new output to `out`; the path, or None when there was none."""
        parts = []
        for f in self.files():
            with open(f, "rb") as fh:
                fh.seek(self.sizes.get(f, 0))
                text = fh.read().decode(errors="replace")
            if text.strip():
                parts.append(f"==> {f.name} <==\n{text}")
        if not parts:
            return None
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "a") as log:
            log.write("\n".join(parts))
        return out

    @staticmethod
    def files() -> list[Path]:
        if _SESSION_LOGS is None or not ray.is_initialized():
            return []
        return sorted(_SESSION_LOGS.glob("worker-*"))
