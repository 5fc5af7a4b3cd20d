"""The pipeline runner: every stage of every recipe, declared once, run in order, redone when its inputs change.

    python -m dqo_verl.pipeline +recipe=NAME [key=value ...]        (make pipeline RECIPE=NAME)
        pipeline.stages=[corpus,score]   run these stages (make ... STAGES=corpus,score); a recipe lists its own
        pipeline.redo=corpus             remake this stage and every stage that depends on it (REDO=corpus; all)

A stage reads inputs (files, folders, model names) and writes outputs. Its fingerprint is a hash of the
config entries it reads and of its inputs: for an input that another stage makes, that stage's record of
its last run; for any other, the file's size and time (or the hub name). A stage's record,
`.stages/<stage>.json` beside its first output, keeps the fingerprint it was made with. A stage runs
when it has no record, when its fingerprint changed (the runner prints what changed, e.g.
`rollout.n: 16 -> 8`, or which input was remade), when an output is missing, or when `pipeline.redo`
asks; the stages that make its inputs come first. A stage killed midway resumes from its partial work
(corpus shards, checkpoints) when rerun with the same fingerprint, and starts over when it changed.
Outputs found without a record (made by hand, or by `python -m dqo_verl.main` under `ray job submit`)
are used as they are, with a note.

The recipes' main jobs are runs of this runner: `make demo` (recipe tiny_cpu), `make realism`
(realism_smollm2); `make prompts`, `make corpus`, ... run single stages of it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf

from dqo_verl.config.compose import entry_point
from dqo_verl.config.errors import InputError
from dqo_verl.config.plugins import STAGES, registered
from dqo_verl.config.stages import ORDER, Stage
from dqo_verl.data.io import write_json_atomic
from dqo_verl.workers.groups import WorkerLogs, ray_scope


def _abs(path: str) -> str:
    return os.path.abspath(os.path.expanduser(str(path)))


def _flat(value, prefix: str) -> dict:
    """{dotted key: leaf value} of a (nested) config value."""
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in _flat(item, f"{prefix}.{key}").items()} or {prefix: {}}
    return {prefix: value}


def config_values(cfg: DictConfig, keys: tuple[str, ...]) -> dict:
    """The resolved config entries `keys`, flattened to dotted keys (absent ones are None)."""
    out = {}
    for key in keys:
        value = OmegaConf.select(cfg, key, default=None)
        if isinstance(value, (DictConfig, ListConfig)):
            value = OmegaConf.to_container(value, resolve=True)
        out.update(_flat(value, key))
    return out


def file_stamp(path: str) -> str:
    """An input made outside the pipeline: size and time of a file, of every file in a folder, or the name itself."""
    p = Path(path).expanduser()
    if p.is_file():
        st = p.stat()
        return f"{st.st_size}:{st.st_mtime_ns}"
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file())
        return hashlib.sha1(
            "".join(f"{f.relative_to(p)}:{f.stat().st_size}:{f.stat().st_mtime_ns};" for f in files).encode()
        ).hexdigest()
    return f"name:{path}"


def _digest(obj) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class Plan:
    """The stages to consider, in order, and which stage makes which file."""

    stages: list[Stage]
    producer: dict[str, str] = field(default_factory=dict)  # absolute output path -> stage name


def registered_stages() -> tuple[Stage, ...]:
    """Every stage of `ORDER`, as its package registered it (entry points `dqo_verl.stages`)."""
    return tuple(registered(STAGES, name) for name in ORDER)


def make_plan(cfg: DictConfig, targets: list[str], stages: tuple[Stage, ...] | None = None) -> Plan:
    """`targets` and, transitively, the stages that make their inputs, in declaration order."""
    stages = registered_stages() if stages is None else stages
    by_name = {stage.name: stage for stage in stages}
    for name in targets:
        if name not in by_name:
            raise InputError(f"pipeline.stages: {name} is not one of: {', '.join(by_name)}")
        if not by_name[name].outputs(cfg):
            raise InputError(f"pipeline.stages: this recipe has no `{name}` stage (it configures no {name} section)")
    producer = {_abs(out): s.name for s in stages if s.outputs(cfg) for out in s.outputs(cfg)}
    wanted, todo = set(), list(targets)
    while todo:
        name = todo.pop()
        if name not in wanted:
            wanted.add(name)
            todo += [producer[_abs(i)] for i in by_name[name].inputs(cfg) if _abs(i) in producer]
    for name in wanted:  # a stage that reads what it writes would clear its own input before it runs
        own = {_abs(o) for o in by_name[name].outputs(cfg)} & {_abs(i) for i in by_name[name].inputs(cfg)}
        if own:
            raise InputError(
                f"pipeline: the {name} stage would overwrite its own input {sorted(own)[0]}; "
                f"give the {name} stage another output folder or give it a copy as input"
            )
    return Plan([s for s in stages if s.name in wanted], producer)


def dependents(plan: Plan, cfg: DictConfig, name: str) -> set[str]:
    """`name` and every planned stage that depends on it, directly or not."""
    out = {name}
    for stage in plan.stages:  # declaration order: a stage comes after what it reads
        if any(plan.producer.get(_abs(i)) in out for i in stage.inputs(cfg)):
            out.add(stage.name)
    return out


def stages_to_make(cfg: DictConfig, target: str) -> list[str]:
    """The stages `target` needs whose outputs are missing, in order (what to run before it)."""
    plan = make_plan(cfg, [target])
    return [s.name for s in plan.stages if s.name != target and not all(os.path.exists(out) for out in s.outputs(cfg))]


class Records:
    """`.stages/<stage>.json` beside a stage's first output."""

    @staticmethod
    def path(stage: Stage, cfg: DictConfig) -> Path:
        return Path(stage.outputs(cfg)[0]).parent / ".stages" / f"{stage.name}.json"

    @staticmethod
    def read(stage: Stage, cfg: DictConfig) -> dict | None:
        path = Records.path(stage, cfg)
        return json.loads(path.read_text()) if path.exists() else None

    @staticmethod
    def write(stage: Stage, cfg: DictConfig, record: dict) -> None:
        write_json_atomic(Records.path(stage, cfg), record)


def why_run(stage: Stage, cfg: DictConfig, record: dict | None, state: dict, forced: bool) -> str | None:
    """Why `stage` must run now, or None when it is up to date."""
    if forced:
        return f"pipeline.redo={cfg.pipeline.redo}"
    if record is None:
        return "no record of an earlier run"
    if record["fingerprint"] != state["fingerprint"]:
        changed = [
            f"{k}: {record['config'].get(k)} -> {v}" for k, v in state["config"].items() if record["config"].get(k) != v
        ]
        changed += [f"{k} (no longer set)" for k in record["config"] if k not in state["config"]]
        for path, stamp in state["inputs"].items():
            if record["inputs"].get(path) != stamp:
                maker = state["makers"].get(path)
                changed.append(f"input {path} was remade by `{maker}`" if maker else f"input {path} changed")
        return "; ".join(changed) or "its fingerprint changed"
    if record["status"] != "done":
        return "resuming an interrupted run"
    missing = [o for o in stage.outputs(cfg) if not Path(o).exists()]
    return f"output {missing[0]} is missing" if missing else None


def _remove(paths: list[str]) -> None:
    for path in paths:
        p = Path(path)
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def run_pipeline(cfg: DictConfig, stages: tuple[Stage, ...] | None = None) -> dict[str, float]:
    """Run the planned stages that are not up to date; returns the seconds each stage that ran took."""
    targets = list(cfg.pipeline.stages)
    plan = make_plan(cfg, targets, stages)
    redo = cfg.pipeline.redo
    if redo not in (None, "all") and redo not in [s.name for s in plan.stages]:
        raise InputError(
            f"pipeline.redo={redo} is not one of the stages this run plans: {', '.join(s.name for s in plan.stages)}"
        )
    for stage in plan.stages:  # every unknown choice stops the run here, before any stage (or Ray) starts
        stage.validate(cfg)
    forced = {s.name for s in plan.stages} if redo == "all" else dependents(plan, cfg, redo) if redo else set()
    print(f"[pipeline] stages: {' -> '.join(s.name for s in plan.stages)}")
    worker_logs = WorkerLogs()
    made: dict[str, str] = {}  # stage -> the id of its current outputs (what stages reading them depend on)
    seconds = {}
    for stage in plan.stages:
        outputs = stage.outputs(cfg)
        makers = {_abs(i): plan.producer[_abs(i)] for i in stage.inputs(cfg) if plan.producer.get(_abs(i)) in made}
        inputs = {_abs(i): made[makers[_abs(i)]] if _abs(i) in makers else file_stamp(i) for i in stage.inputs(cfg)}
        values = config_values(cfg, stage.keys)
        state = {"config": values, "inputs": inputs, "makers": makers, "fingerprint": _digest([values, inputs])}
        record = Records.read(stage, cfg)
        if record is None and stage.name not in forced and all(Path(o).exists() for o in outputs):
            print(
                f"[pipeline] {stage.name}: {outputs[0]} exists without a record (made outside the pipeline): "
                f"using it as is (pipeline.redo={stage.name} remakes it)"
            )
            made[stage.name] = _digest([file_stamp(o) for o in outputs])
            continue
        reason = why_run(stage, cfg, record, state, stage.name in forced)
        if reason is None:
            print(f"[pipeline] {stage.name}: up to date ({outputs[0]})")
            made[stage.name] = record["made"]
            continue
        if record is None or record["fingerprint"] != state["fingerprint"] or stage.name in forced:
            _remove(outputs + stage.partial(cfg))  # stale, or another run's: start over
        print(f"[pipeline] {stage.name}: running ({reason})")
        start = time.time()
        Records.write(
            stage,
            cfg,
            {"stage": stage.name, "status": "running", **{k: state[k] for k in ("fingerprint", "config", "inputs")}},
        )
        worker_logs.mark()
        try:
            stage.function()(cfg)
        finally:
            root = OmegaConf.select(cfg, "paths.root")
            log = worker_logs.copy(Path(root) / "logs" / f"{stage.name}.log") if root else None
            if log:
                print(f"[pipeline] {stage.name}: workers' output in {log}")
        seconds[stage.name] = time.time() - start
        made[stage.name] = _digest([state["fingerprint"], start])
        Records.write(
            stage,
            cfg,
            {
                "stage": stage.name,
                "status": "done",
                "made": made[stage.name],
                "seconds": round(seconds[stage.name], 1),
                **{k: state[k] for k in ("fingerprint", "config", "inputs")},
            },
        )
        print(f"[pipeline] {stage.name}: {seconds[stage.name]:.0f}s -> {', '.join(outputs)}")
    return seconds


def run(cfg: DictConfig) -> None:
    """`python -m dqo_verl.pipeline`: run the pipeline, then print the report (its last line ends the output)."""
    start = time.time()
    with ray_scope():
        seconds = run_pipeline(cfg)
    times = ", ".join(f"{name} {s:.0f}s" for name, s in seconds.items())
    print(
        f"[pipeline] finished in {time.time() - start:.0f}s ({times or 'nothing to do'}) under {Path(cfg.paths.root)}"
    )
    report_file = Path(cfg.paths.root) / "report.md"
    if "report" in cfg.pipeline.stages and report_file.exists():
        print(report_file.read_text().rstrip())


cli = entry_point(run)


def stage_command(name: str):
    """`python -m <stage module> +recipe=NAME ...`: the pipeline with `pipeline.stages=[name]`."""

    def run_stage(cfg: DictConfig) -> None:
        run(OmegaConf.merge(cfg, {"pipeline": {"stages": [name]}}))

    run_stage.__name__ = f"run_{name}"
    return entry_point(run_stage)


if __name__ == "__main__":
    cli()
