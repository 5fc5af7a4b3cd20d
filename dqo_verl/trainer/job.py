"""The `train` stage, what `python -m dqo_verl.main` runs: the method `algorithm.name` on `data.train_files`."""

from __future__ import annotations

from omegaconf import DictConfig

from dqo_verl.trainer.methods import make_trainer
from dqo_verl.workers.groups import init_ray


def train(cfg: DictConfig) -> dict:
    """The `train` stage (`python -m dqo_verl.main`): `algorithm.name` on `data.train_files`; the last metrics."""
    trainer = make_trainer(cfg)  # bad input fails here, before Ray or any worker starts
    init_ray(cfg)
    try:
        return trainer.fit()
    finally:
        trainer.shutdown()
