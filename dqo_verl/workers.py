"""Ray worker groups of verl `TrainingWorker`s: the policy, value, reference (and SFT) models."""

from __future__ import annotations

import ray
from omegaconf import DictConfig
from tensordict import TensorDict

from verl.utils import tensordict_utils as tu
from verl.single_controller.ray import RayClassWithInitArgs, RayResourcePool, RayWorkerGroup
from verl.utils.config import omega_conf_to_dataclass
from verl.utils.device import get_device_name
from verl.utils.distributed import initialize_global_process_group_ray
from verl.workers.engine_workers import TrainingWorker

GROUPS_PER_RANK = 3  # policy, value and (at start-up) reference share each rank's slot


class DQOWorker(TrainingWorker):
    """verl's `TrainingWorker`. On the CPU platform its process group is plain gloo: verl's default
    backend string "cpu:gloo,<device>:<backend>" names the cpu device twice there, which torch rejects."""

    def __init__(self, config):
        if get_device_name() == "cpu":
            initialize_global_process_group_ray(backend="gloo")
        super().__init__(config)


def make_resource_pool(nnodes: int, n_gpus_per_node: int, name: str = "dqo") -> RayResourcePool:
    """nnodes x n_gpus_per_node ranks (processes on CPU), each slot shared by up to GROUPS_PER_RANK groups."""
    return RayResourcePool(
        process_on_nodes=[n_gpus_per_node] * nnodes,
        use_gpu=get_device_name() != "cpu",
        max_colocate_count=GROUPS_PER_RANK,
        name_prefix=name,
    )


def make_worker_group(
    pool: RayResourcePool,
    name: str,
    model_type: str,
    role: DictConfig,
    checkpoint: DictConfig,
    total_steps: int = 1,
    loss_fn=None,
    forward_only: bool = False,
) -> RayWorkerGroup:
    """A started group of `DQOWorker`s for one model; `role` has verl's model / engine / optim sections."""
    from verl.workers.config import TrainingWorkerConfig

    engine_config = omega_conf_to_dataclass(role.engine)
    engine_config.forward_only = forward_only
    optimizer_config = omega_conf_to_dataclass(role.optim)
    optimizer_config.total_training_steps = total_steps
    worker_config = TrainingWorkerConfig(
        model_type=model_type,
        model_config=omega_conf_to_dataclass(role.model),
        engine_config=engine_config,
        optimizer_config=optimizer_config,
        checkpoint_config=omega_conf_to_dataclass(checkpoint),
    )
    group = RayWorkerGroup(
        resource_pool=pool,
        ray_cls_with_init=RayClassWithInitArgs(ray.remote(DQOWorker), config=worker_config),
        device_name=get_device_name(),
        name_prefix=f"{pool.name_prefix}_{name}_",
    )
    if loss_fn is not None:
        group.set_loss_fn(loss_fn=loss_fn)
    group.reset()
    return group


def pool_nodes(pool: RayResourcePool) -> list[str]:
    """Ray node id of every rank slot of a (placed) pool."""
    from ray.util import placement_group_table

    nodes = []
    for pg in pool.pgs or []:
        table = placement_group_table(pg)["bundles_to_node_id"]
        nodes.extend(table[i] for i in sorted(table))
    return nodes


def release(group: RayWorkerGroup) -> None:
    """Kill the group's actors, freeing their slots (and memory)."""
    for worker in group.workers:
        ray.kill(worker)


def release_pool(pool: RayResourcePool) -> None:
    """Remove the pool's placement groups (after its groups are released)."""
    from ray.util.placement_group import remove_placement_group

    for pg in pool.pgs or []:
        remove_placement_group(pg)
    pool.pgs = None


def with_meta(td: TensorDict, **meta) -> TensorDict:
    """Shallow copy of `td` with extra non-tensor entries (the original is left as it was)."""
    out = td.copy()
    tu.assign_non_tensor(out, **meta)
    return out
