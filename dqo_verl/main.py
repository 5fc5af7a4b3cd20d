"""The main job: `python -m dqo_verl.main +recipe=NAME [key=value ...]`, the same under `ray job submit`.

Trains the method `algorithm.name` (dqo, dro, sft) on the corpus `data.train_files`; Ray is started
(or joined: `ray_init.address`, RAY_ADDRESS) only after the corpus has been read and checked.
It is the pipeline's `train` stage, and what a cluster user submits.
"""

from __future__ import annotations

from omegaconf import DictConfig

from dqo_verl.cli import entry_point
from dqo_verl.trainers import make_trainer
from dqo_verl.workers import init_ray


def run(config: DictConfig) -> dict:
    """Train `algorithm.name` as configured; returns the last update's metrics."""
    trainer = make_trainer(config)  # bad input fails here, before Ray or any worker starts
    init_ray(config)
    try:
        return trainer.fit()
    finally:
        trainer.shutdown()


main = entry_point(run)

if __name__ == "__main__":
    main()
