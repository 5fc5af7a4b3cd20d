"""Bad input and bad numbers: one clear error, nothing half-written."""

import subprocess
import sys

import pandas as pd
import pytest
import torch
from transformers import AutoModelForTokenClassification

from dqo_verl.main import compose_config
from dqo_verl.trainer import DQOTrainer, TrainingError


def test_bad_corpus_fails_before_ray_with_file_row_and_field(tmp_path, tiny_models):
    corpus = tmp_path / "bad.parquet"
    pd.DataFrame({"prompt_ids": [[1, 2], [3]], "response_ids": [[4], [5, 6]], "score": [1.0, float("nan")]}).to_parquet(corpus)
    out = subprocess.run(
        [sys.executable, "-m", "dqo_verl.main", "+recipe=tiny_cpu", f"data.train_files={corpus}",
         f"policy.model.path={tiny_models[0]}", f"value.model.path={tiny_models[1]}", f"trainer.output_dir={tmp_path / 'o'}"],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 1
    assert out.stderr.strip().splitlines()[-1] == f"error: {corpus}, row 1, field 'score': reward is nan"
    assert "Started a local Ray" not in out.stdout + out.stderr  # no Ray, no workers
    assert not (tmp_path / "o" / "checkpoints").exists()  # (Hydra's own config snapshot is there)


@pytest.mark.slow
def test_non_finite_loss_stops_at_that_step_without_its_checkpoint(ray_session, tiny_models, tiny_corpus, tmp_path):
    broken_value = tmp_path / "value_nan"
    model = AutoModelForTokenClassification.from_pretrained(tiny_models[1])
    with torch.no_grad():
        model.score.weight[0, 0] = float("nan")  # a corrupt value checkpoint
    model.save_pretrained(broken_value)
    out = tmp_path / "run"
    cfg = compose_config(
        "tiny_cpu",
        [f"data.train_files={tiny_corpus}", f"policy.model.path={tiny_models[0]}", f"value.model.path={broken_value}",
         f"trainer.output_dir={out}", "trainer.save_freq=1", "trainer.logger=[console]"],
    )
    trainer = DQOTrainer(cfg)
    try:
        with pytest.raises(TrainingError, match=r"non-finite (policy|value) loss \(nan\) at step 1; stopping without a checkpoint"):
            trainer.fit()
    finally:
        trainer.shutdown()
    assert not (out / "checkpoints").exists() or not any((out / "checkpoints").iterdir())
