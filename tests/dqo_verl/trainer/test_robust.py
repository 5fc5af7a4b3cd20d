"""Bad input and bad numbers: one clear error, nothing half-written; a failed worker never hangs the driver."""

import subprocess
import sys
import time

import pandas as pd
import pytest
import torch
from transformers import AutoConfig, AutoModelForTokenClassification

from dqo_verl.config.compose import compose_config
from dqo_verl.config.errors import RowError, RunError
from dqo_verl.trainer import base as driver
from dqo_verl.trainer.methods import DQOTrainer, make_trainer


def run_main(tmp_path, tiny_models, corpus):
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "dqo_verl.main",
            "+recipe=tiny_cpu",
            f"data.train_files={corpus}",
            f"policy.model.path={tiny_models[0]}",
            f"value.model.path={tiny_models[1]}",
            f"trainer.output_dir={tmp_path / 'o'}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.slow
def test_bad_corpus_fails_before_ray_with_file_row_and_field(tmp_path, tiny_models):
    corpus = tmp_path / "bad.parquet"
    pd.DataFrame({"prompt_ids": [[1, 2], [3]], "response_ids": [[4], [5, 6]], "score": [1.0, float("nan")]}).to_parquet(
        corpus
    )
    out = run_main(tmp_path, tiny_models, corpus)
    assert out.returncode == 1
    assert (
        out.stderr.strip().splitlines()[-1] == f"error: {corpus}, row 1, field 'score': reward is missing (null or nan)"
    )
    assert "Started a local Ray" not in out.stdout + out.stderr  # no Ray, no workers
    assert not (tmp_path / "o" / "checkpoints").exists()  # (Hydra's own config snapshot is there)


def test_a_token_id_beyond_the_vocabulary_fails_before_any_worker(tmp_path, tiny_models):
    """Checked against the models' own vocabulary when the trainer is made (workers start later, in `start`)."""
    vocab = AutoConfig.from_pretrained(tiny_models[0]).vocab_size
    corpus = tmp_path / "oov.parquet"
    pd.DataFrame(
        {"prompt_ids": [[1, 2], [3, 4]], "response_ids": [[4, 5], [5, vocab]], "score": [1.0, 0.0]}
    ).to_parquet(corpus)
    cfg = compose_config(
        "tiny_cpu",
        [f"data.train_files={corpus}", f"policy.model.path={tiny_models[0]}", f"value.model.path={tiny_models[1]}"],
    )
    with pytest.raises(RowError) as err:
        make_trainer(cfg)
    assert (
        str(err.value) == f"{corpus}, row 1, field 'response_ids': token id {vocab} outside the vocabulary [0, {vocab})"
    )


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_failing_rank_stops_the_driver_at_once_naming_its_group(
    ray_session, tiny_models, tiny_corpus, tmp_path, monkeypatch
):
    """One rank raises (an id beyond the embedding) while the other waits in a collective for it: the driver
    must not wait on both ranks at once, which hung until killed."""
    rows = pd.read_parquet(tiny_corpus)
    vocab = AutoConfig.from_pretrained(tiny_models[0]).vocab_size
    rows.at[0, "response_ids"] = [*rows.at[0, "response_ids"][:-1], vocab + 7]  # rank 0's first row
    rows.to_parquet(tmp_path / "bad.parquet")
    monkeypatch.setattr(driver, "vocab_size", lambda paths: 2 * vocab)  # let it through, as a bug upstream might
    cfg = compose_config(
        "tiny_cpu",
        [
            f"data.train_files={tmp_path / 'bad.parquet'}",
            f"policy.model.path={tiny_models[0]}",
            f"value.model.path={tiny_models[1]}",
            f"trainer.output_dir={tmp_path / 'run'}",
            f"data.ref_cache_dir={tmp_path / 'ref'}",
            "trainer.logger=[console]",
        ],
    )
    trainer = DQOTrainer(cfg)
    start = time.time()
    try:
        with pytest.raises(
            RunError, match=r"worker group 'policy' failed computing reference log-probs of rows 0\.\.: "
        ):
            trainer.start()
    finally:
        trainer.shutdown()
    assert time.time() - start < 120
    assert not list((tmp_path / "ref").glob("part-*"))


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
        [
            f"data.train_files={tiny_corpus}",
            f"policy.model.path={tiny_models[0]}",
            f"value.model.path={broken_value}",
            f"trainer.output_dir={out}",
            "trainer.save_freq=1",
            "trainer.logger=[console]",
        ],
    )
    with DQOTrainer(cfg) as trainer:
        with pytest.raises(
            RunError, match=r"non-finite (policy|value) loss \(nan\) at step 1; stopping without a checkpoint"
        ):
            trainer.fit()
    assert not (out / "checkpoints").exists() or not any((out / "checkpoints").iterdir())
