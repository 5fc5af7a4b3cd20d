"""Hydra config: base + recipe composition, command-line overrides, `--cfg job`."""

import subprocess
import sys

import yaml

from dqo_verl.main import RECIPES_DIR, compose_config, register_recipes


def test_recipes_are_registered():
    names = register_recipes()
    assert "tiny_cpu" in names
    assert sorted(names) == sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def test_tiny_recipe_composes_over_base_with_overrides():
    cfg = compose_config("tiny_cpu", ["algorithm.beta=0.1", "paths.assets=/x"])
    assert cfg.algorithm.beta == 0.1 and cfg.algorithm.lam == 1.0  # override, base default
    assert cfg.data.train_files == "/x/corpus.parquet"
    assert cfg.policy.model.path == "/x/policy" and cfg.value.model.path == "/x/value"
    assert cfg.policy.engine.strategy == "fsdp2" and cfg.value.engine.strategy == "fsdp2"
    assert cfg.policy.optim._target_ == "verl.workers.config.FSDPOptimizerConfig"  # verl's own config groups
    assert cfg.trainer.n_gpus_per_node == 2 and cfg.trainer.experiment_name == "tiny_cpu"
    assert cfg.trainer.default_local_dir == "outputs/dqo/tiny_cpu/checkpoints"
    assert "hf_model" in cfg.checkpoint.save_contents


def test_cfg_job_prints_the_composed_config():
    out = subprocess.run(
        [sys.executable, "-m", "dqo_verl.main", "+recipe=tiny_cpu", "algorithm.granularity=sequence", "--cfg", "job"],
        capture_output=True, text=True, check=True,
    ).stdout
    cfg = yaml.safe_load(out)
    assert cfg["algorithm"]["granularity"] == "sequence"
    assert cfg["policy"]["optim"]["lr"] == 2e-5 and cfg["value"]["optim"]["lr"] == 3e-4
