"""The DQO driver: one process that owns the offline update loop over Ray worker groups.

Policy (`language_model`), value (`value_model`) and, once, a frozen reference (`language_model`,
forward only) are verl `TrainingWorker` groups on one resource pool of nnodes x n_gpus_per_node
ranks. Each update: policy and value forward passes -> log-ratio and V on the driver ->
lambda-returns and importance weights (`algo.py`) -> one value and one policy optimizer step with
the DQO losses (`losses.py`, installed with `set_loss_fn`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import ray
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

import dqo_verl.cpu_platform  # noqa: F401  (registers the CPU platform; errors surface here, not silently)
from verl.utils import tensordict_utils as tu
from verl.utils.device import get_device_name
from verl.utils.metric import reduce_metrics
from verl.utils.tracking import Tracking
from verl.workers.utils.padding import left_right_2_no_padding, no_padding_2_padding

from dqo_verl import algo
from dqo_verl.checkpoints import COMPLETE_MARKER, CheckpointDir
from dqo_verl.data import (
    BatchSpec,
    apply_length_limits,
    build_batch,
    epoch_batches,
    parquet_metadata,
    read_corpus,
    validate_corpus,
    write_parquet_atomic,
)
from dqo_verl.losses import dqo_policy_loss_fn, dqo_value_loss_fn
from dqo_verl.workers import (
    GROUPS_PER_RANK,
    make_resource_pool,
    make_worker_group,
    pool_nodes,
    release,
    release_pool,
    with_meta,
)

PLUGIN_ENV = {"VERL_USE_EXTERNAL_MODULES": "dqo_verl.cpu_platform", "TOKENIZERS_PARALLELISM": "false"}


def init_ray(config: DictConfig) -> None:
    """Connect to the Ray cluster (RAY_ADDRESS / ray_init.address) or start a local one."""
    if ray.is_initialized():
        return
    kwargs = {"runtime_env": {"env_vars": dict(PLUGIN_ENV)}}
    address = config.ray_init.address or os.environ.get("RAY_ADDRESS")
    if address:
        kwargs["address"] = address
    else:
        ranks = config.trainer.nnodes * config.trainer.n_gpus_per_node
        kwargs["num_cpus"] = config.ray_init.num_cpus or max(os.cpu_count() or 1, GROUPS_PER_RANK * ranks + 1)
        kwargs["include_dashboard"] = False
    ray.init(**kwargs)


def _attn_implementation(device: str) -> str:
    if device == "cuda":
        try:
            import flash_attn  # noqa: F401

            return "flash_attention_2"
        except ImportError:
            return "sdpa"
    return "sdpa"


class TrainingError(RuntimeError):
    """The run cannot go on (non-finite loss or gradient, a lost worker); the last checkpoint stands."""


def collect(future, group: str, step: int):
    """Result of a worker-group call; fails fast, naming the group, when one of its workers dies.

    Waiting on each rank separately matters: the surviving ranks of an FSDP group would block in a
    collective until their timeout, so waiting on all of them at once would hang.
    """
    pending = list(future.futures)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        try:
            ray.get(ready[0])
        except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as exc:
            raise TrainingError(f"worker group '{group}' failed at step {step}: {type(exc).__name__}: {exc}") from exc
    return future.get()


def _set_config_dtype_to_weights(model_dir: Path) -> None:
    """verl writes hf_model weights in the training dtype but labels config.json bfloat16, so a plain
    `from_pretrained` would downcast them; label the config with the dtype actually stored."""
    from safetensors import safe_open

    names = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
    shard = sorted(model_dir.glob("*.safetensors"))[0]
    with safe_open(shard, "pt") as f:
        stored = names.get(f.get_slice(next(iter(f.keys()))).get_dtype())
    config_path = model_dir / "config.json"
    config = json.loads(config_path.read_text())
    if stored and config.get("dtype") != stored:
        config["dtype"] = stored
        config_path.write_text(json.dumps(config, indent=2) + "\n")


def _rows_digest(rows: np.ndarray) -> str:
    return hashlib.sha1(np.asarray(rows, dtype=np.int64).tobytes()).hexdigest()[:16]


class StepLog:
    """<output_dir>/metrics.jsonl: one JSON record per update (metrics and which rows it used).

    On resume, records after the resumed step (updates lost with the process) are dropped first.
    """

    def __init__(self, path: Path, resume_step: int):
        path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if path.exists():
            kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= resume_step]
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, path)
        self.file = open(path, "a", buffering=1)

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")

    def close(self) -> None:
        self.file.close()


def _scalars(metrics: dict) -> dict:
    return {k: float(v) for k, v in metrics.items()}


def load_training_corpus(config: DictConfig) -> pd.DataFrame:
    """Read, check and length-limit the corpus (before any worker starts); prints what was cut."""
    path = Path(config.data.train_files).expanduser()
    corpus = read_corpus(path)
    validate_corpus(corpus, path)
    overlong = config.data.overlong
    corpus, stats = apply_length_limits(corpus, config.data.max_prompt_length, config.data.max_response_length, overlong)
    if stats["prompt_too_long_dropped"] or stats["response_too_long"]:
        print(
            f"[data] {stats['prompt_too_long_dropped']} rows dropped (prompt > {config.data.max_prompt_length} tokens); "
            f"{stats['response_too_long']} responses > {config.data.max_response_length} tokens ({overlong})"
        )
    return corpus


class DQOTrainer:
    """Builds the worker groups and runs the offline DQO update loop."""

    def __init__(self, config: DictConfig, corpus: pd.DataFrame | None = None):
        self.config = config
        self.device = get_device_name()
        self.out_dir = Path(config.trainer.output_dir)
        self.checkpoints = CheckpointDir(config.trainer.default_local_dir)
        for role in ("policy", "value"):
            if config[role].model.override_config.get("attn_implementation") is None:
                config[role].model.override_config.attn_implementation = _attn_implementation(self.device)

        corpus_path = Path(config.data.train_files).expanduser()
        if corpus is None:
            corpus = load_training_corpus(config)

        ranks = config.trainer.nnodes * config.trainer.n_gpus_per_node
        self.pool = make_resource_pool(config.trainer.nnodes, config.trainer.n_gpus_per_node)
        self.corpus = self._with_ref_logprobs(corpus, corpus_path)

        self.batch_size = config.data.train_batch_size
        for role in ("policy", "value"):
            for key in ("micro_batch_size_per_gpu", "infer_micro_batch_size_per_gpu"):
                micro = config[role].engine[key]
                if self.batch_size % (ranks * micro):
                    raise ValueError(
                        f"data.train_batch_size={self.batch_size} must be a multiple of the {ranks} ranks x "
                        f"{role}.engine.{key}={micro}"
                    )
        self.steps_per_epoch = len(self.corpus) // self.batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(f"corpus has {len(self.corpus)} rows, fewer than data.train_batch_size={self.batch_size}")
        self.total_steps = self.steps_per_epoch * config.trainer.total_epochs
        if config.trainer.total_training_steps is not None:
            self.total_steps = min(self.total_steps, config.trainer.total_training_steps)

        self.spec = BatchSpec(
            pad_token_id=self._pad_token_id(),
            granularity=config.algorithm.granularity,
            use_process_rewards=config.algorithm.use_process_rewards,
        )
        self.policy = self._worker_group("policy", "language_model", config.policy, partial(dqo_policy_loss_fn, beta=config.algorithm.beta))
        self.value = self._worker_group("value", "value_model", config.value, dqo_value_loss_fn)
        nodes = pool_nodes(self.pool)
        print(f"[pool] {len(nodes)} ranks on {len(set(nodes))} node(s) ({self.device}); policy and value groups up")

    # ------------------------------------------------------------------ worker groups

    def _pad_token_id(self) -> int:
        from verl.utils import hf_tokenizer

        tokenizer = hf_tokenizer(self.config.policy.model.path)
        return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def _worker_group(self, name: str, model_type: str, role: DictConfig, loss_fn=None, forward_only=False):
        return make_worker_group(
            self.pool, name, model_type, role, self.config.checkpoint, getattr(self, "total_steps", 1), loss_fn, forward_only
        )

    # ------------------------------------------------------------------ reference log-probs

    def _ref_cache_path(self, corpus_path: Path) -> Path:
        configured = self.config.data.get("ref_cache_file")
        return Path(configured) if configured else corpus_path.with_name(corpus_path.stem + ".ref.parquet")

    def _ref_fingerprint(self, corpus_path: Path) -> dict:
        st = corpus_path.stat()
        d = self.config.data
        return {
            "dqo.ref_model": str(Path(self.config.ref.path).expanduser().resolve()),
            "dqo.corpus": f"{corpus_path.resolve()}:{st.st_size}:{st.st_mtime_ns}",
            "dqo.limits": f"{d.max_prompt_length}:{d.max_response_length}:{d.overlong}",
        }

    def _with_ref_logprobs(self, corpus: pd.DataFrame, corpus_path: Path) -> pd.DataFrame:
        """Corpus with `ref_logprobs`: as given, from the cache, or computed once by a reference group."""
        if "ref_logprobs" in corpus.columns and corpus["ref_logprobs"].notna().all():
            return corpus
        cache = self._ref_cache_path(corpus_path)
        fingerprint = self._ref_fingerprint(corpus_path)
        if cache.exists():
            meta = parquet_metadata(cache)
            if all(meta.get(k) == v for k, v in fingerprint.items()):
                print(f"[ref] reusing cached reference log-probs: {cache}")
                return pd.read_parquet(cache)
            print(f"[ref] {cache} was made for another corpus or reference model; recomputing")

        print(f"[ref] computing reference log-probs of {len(corpus)} responses with {self.config.ref.path}")
        ref_role = OmegaConf.merge(
            self.config.policy,
            {"model": {"path": self.config.ref.path}, "engine": {"infer_micro_batch_size_per_gpu": self.config.ref.micro_batch_size_per_gpu}},
        )
        ref = self._worker_group("ref", "language_model", ref_role, forward_only=True)
        ranks = self.config.trainer.nnodes * self.config.trainer.n_gpus_per_node
        spec = BatchSpec(pad_token_id=self._pad_token_id())
        unit = ranks * self.config.ref.micro_batch_size_per_gpu  # every rank needs whole micro-batches
        chunk = max(unit, self.config.ref.batch_size // unit * unit)
        logprobs: list[np.ndarray] = []
        n = len(corpus)
        with tqdm(total=n, desc="ref log-probs", unit="resp", dynamic_ncols=True) as bar:
            for start in range(0, n, chunk):
                rows = corpus.iloc[start : start + chunk]
                pad = (-len(rows)) % unit  # repeat a row to fill the last micro-batches; its outputs are dropped
                batch = build_batch(pd.concat([rows, rows.iloc[[0] * pad]]) if pad else rows, spec)
                td = left_right_2_no_padding(batch)
                out = ref.infer_batch(with_meta(td, compute_loss=False, calculate_entropy=False)).get()
                lp = no_padding_2_padding(tu.get(out, "log_probs"), td).float()
                lens = batch["response_mask"].sum(dim=1).tolist()
                logprobs.extend(lp[i, : lens[i]].numpy().copy() for i in range(len(rows)))
                bar.update(len(rows))
        release(ref)
        corpus = corpus.copy()
        corpus["ref_logprobs"] = logprobs
        write_parquet_atomic(corpus, cache, metadata=fingerprint)
        print(f"[ref] wrote {cache}; reference group released")
        return corpus

    # ------------------------------------------------------------------ one update

    def train_step(self, rows: pd.DataFrame, step: int) -> dict:
        """One DQO update on `rows`: forward passes, targets on the driver, value and policy steps."""
        cfg = self.config.algorithm
        batch = build_batch(rows, self.spec)
        td = left_right_2_no_padding(batch)
        policy_out = self.policy.infer_batch(with_meta(td, compute_loss=False, calculate_entropy=False))
        value_out = self.value.infer_batch(with_meta(td, compute_loss=False))
        logp = no_padding_2_padding(tu.get(collect(policy_out, "policy", step + 1), "log_probs"), td).float()
        values = no_padding_2_padding(tu.get(collect(value_out, "value", step + 1), "values"), td).float()

        mask = td["response_mask"].bool()
        log_ratio = torch.where(mask, logp - td["ref_logprobs"], torch.zeros_like(logp))
        ends = td["action_ends"]
        a_log_ratio = algo.collapse_to_actions(log_ratio, ends)
        a_rewards = algo.collapse_to_actions(td["rewards"], ends)
        a_values = algo.values_at_action_starts(values, ends)
        a_mask = algo.action_mask(ends)
        returns = algo.compute_lambda_returns(a_rewards, a_log_ratio, a_values, a_mask, cfg.beta, cfg.lam)
        weights = algo.compute_is_weights(a_log_ratio, a_mask, cfg.is_log_clip)
        ones = torch.ones_like(weights)

        update = dict(
            num_actions=int(a_mask.sum()),
            mini_batch_size=len(rows),
            global_batch_size=len(rows),
            epochs=1,
            seed=self.config.trainer.seed + step,
            dataloader_kwargs={"shuffle": False},
        )
        value_td = with_meta(td, **update)
        value_td["returns"] = returns
        value_td["is_weights"] = weights if cfg.is_value else ones
        policy_td = with_meta(td, **update)
        policy_td["values"] = values
        policy_td["returns"] = returns
        policy_td["is_weights"] = weights if cfg.is_policy else ones
        value_future = self.value.train_mini_batch(value_td)
        policy_future = self.policy.train_mini_batch(policy_td)
        value_metrics = _scalars(reduce_metrics(tu.get(collect(value_future, "value", step + 1), "metrics")))
        policy_metrics = _scalars(reduce_metrics(tu.get(collect(policy_future, "policy", step + 1), "metrics")))
        for group, group_metrics in (("policy", policy_metrics), ("value", value_metrics)):
            for key in ("loss", "grad_norm"):
                if not math.isfinite(group_metrics.get(key, 0.0)):
                    raise TrainingError(
                        f"non-finite {group} {key.replace('_', ' ')} ({group_metrics[key]}) at step {step + 1}; "
                        "stopping without a checkpoint of this step"
                    )

        seq_log_ratio = log_ratio.sum(dim=1)
        metrics = {f"value/{k}" if "/" not in k else k: v for k, v in value_metrics.items()}
        metrics.update({f"policy/{k}" if "/" not in k else k: v for k, v in policy_metrics.items()})
        metrics.update(
            {
                "dqo/is_weight_mean": weights.mean().item(),
                "dqo/is_weight_min": weights.min().item(),
                "dqo/is_weight_max": weights.max().item(),
                "dqo/is_weight_below_0.05": (weights < 0.05).float().mean().item(),
                "dqo/is_weight_clipped": (seq_log_ratio >= cfg.is_log_clip).float().mean().item(),
                "dqo/kl_seq_mean": seq_log_ratio.mean().item(),
                "dqo/v_first_mean": values[:, 0].mean().item(),
                "dqo/returns_first_mean": returns[:, 0].mean().item(),
                "dqo/reward_mean": a_rewards.sum(dim=1).mean().item(),
                "dqo/response_length_mean": mask.sum(dim=1).float().mean().item(),
                "dqo/num_actions": update["num_actions"],
            }
        )
        return metrics

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self, step: int) -> Path:
        """global_step_N/{policy,value,trainer_state.json}, atomically (see checkpoints.py); prunes old ones."""

        def write(folder: Path) -> None:
            self.policy.save_checkpoint(local_path=str(folder / "policy"), global_step=step)
            self.value.save_checkpoint(local_path=str(folder / "value"), global_step=step)
            state = {"global_step": step, "steps_per_epoch": self.steps_per_epoch, "seed": self.config.trainer.seed}
            (folder / COMPLETE_MARKER).write_text(json.dumps(state, indent=2))

        path = self.checkpoints.save(step, write)
        self.checkpoints.prune(self.config.trainer.max_ckpt_to_keep)
        return path

    def load_checkpoint(self) -> int:
        """Restore policy, value and data position per trainer.resume_mode; returns the global step."""
        mode = self.config.trainer.resume_mode
        if mode == "disable":
            return 0
        if mode in ("path", "resume_path"):
            path = self.config.trainer.resume_from_path
            if not path or not (Path(path) / COMPLETE_MARKER).exists():
                raise FileNotFoundError(f"trainer.resume_from_path={path!r} is not a checkpoint folder")
        elif mode == "auto":
            path = self.checkpoints.latest()
            if path is None:
                return 0
        else:
            raise ValueError(f"trainer.resume_mode must be auto, disable or path, got {mode!r}")
        path = Path(path)
        state = json.loads((path / COMPLETE_MARKER).read_text())
        if state["steps_per_epoch"] != self.steps_per_epoch:
            raise ValueError(f"{path}: saved with {state['steps_per_epoch']} updates per epoch, now {self.steps_per_epoch}")
        self.policy.load_checkpoint(local_path=str(path / "policy"))
        self.value.load_checkpoint(local_path=str(path / "value"))
        print(f"[resume] {path} (global step {state['global_step']})")
        return int(state["global_step"])

    def export_policy(self, checkpoint: Path) -> Path:
        """Copy the final policy's HF model (save_pretrained format) to <output_dir>/export/policy."""
        src = checkpoint / "policy" / "huggingface"
        dst = self.out_dir / "export" / "policy"
        tmp = dst.with_name(".policy.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src, tmp)
        _set_config_dtype_to_weights(tmp)
        shutil.rmtree(dst, ignore_errors=True)
        os.rename(tmp, dst)
        return dst

    def shutdown(self) -> None:
        """Release the worker groups and their placement groups."""
        release(self.policy)
        release(self.value)
        release_pool(self.pool)

    # ------------------------------------------------------------------ loop

    def fit(self) -> dict:
        """Run all updates (resuming if configured); returns the last step's metrics."""
        config = self.config
        os.environ["TENSORBOARD_DIR"] = str(Path(config.trainer.get("tensorboard_dir") or self.out_dir / "tensorboard").resolve())
        tracking = Tracking(
            project_name=config.trainer.project_name,
            experiment_name=config.trainer.experiment_name,
            default_backend=list(config.trainer.logger),
            config=OmegaConf.to_container(config, resolve=True),
        )
        step = self.load_checkpoint()
        step_log = StepLog(self.out_dir / "metrics.jsonl", resume_step=step)
        metrics: dict = {}
        self.history: list[dict] = []
        last_ckpt = None
        bar = tqdm(total=self.total_steps, initial=step, desc="DQO", unit="step", dynamic_ncols=True)
        while step < self.total_steps:
            epoch, index = divmod(step, self.steps_per_epoch)
            batches = epoch_batches(len(self.corpus), self.batch_size, config.trainer.seed, epoch, config.data.shuffle)
            rows = self.corpus.iloc[batches[index]]
            start = time.perf_counter()
            metrics = self.train_step(rows, step)
            elapsed = time.perf_counter() - start
            step += 1
            tokens = int(rows["response_ids"].map(len).sum())
            metrics.update({"perf/step_time_s": elapsed, "perf/response_tokens_per_s": tokens / elapsed, "train/epoch": epoch + 1})
            tracking.log(data=metrics, step=step)
            step_log.write({"step": step, "epoch": epoch, "batch": index, "rows_sha1": _rows_digest(batches[index]), **metrics})
            self.history.append(metrics)
            bar.set_postfix(
                epoch=epoch + 1, tok_s=f"{tokens / elapsed:.0f}", pi_loss=f"{metrics.get('policy/loss', float('nan')):.4f}"
            )
            bar.update(1)
            end_of_epoch = index == self.steps_per_epoch - 1
            save_freq = config.trainer.save_freq
            if end_of_epoch or step == self.total_steps or (save_freq and save_freq > 0 and step % save_freq == 0):
                last_ckpt = self.save_checkpoint(step)
        bar.close()
        step_log.close()
        if last_ckpt is None:
            last_ckpt = self.checkpoints.latest() or self.save_checkpoint(step)
        export = self.export_policy(last_ckpt)
        tracking.finish()
        print(f"[done] checkpoints: {self.checkpoints.root.resolve()}")
        print(f"[done] logs: {os.environ['TENSORBOARD_DIR']} (tensorboard), {(self.out_dir / 'metrics.jsonl').resolve()}")
        print(f"[done] final policy (HF format): {export.resolve()}")
        return metrics
