"""Supervised fine-tuning through the same worker groups: the demo's warm-up and the SFT / RS baselines.

Trains a `language_model` group on (prompt_ids, response_ids) rows with the token-mean NLL of the
responses, then exports the model in HF format.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import pandas as pd
from omegaconf import DictConfig
from tqdm import tqdm

from verl.utils import tensordict_utils as tu
from verl.utils.metric import reduce_metrics
from verl.workers.utils.padding import left_right_2_no_padding

from dqo_verl.data import BatchSpec, build_batch, epoch_batches
from dqo_verl.losses import sft_loss_fn
from dqo_verl.workers import make_resource_pool, make_worker_group, release, release_pool, with_meta


def run_sft(
    rows: pd.DataFrame,
    role: DictConfig,
    checkpoint: DictConfig,
    out_dir: str | os.PathLike,
    steps: int,
    batch_size: int,
    pad_token_id: int,
    nnodes: int = 1,
    n_gpus_per_node: int = 1,
    seed: int = 0,
    check_every: int | None = None,
    check_from: int = 0,
    done: Callable[[Path, int], bool] | None = None,
) -> list[float]:
    """Train up to `steps` updates of `batch_size` rows (reshuffled each epoch); save the HF model to out_dir.

    With `check_every`, the model is exported every that many steps (from step `check_from`) and
    `done(hf_dir, step)` decides whether to stop there (e.g. once held-out accuracy reaches a target).
    Returns the loss of each update. `role` is a policy section (model / engine / optim).
    """
    pool = make_resource_pool(nnodes, n_gpus_per_node, name="sft")
    group = make_worker_group(pool, "sft", "language_model", role, checkpoint, total_steps=steps, loss_fn=sft_loss_fn)
    spec = BatchSpec(pad_token_id=pad_token_id)
    per_epoch = len(rows) // batch_size
    losses = []
    out = Path(out_dir)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
        ckpt = Path(tmp) / "ckpt"

        def export(step: int) -> Path:
            shutil.rmtree(ckpt, ignore_errors=True)
            group.save_checkpoint(local_path=str(ckpt), global_step=step)
            return ckpt / "huggingface"

        for step in tqdm(range(steps), desc="SFT", unit="step", dynamic_ncols=True):
            epoch, index = divmod(step, per_epoch)
            batch = build_batch(rows.iloc[epoch_batches(len(rows), batch_size, seed, epoch)[index]], spec)
            td = with_meta(
                left_right_2_no_padding(batch),
                mini_batch_size=batch_size,
                global_batch_size=batch_size,
                epochs=1,
                seed=seed + step,
                dataloader_kwargs={"shuffle": False},
            )
            metrics = reduce_metrics(tu.get(group.train_mini_batch(td).get(), "metrics"))
            losses.append(float(metrics["loss"]))
            n = step + 1
            if done and check_every and n % check_every == 0 and check_from <= n < steps and done(export(n), n):
                break
        else:
            export(steps)
        shutil.rmtree(out, ignore_errors=True)
        os.rename(ckpt / "huggingface", out)
    release(group)
    release_pool(pool)
    return losses
