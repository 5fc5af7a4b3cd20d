"""Streaming data stages on Ray Data: shards of a parquet input flow to engines and CPUs on every node.

A stage's work is a list of shards, row ranges [start, stop) of its input file. `run_shards` streams
the shards that have no output yet through a Ray Data `map_batches`: to a fixed pool of actors, one
generation engine each (`EngineActor`: vLLM, or transformers where vLLM is absent), or to CPU tasks
(grading). An actor holds one shard at a time and takes the next as soon as it is done, so there is no
barrier between shards and a slow shard delays only its own engine. Each shard's rows are written
atomically by the worker as `<folder>/part-<start>.parquet` (`dqo_verl.data.shards`) and only a one-row
summary (rows, tokens, busy seconds, node) comes back to the driver, which shows progress and never holds the
stage's rows.
A killed stage rerun skips the shards it has; Ray retries the work of a lost worker or node.
`combine_shards` then joins the shards into the stage's output file one shard at a time and checks the
row count. docs/design.md, "Streaming data stages".
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
from omegaconf import DictConfig
from ray.data import ActorPoolStrategy, DataContext
from tqdm import tqdm
from verl.utils.device import get_device_name

from dqo_verl.data.budget import check_budget, engine_config
from dqo_verl.data.io import ROW_GROUP_ROWS, write_json_atomic
from dqo_verl.data.shards import SHARD_GLOB, shard_path
from dqo_verl.data.trainset import ParquetRows
from dqo_verl.workers.groups import engines_per_node, init_ray
from dqo_verl.workers.rollout import ENGINES, engine_name, sampling_params


def run_on_engines(
    cfg: DictConfig, stage: str, actor: type, ranges: list[tuple[int, int]], folder: Path, unit: str, **kwargs
) -> StageReport:
    """Stream the missing shards of `ranges` through a pool of `actor`s, engines on policy.model.path
    (rollout.engines_per_node on each of trainer.nnodes); `kwargs` go to the actor with the rollout
    section and sampling parameters. Nothing starts (not even Ray) when every shard exists."""
    if all(shard_path(folder, start).exists() for start, _ in ranges):
        return StageReport()
    model = {"policy.model.path": cfg.policy.model.path}
    budget = check_budget(cfg, stage, ["data.max_prompt_length", "rollout.max_tokens"], model)
    init_ray(cfg)
    rollout = {**engine_config(cfg, budget), "engine": engine_name(cfg.rollout.backend)}
    # tp > 1: the engine's own Ray executor places its tp GPU workers; the actor needs none itself
    gpus = 1 if get_device_name() != "cpu" and rollout["tensor_parallel_size"] == 1 else 0
    engines = engines_per_node(cfg) * cfg.trainer.nnodes
    print(f"[{stage}] {len(ranges)} shards on {engines} {rollout['engine']} engine(s)")
    report = run_shards(
        actor,
        ranges,
        folder,
        desc=stage,
        unit=unit,
        actors=engines,
        num_gpus=gpus,
        fn_constructor_kwargs=dict(
            rollout=rollout, model=cfg.policy.model.path, params=sampling_params(cfg.rollout), **kwargs
        ),
    )
    print(f"[{stage}] {report.line()}")
    return report


# a pool that cannot start its engines (too few GPUs or CPUs on the cluster) fails after this long instead of waiting
ACTOR_START_TIMEOUT_S = 1800


def summary(units: int, tokens: int, t0: float, t1: float) -> dict[str, np.ndarray]:
    """The one-row batch a worker returns for a finished shard: its size in input rows, tokens generated or
    read, when its work began and ended (time.time(), writing excluded), and its node."""
    row = {"units": units, "tokens": tokens, "t0": t0, "t1": t1, "node": ray.get_runtime_context().get_node_id()}
    return {k: np.asarray([v]) for k, v in row.items()}


def read_shard(path: str | Path, start: int, stop: int):
    """Rows [start, stop) of a parquet file as a pandas frame (only the row groups they touch are decoded)."""
    rows = ParquetRows([Path(path)])
    return rows.take(np.arange(start, stop), rows.columns).to_pandas()


class EngineActor:
    """A Ray Data actor holding one generation engine (`rollout.backend`) on `model`."""

    def __init__(self, rollout: dict, model: str):
        self.engine = ENGINES[rollout["engine"]]({**rollout, "model": model}, 0)

    def generate(self, prompts: list[list[int]], seeds: list[int], params: dict, max_tokens=None) -> list[dict]:
        """One sample per request, in request order (the rollout group's interface)."""
        out = self.engine.generate(prompts, seeds, params, max_tokens)
        return [{k: out[k][i] for k in out} for i in range(len(prompts))]


def keep_layout(folder: Path, ranges: list[tuple[int, int]]) -> None:
    """Record the shard ranges in `folder`; shards of other ranges (another shard size) are deleted first."""
    folder.mkdir(parents=True, exist_ok=True)
    layout, wanted = folder / "ranges.json", [list(r) for r in ranges]
    if layout.exists() and json.loads(layout.read_text()) != wanted:
        old = list(folder.glob(SHARD_GLOB))
        print(f"[shards] {folder}: {len(old)} shards of another shard size deleted, starting over")
        for path in old:
            path.unlink()
    write_json_atomic(layout, wanted)


@dataclass
class StageReport:
    """What the workers of one run of a stage did: shards and tokens, time busy and the time window of the
    work (first start to last end), and shards per node."""

    workers: int = 1
    shards: int = 0
    units: int = 0
    tokens: int = 0
    busy_s: float = 0.0
    start: float = float("inf")
    end: float = float("-inf")
    nodes: Counter = field(default_factory=Counter)

    def add(self, row: dict) -> None:
        self.shards += 1
        self.units += int(row["units"])
        self.tokens += int(row["tokens"])
        self.busy_s += float(row["t1"]) - float(row["t0"])
        self.start, self.end = min(self.start, float(row["t0"])), max(self.end, float(row["t1"]))
        self.nodes[str(row["node"])] += 1

    @property
    def window_s(self) -> float:
        return max(self.end - self.start, 0.0)

    @property
    def busy_share(self) -> float:
        """Busy time over `workers` x the window: the share of engine time spent working (1.0: never idle)."""
        return self.busy_s / (self.workers * self.window_s) if self.window_s else 0.0

    def line(self) -> str:
        nodes = ", ".join(f"node {node[:8]}: {n}" for node, n in sorted(self.nodes.items()))
        return (
            f"{self.shards} shards ({nodes}); {self.workers} worker(s) busy {self.busy_share:.0%} "
            f"of {self.window_s:.1f} s, {self.tokens / max(self.window_s, 1e-9):.0f} tok/s"
        )


def run_shards(
    fn: Callable | type,
    ranges: list[tuple[int, int]],
    folder: Path,
    *,
    desc: str,
    unit: str,
    actors: int = 0,
    num_gpus: float = 0,
    tasks: int | None = None,
    fn_kwargs: dict | None = None,
    fn_constructor_kwargs: dict | None = None,
) -> StageReport:
    """Stream the shards of `ranges` that have no file in `folder` through `fn` (batch: one shard's start/stop).

    `actors` > 0: `fn` is a class, run by that many actors (each with `num_gpus`, else one CPU); 0: `fn` is
    a function, run as one-CPU tasks over the whole cluster (at most `tasks` at once; None: as many as fit).
    Progress counts input rows as `unit`s.
    """
    keep_layout(Path(folder), ranges)
    todo = [(a, b) for a, b in ranges if not shard_path(folder, a).exists()]
    done_rows = sum(b - a for a, b in ranges) - sum(b - a for a, b in todo)
    report = StageReport(workers=actors or tasks or 1)
    bar = tqdm(
        total=sum(b - a for a, b in ranges),
        initial=done_rows,
        desc=desc,
        unit=unit,
    )
    if not todo:
        bar.close()
        return report
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False  # ours counts rows, not blocks
    ctx.print_on_execution_start = False
    ctx.wait_for_min_actors_s = ACTOR_START_TIMEOUT_S
    work = ray.data.from_items([{"start": a, "stop": b} for a, b in todo], override_num_blocks=len(todo))
    options: dict = {"batch_size": 1, "fn_kwargs": {**(fn_kwargs or {}), "folder": str(folder)}}
    if actors:
        # one shard in flight per actor: a queued shard would wait behind a long one while another engine idles
        options["compute"] = ActorPoolStrategy(size=actors, max_tasks_in_flight_per_actor=1)
        options["fn_constructor_kwargs"] = fn_constructor_kwargs or {}
        options.update(num_gpus=num_gpus) if num_gpus else options.update(num_cpus=1)
    else:
        options.update(num_cpus=1, concurrency=tasks)
    for row in work.map_batches(fn, **options).iter_rows():
        report.add(row)
        bar.update(int(row["units"]))
        if report.tokens and report.window_s:
            bar.set_postfix(tok_s=f"{report.tokens / report.window_s:.0f}")
    bar.close()
    return report


def combine_shards(folder: Path, ranges: list[tuple[int, int]], out: Path, rows_per_unit: int = 1) -> int:
    """Join the shards of `ranges` into `out` in order, one shard in memory at a time (temp file, then rename).

    Every shard must hold exactly `rows_per_unit` rows per input row of its range; returns the row count."""
    paths = [shard_path(folder, a) for a, _ in ranges]
    for path, (a, b) in zip(paths, ranges):
        if not path.exists():
            raise RuntimeError(f"{path}: missing shard of rows {a}-{b}; rerun the stage")
        n, expected = pq.ParquetFile(path).metadata.num_rows, (b - a) * rows_per_unit
        if n != expected:
            raise RuntimeError(f"{path}: {n} rows for the {expected} of input rows {a}-{b}; delete it and rerun")
    schema = pa.unify_schemas([pq.read_schema(p).remove_metadata() for p in paths]) if paths else pa.schema([])
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        with pq.ParquetWriter(tmp, schema) as writer:
            for path in paths:
                table = pq.read_table(path).replace_schema_metadata(None)
                writer.write_table(table.select(schema.names).cast(schema), row_group_size=ROW_GROUP_ROWS)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return sum(b - a for a, b in ranges) * rows_per_unit


def mean_list_length(path: Path, column: str) -> float:
    """Mean length of a list column of a parquet file, read a batch at a time."""
    total = rows = 0
    for batch in pq.ParquetFile(path).iter_batches(columns=[column]):
        total += pc.sum(pc.list_value_length(batch.column(0))).as_py() or 0
        rows += batch.num_rows
    return total / max(rows, 1)
