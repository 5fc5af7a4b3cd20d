"""The Ray worker class of the policy, value and reference groups."""

from __future__ import annotations

from verl.utils.device import get_device_name
from verl.utils.distributed import initialize_global_process_group_ray
from verl.workers.engine_workers import TrainingWorker


class DQOWorker(TrainingWorker):
    """verl's `TrainingWorker`. On the CPU platform its process group is plain gloo: verl's default
    backend string "cpu:gloo,<device>:<backend>" names the cpu device twice there, which torch rejects."""

    def __init__(self, config):
        if get_device_name() == "cpu":
            initialize_global_process_group_ray(backend="gloo")
        super().__init__(config)
