"""The driver: one process that owns an offline training run over Ray worker groups.

`Trainer` does what every offline method needs (docs/design.md, "Trainers"): it reads and checks the
corpus before any worker starts, starts the method's models in one colocated process per rank, fills
in reference log-probs (`ref_cache`), runs the updates in a seeded epoch order, checkpoints and resumes
exactly, logs through verl's `Tracking` and `metrics.jsonl`, stops on a failed worker or a non-finite
loss, and exports every model in HF format. A method (`methods.py`) supplies its models (`roles`), its
batches, the targets it computes between forward passes, and its losses.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf
from safetensors import safe_open
from tensordict import TensorDict
from tqdm import tqdm
from transformers import AutoConfig
from verl.utils import hf_tokenizer
from verl.utils import tensordict_utils as tu
from verl.utils.device import get_device_name
from verl.utils.metric import reduce_metrics
from verl.utils.tracking import Tracking
from verl.workers.utils.padding import left_right_2_no_padding, no_padding_2_padding

from dqo_verl.config.errors import InputError, RunError, check_choice
from dqo_verl.data.budget import check_budget
from dqo_verl.data.trainset import (
    CUT_RESPONSES,
    LARGE_ROW_GROUP,
    CorpusScan,
    ParquetRows,
    TrainSet,
    open_corpus,
    scan_corpus,
)
from dqo_verl.trainer import ref_cache
from dqo_verl.trainer.batches import BatchSpec, build_batch, epoch_batches
from dqo_verl.trainer.checkpoints import COMPLETE_MARKER, CheckpointDir, epoch_checkpoints
from dqo_verl.workers.groups import (
    Group,
    Role,
    make_resource_pool,
    pool_nodes,
    ranks,
    release,
    release_pool,
    start_groups,
    with_meta,
)

# what a forward pass of each verl model type returns per response token
OUTPUT_OF = {"language_model": "log_probs", "value_model": "values"}


def default_attn_implementation(device: str) -> str:
    """flash_attention_2 on CUDA when installed, else sdpa."""
    return "flash_attention_2" if device == "cuda" and importlib.util.find_spec("flash_attn") else "sdpa"


def vocab_size(paths: list[str]) -> int:
    """The smallest embedding size of the models at `paths`: every token id must be below it."""
    return min(AutoConfig.from_pretrained(p).vocab_size for p in dict.fromkeys(paths))


def load_corpus(config: DictConfig, required: tuple[str, ...], models: list[str]) -> tuple[ParquetRows, CorpusScan]:
    """Open and check (token ids against the models' vocabulary) the corpus and apply its length limits, in one
    streaming pass; prints what was cut. The rows stay on disk."""
    path = Path(config.data.train_files).expanduser()
    corpus = open_corpus(path)
    d = config.data
    cut = d.get("cut_responses") or "failure"
    check_choice("data.cut_responses", cut, CUT_RESPONSES)
    scan = scan_corpus(corpus, path, required, vocab_size(models), limits(config), cut)
    stats = scan.stats
    if stats.get("cut_by_sampler_dropped"):
        print(f"[data] {stats['cut_by_sampler_dropped']} responses cut at the sampler's length limit dropped")
    if stats["prompt_too_long_dropped"] or stats["response_too_long"]:
        print(
            f"[data] {stats['prompt_too_long_dropped']} rows dropped (prompt > {d.max_prompt_length} tokens); "
            f"{stats['response_too_long']} responses > {d.max_response_length} tokens ({d.overlong})"
        )
    if corpus.largest_group > LARGE_ROW_GROUP:
        print(
            f"[data] {path} has row groups of up to {corpus.largest_group} rows and each update decodes the row "
            "groups it draws from: rewrite it with smaller ones (pyarrow row_group_size) to keep memory down"
        )
    return corpus, scan


def limits(config: DictConfig) -> tuple[int, int, str]:
    d = config.data
    return d.max_prompt_length, d.max_response_length, d.overlong


def set_config_dtype_to_weights(model_dir: Path) -> None:
    """verl writes hf_model weights in the training dtype but labels config.json bfloat16, so a plain
    `from_pretrained` would downcast them; label the config with the dtype actually stored."""
    names = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
    shard = sorted(model_dir.glob("*.safetensors"))[0]
    with safe_open(shard, "pt") as f:
        stored = names.get(f.get_slice(next(iter(f.keys()))).get_dtype())
    config_path = model_dir / "config.json"
    config = json.loads(config_path.read_text())
    if stored and config.get("dtype") != stored:
        config["dtype"] = stored
        config_path.write_text(json.dumps(config, indent=2) + "\n")


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


class RunLog:
    """What a run reports: a progress bar, a short console line every `trainer.log_every` updates (`console` in
    `trainer.logger`), verl's `Tracking` for the other backends (tensorboard, wandb, mlflow) and metrics.jsonl."""

    SHORT = ("policy/loss", "value/loss", "policy/log_ratio_mean", "dqo/is_weight_clipped", "dqo/v_first_mean")

    def __init__(self, config: DictConfig, out_dir: Path, step: int, total_steps: int):
        tb_dir = Path(config.trainer.get("tensorboard_dir") or out_dir / "tensorboard")
        os.environ["TENSORBOARD_DIR"] = str(tb_dir.resolve())
        backends = list(config.trainer.logger)
        self.console = "console" in backends
        self.every = max(1, int(config.trainer.get("log_every") or 1))
        self.tracking = Tracking(
            project_name=config.trainer.project_name,
            experiment_name=config.trainer.experiment_name,
            default_backend=[b for b in backends if b != "console"],  # ours is the short line below
            config=OmegaConf.to_container(config, resolve=True),
        )
        self.out_dir, self.total = out_dir, total_steps
        self.steps = StepLog(out_dir / "metrics.jsonl", resume_step=step)
        self.name = config.algorithm.name.upper()
        self.bar = tqdm(total=total_steps, initial=step, desc=self.name, unit="step", dynamic_ncols=True)

    def update(
        self, step: int, epoch: int, index: int, batch: np.ndarray, rows: pd.DataFrame, metrics: dict, elapsed: float
    ) -> None:
        """Record update `step` (1-based) of `epoch`, batch `index`, that trained `batch` (row ids) in `elapsed` s."""
        tokens = int(rows["response_ids"].map(len).sum())
        metrics.update(
            {"perf/step_time_s": elapsed, "perf/response_tokens_per_s": tokens / elapsed, "train/epoch": epoch + 1}
        )
        self.tracking.log(data=metrics, step=step)
        self.steps.write({"step": step, "epoch": epoch, "batch": index, "rows_sha1": _rows_digest(batch), **metrics})
        self.bar.set_postfix(
            epoch=epoch + 1, tok_s=f"{tokens / elapsed:.0f}", loss=f"{metrics.get('policy/loss', math.nan):.4f}"
        )
        self.bar.update(1)
        if self.console and (step % self.every == 0 or step == self.total):
            shown = " ".join(f"{k} {metrics[k]:.4g}" for k in self.SHORT if k in metrics)
            self.say(f"[{self.name}] step {step}/{self.total} epoch {epoch + 1}: {shown} ({elapsed:.1f} s/update)")

    def say(self, line: str) -> None:
        """A console line that keeps the progress bar below it."""
        self.bar.write(line)

    def close(self, checkpoints: Path, exported: dict) -> None:
        self.bar.close()
        self.steps.close()
        self.tracking.finish()
        print(f"[done] checkpoints: {checkpoints.resolve()}")
        metrics_file = (self.out_dir / "metrics.jsonl").resolve()
        print(f"[done] logs: {os.environ['TENSORBOARD_DIR']} (tensorboard), {metrics_file}")
        for role, path in exported.items():
            print(f"[done] final {role} (HF format): {path.resolve()}")


def _rows_digest(rows: np.ndarray) -> str:
    return hashlib.sha1(np.asarray(rows, dtype=np.int64).tobytes()).hexdigest()[:16]


class Trainer:
    """An offline training run. Subclasses are the methods; see `methods.py`."""

    # what a method declares
    roles: ClassVar[dict[str, str]] = {"policy": "language_model"}  # role -> verl model type
    required_columns: ClassVar[tuple[str, ...]] = ("prompt_ids", "response_ids")
    uses_reference: ClassVar[bool] = False  # needs ref_logprobs in its batches
    unit_rows: ClassVar[int] = 1  # rows that stay together in one update (a DPO pair: 2)
    corpus_tag: ClassVar[str | None] = None  # names a method's own rows (`prepare_corpus`) in its reference cache

    def __init__(self, config: DictConfig):
        self.config = config
        self.device = get_device_name()
        self.out_dir = Path(config.trainer.output_dir)
        self.checkpoints = CheckpointDir(config.trainer.default_local_dir)
        self.sections = {role: self._section(role) for role in self.roles}
        models = [self.sections[r].model.path for r in self.roles] + ([config.ref.path] if self.uses_reference else [])
        keys = [f"{r}.model.path" for r in self.roles] + (["ref.path"] if self.uses_reference else [])
        budget = ["data.max_prompt_length", "data.max_response_length"]
        check_budget(config, f"{config.algorithm.name} training", budget, dict(zip(keys, models)))
        reader, scan = load_corpus(config, self.required_columns, models)
        units = self.prepare_corpus(scan.meta)
        rows = units.index.to_numpy()
        prompt_rows = units["prompt_row"].to_numpy() if "prompt_row" in units else rows
        # the corpus's own reference log-probs serve only its rows under their own prompts; else the cache's
        self.own_ref = scan.has_ref_logprobs and np.array_equal(rows, prompt_rows)
        columns = [c for c in reader.columns if c != "ref_logprobs" or (self.uses_reference and self.own_ref)]
        self.corpus = TrainSet(reader, rows, prompt_rows, limits(config), columns)
        self.corpus_path = Path(config.data.train_files).expanduser()

        self.batch_size = config.data.train_batch_size
        world = ranks(config)
        for role in self.roles:
            for key in ("micro_batch_size_per_gpu", "infer_micro_batch_size_per_gpu"):
                micro = self.sections[role].engine[key]
                if self.batch_size * self.unit_rows % (world * micro):
                    per = f" x {self.unit_rows} rows" if self.unit_rows > 1 else ""
                    raise InputError(
                        f"data.train_batch_size={self.batch_size}{per} must be a multiple of the {world} ranks x "
                        f"{role}.engine.{key}={micro}"
                    )
        self.steps_per_epoch = len(self.corpus) // self.unit_rows // self.batch_size
        if self.steps_per_epoch == 0:
            rows = f"{len(self.corpus)} rows"
            if self.unit_rows > 1:
                rows += f" ({len(self.corpus) // self.unit_rows} units of {self.unit_rows})"
            raise InputError(f"{self.corpus_path}: {rows}, fewer than data.train_batch_size={self.batch_size}")
        self.total_steps = self.steps_per_epoch * config.trainer.total_epochs
        if config.trainer.total_training_steps is not None:
            self.total_steps = min(self.total_steps, config.trainer.total_training_steps)
        self.export_epoch = config.trainer.get("export_epoch")
        if self.export_epoch is not None and not 1 <= self.export_epoch <= config.trainer.total_epochs:
            raise InputError(
                f"trainer.export_epoch={self.export_epoch} is not one of the run's epochs "
                f"(trainer.total_epochs={config.trainer.total_epochs})"
            )
        tokenizer = hf_tokenizer(self.sections["policy"].model.path if "policy" in self.roles else models[0])
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pool = None
        self.groups: dict[str, Group] = {}
        self.history: list[dict] = []
        self._epoch_order: tuple[int, list[np.ndarray]] = (-1, [])

    # ------------------------------------------------------------------ what a method supplies

    def loss_fn(self, role: str) -> Callable:
        """The verl loss function (`TrainingWorker.set_loss_fn`) of `role`."""
        raise NotImplementedError

    def prepare_corpus(self, corpus: pd.DataFrame) -> pd.DataFrame:
        """The rows the method trains on (units of `unit_rows` consecutive rows), chosen from the checked corpus's
        per-row numbers (`trainset.CorpusScan.meta`: index = corpus row; uid, score, lengths): the rows of the
        frame returned, in its order, each under the prompt of the corpus row in its `prompt_row` column if any."""
        return corpus

    def make_batch(self, rows: pd.DataFrame) -> TensorDict:
        """verl's left/right-padded batch of corpus rows, with whatever fields the method's losses read."""
        return build_batch(rows, BatchSpec(pad_token_id=self.pad_token_id))

    def update(self, td: TensorDict, step: int) -> dict:
        """One update on a batch (no-padding layout): forward passes and targets if any, then `train`."""
        return self.train({role: {} for role in self.roles}, td, step)

    # ------------------------------------------------------------------ worker groups

    def _section(self, role: str) -> DictConfig:
        """The role's config (verl's model / engine / optim sections), attention implementation filled in."""
        section = self.config[role]
        if section.model.override_config.get("attn_implementation") is None:
            attn = default_attn_implementation(self.device)
            section = OmegaConf.merge(section, {"model": {"override_config": {"attn_implementation": attn}}})
        return section

    def steps_per_update(self, role: str) -> int:
        """Optimizer steps of `role` per update (a method may step its value model more than once)."""
        return 1

    def start(self) -> None:
        """Start the pool and the method's groups, and fill in reference log-probs (idempotent)."""
        if self.groups:
            return
        c = self.config
        self.pool = make_resource_pool(c.trainer.nnodes, c.trainer.n_gpus_per_node, name="dqo")
        roles = {
            name: Role(
                model_type, self.sections[name], self.loss_fn(name), steps_per_update=self.steps_per_update(name)
            )
            for name, model_type in self.roles.items()
        }
        self.groups = start_groups(self.pool, roles, c.checkpoint, self.total_steps)
        if "value" in self.groups and c.value.get("zero_head", False):  # a resumed run loads its own head later
            self.groups["value"].call("zero_value_head").result("zeroing its head")
        nodes = pool_nodes(self.pool)
        print(f"[pool] {len(nodes)} ranks on {len(set(nodes))} node(s) ({self.device}); {', '.join(self.roles)} up")
        if self.uses_reference and not self.own_ref:
            reference = Role(
                "language_model",
                OmegaConf.merge(
                    self.sections["policy"],
                    {
                        "model": {"path": c.ref.path},
                        "engine": {"infer_micro_batch_size_per_gpu": c.ref.micro_batch_size_per_gpu},
                    },
                ),
                forward_only=True,
            )
            ref_cache.attach_ref_logprobs(
                self.corpus,
                self.corpus_path,
                c,
                self.pool,
                self.groups.get("policy"),
                reference,
                self.pad_token_id,
                self.corpus_tag,
            )

    def shutdown(self) -> None:
        """Release the worker groups and their placement groups."""
        release(g.worker_group for g in self.groups.values())
        self.groups = {}
        if self.pool is not None:
            release_pool(self.pool)
            self.pool = None

    def __enter__(self) -> Trainer:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    # ------------------------------------------------------------------ one update

    def forward(self, td: TensorDict, roles: tuple[str, ...], step: int) -> dict[str, torch.Tensor]:
        """Current per-token outputs ([B, T] padded) of `roles` on `td`, computed concurrently."""
        calls = {
            role: self.groups[role].call("infer_batch", with_meta(td, compute_loss=False, calculate_entropy=False))
            for role in roles
        }
        return {
            role: no_padding_2_padding(
                tu.get(call.result(f"at step {step + 1}"), OUTPUT_OF[self.roles[role]]), td
            ).float()
            for role, call in calls.items()
        }

    def train(self, fields: dict[str, dict], td: TensorDict, step: int, **meta) -> dict:
        """One optimizer step of each role in `fields` on `td` plus that role's fields; their metrics.

        `meta` (non-tensor entries) reaches every role's loss; a non-finite loss or gradient raises RunError.
        """
        update = dict(
            mini_batch_size=len(td),
            global_batch_size=len(td),
            epochs=1,
            seed=self.config.trainer.seed + step,
            dataloader_kwargs={"shuffle": False},
            **meta,
        )
        calls = {}
        for role, extra in fields.items():
            role_td = with_meta(td, **update)
            for key, value in extra.items():
                role_td[key] = value
            calls[role] = self.groups[role].call("train_mini_batch", role_td)
        metrics = {}
        for role, call in calls.items():
            values = {
                k: float(v) for k, v in reduce_metrics(tu.get(call.result(f"at step {step + 1}"), "metrics")).items()
            }
            for key in ("loss", "grad_norm"):
                if not math.isfinite(values.get(key, 0.0)):
                    raise RunError(
                        f"non-finite {role} {key.replace('_', ' ')} ({values[key]}) at step {step + 1}; "
                        "stopping without a checkpoint of this step"
                    )
            metrics.update({k if "/" in k else f"{role}/{k}": v for k, v in values.items()})
        return metrics

    def train_step(self, rows: pd.DataFrame, step: int) -> dict:
        """One update on `rows` (the groups must be started)."""
        return self.update(left_right_2_no_padding(self.make_batch(rows)), step)

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self, step: int) -> Path:
        """global_step_N/{<role>...,trainer_state.json}, atomically (see checkpoints.py); prunes old ones."""

        def write(folder: Path) -> None:
            for role, group in self.groups.items():
                group.save(str(folder / role), step)
            state = {"global_step": step, "steps_per_epoch": self.steps_per_epoch, "seed": self.config.trainer.seed}
            (folder / COMPLETE_MARKER).write_text(json.dumps(state, indent=2))

        path = self.checkpoints.save(step, write)
        self.checkpoints.prune(self.config.trainer.max_ckpt_to_keep)
        return path

    def load_checkpoint(self) -> int:
        """Restore every model and the data position per trainer.resume_mode; returns the global step."""
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
            raise ValueError(
                f"{path}: saved with {state['steps_per_epoch']} updates per epoch, now {self.steps_per_epoch}"
            )
        for role, group in self.groups.items():
            group.load(str(path / role))
        print(f"[resume] {path} (global step {state['global_step']})")
        return int(state["global_step"])

    def export(self, checkpoint: Path) -> dict[str, Path]:
        """Copy each model's HF copy (save_pretrained format) in `checkpoint` to <output_dir>/export/<role>."""
        exported = {}
        for role in self.roles:
            src, dst = checkpoint / role / "huggingface", self.out_dir / "export" / role
            tmp = dst.with_name(f".{role}.tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(src, tmp)
            set_config_dtype_to_weights(tmp)
            shutil.rmtree(dst, ignore_errors=True)
            os.rename(tmp, dst)
            exported[role] = dst
        return exported

    # ------------------------------------------------------------------ loop

    def batch_rows(self, step: int) -> np.ndarray:
        """The training rows of update `step` (0-based): the seeded order of its epoch."""
        epoch, index = divmod(step, self.steps_per_epoch)
        if self._epoch_order[0] != epoch:
            c = self.config
            order = epoch_batches(
                len(self.corpus), self.batch_size, c.trainer.seed, epoch, c.data.shuffle, self.unit_rows
            )
            self._epoch_order = (epoch, order)
        return self._epoch_order[1][index]

    def fit(self, stop: Callable[[int, Path], bool] | None = None, until: Callable[[int], bool] | None = None) -> dict:
        """Run all updates (resuming if configured), export the models; returns the last step's metrics.

        `stop(step, checkpoint)`, when given, is asked after every checkpoint whether to end the run there.
        `until(step)`, when given, is asked before every update (a resumed run first) whether the run has gone
        far enough; it then ends there, with a checkpoint of that step.
        """
        self.start()
        step = self.load_checkpoint()
        log = RunLog(self.config, self.out_dir, step, self.total_steps)
        metrics, exported, last_ckpt, saved = {}, {}, None, step
        prefetch = ThreadPoolExecutor(1, thread_name_prefix="rows")  # the next update's rows read during this one
        upcoming = prefetch.submit(self.corpus.read, self.batch_rows(step)) if step < self.total_steps else None
        while step < self.total_steps and not (until is not None and until(step)):
            epoch, index = divmod(step, self.steps_per_epoch)
            rows = upcoming.result()
            if step + 1 < self.total_steps:
                upcoming = prefetch.submit(self.corpus.read, self.batch_rows(step + 1))
            start = time.perf_counter()
            metrics = self.train_step(rows, step)
            step += 1
            log.update(step, epoch, index, self.batch_rows(step - 1), rows, metrics, time.perf_counter() - start)
            self.history.append(metrics)
            end_of_epoch = index == self.steps_per_epoch - 1
            if end_of_epoch or step == self.total_steps or self.save_due(step):
                last_ckpt, saved = self.save_checkpoint(step), step
                if end_of_epoch and epoch + 1 == self.export_epoch:
                    exported = self.export(last_ckpt)
                    log.say(f"[export] epoch {epoch + 1} (step {step}) -> {self.out_dir / 'export'} (export_epoch)")
                if stop is not None and stop(step, last_ckpt):
                    break
        prefetch.shutdown(cancel_futures=True)
        if saved != step:  # `until` ended the run between checkpoints
            last_ckpt = self.save_checkpoint(step)
        exported = exported or self.final_export(last_ckpt or self.checkpoints.latest() or self.save_checkpoint(step))
        log.close(self.checkpoints.root, exported)
        return metrics

    def save_due(self, step: int) -> bool:
        """Whether `trainer.save_freq` asks for a checkpoint after update `step` (epoch ends always save)."""
        save_freq = self.config.trainer.save_freq
        return bool(save_freq and save_freq > 0 and step % save_freq == 0)

    def final_export(self, last_ckpt: Path) -> dict:
        """The HF copies of the run's result: the last checkpoint's, or `trainer.export_epoch`'s when that epoch
        ended before a resume (or its checkpoint was pruned after it was exported)."""
        if self.export_epoch is None:
            return self.export(last_ckpt)
        chosen = epoch_checkpoints(self.checkpoints.root).get(self.export_epoch)
        if chosen is not None:
            return self.export(chosen)
        exported = {role: self.out_dir / "export" / role for role in self.roles}
        if not all(path.exists() for path in exported.values()):
            raise RunError(
                f"trainer.export_epoch={self.export_epoch}: no checkpoint of that epoch under {self.checkpoints.root}"
            )
        return exported
