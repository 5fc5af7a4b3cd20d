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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf

from dqo_verl import baselines, corpus, evaluate, models, process, prompts, report, sft
from dqo_verl.cli import InputError, entry_point
from dqo_verl.data import write_json_atomic
from dqo_verl.trainers import TRAINERS, make_trainer
from dqo_verl.workers import init_ray, ray_scope

# what a corpus depends on in the rollout section (not engine counts, cache sizes or shard sizes)
SAMPLING = (
    "rollout.backend",
    "rollout.dtype",
    "rollout.temperature",
    "rollout.top_p",
    "rollout.top_k",
    "rollout.min_p",
    "rollout.max_tokens",
    "rollout.seed",
)
TRAINING = (
    "algorithm",
    "data",
    "policy",
    "value",
    "ref",
    "checkpoint",
    "trainer.total_epochs",
    "trainer.total_training_steps",
    "trainer.critic_warmup",
    "trainer.seed",
    "trainer.nnodes",
    "trainer.n_gpus_per_node",
)


def _data(cfg: DictConfig, *names: str) -> list[str]:
    return [str(Path(cfg.paths.data) / name) for name in names]


def _run_dir(cfg: DictConfig, *names: str) -> list[str]:
    return [str(Path(cfg.trainer.output_dir) / name) for name in names]


def _sft_texts(cfg: DictConfig) -> list[str]:
    """The sft stage's text files that evaluation keeps out of generated test sets."""
    sft = cfg.sft
    return (
        _data(cfg, "sft.parquet", *(["dev.parquet"] if sft.get("target_accuracy") is not None else [])) if sft else []
    )


def _generated_eval_sets(cfg: DictConfig) -> bool:
    return any(name in ("synthetic", "reasoning_gym") for name in cfg.evaluate.sets)


def _value_models(cfg: DictConfig) -> list[str]:
    """The models value-guided evaluation reads: the value model, and Q's reference when ranking by Q."""
    v = cfg.evaluate.value
    if not v.model:
        return []
    return [v.model, *([v.reference or cfg.ref.path] if "q" in v.by else [])]


def train(cfg: DictConfig) -> dict:
    """The `train` stage (`python -m dqo_verl.main`): `algorithm.name` on `data.train_files`; the last metrics."""
    trainer = make_trainer(cfg)  # bad input fails here, before Ray or any worker starts
    init_ray(cfg)
    try:
        return trainer.fit()
    finally:
        trainer.shutdown()


@dataclass(frozen=True)
class Stage:
    """One stage: what it runs, reads, writes and depends on; `outputs` is empty when a recipe lacks the stage."""

    name: str
    run: Callable[[DictConfig], object]
    outputs: Callable[[DictConfig], list[str]]
    inputs: Callable[[DictConfig], list[str]] = lambda cfg: []
    keys: tuple[str, ...] = ()  # config entries the result depends on
    partial: Callable[[DictConfig], list[str]] = lambda cfg: []  # resumable work of an interrupted run


STAGES: tuple[Stage, ...] = (
    Stage("base", models.base, outputs=lambda c: [c.models.base.out] if c.models.base else [], keys=("models.base",)),
    Stage(
        "sft",
        sft.run,
        outputs=lambda c: [c.sft.out, *_sft_texts(c), *_data(c, "sft_tokens.parquet")] if c.sft else [],
        inputs=lambda c: [c.sft.model] + ([c.sft.data.path] if c.sft.get("data") else []),
        keys=(
            "sft",
            "dataset.difficulty",
            "policy.model",
            "policy.engine",
            "policy.optim",
            "checkpoint",
            "data.max_prompt_length",
            "data.max_response_length",
            "trainer.nnodes",
            "trainer.n_gpus_per_node",
            "rollout.backend",
            "rollout.dtype",
            "evaluate.max_tokens",
        ),
        partial=lambda c: [c.sft.run_dir],
    ),
    Stage(
        "value",
        models.value,
        outputs=lambda c: [c.models.value.out] if c.models.value else [],
        inputs=lambda c: [c.models.value.source],
        keys=("models.value",),
    ),
    Stage(
        "prompts",
        prompts.prepare,
        outputs=lambda c: _data(c, "prompts.parquet"),
        inputs=lambda c: [c.policy.model.path],
        keys=("dataset", "data.max_prompt_length"),
    ),
    Stage(
        "corpus",
        corpus.run,
        outputs=lambda c: _data(c, "samples.parquet"),
        inputs=lambda c: [*_data(c, "prompts.parquet"), c.policy.model.path],
        keys=("rollout.n", *SAMPLING),
        partial=lambda c: _data(c, "samples_shards"),
    ),
    Stage(
        "score",
        corpus.score,
        outputs=lambda c: _data(c, "corpus.parquet"),
        inputs=lambda c: _data(c, "samples.parquet"),
        partial=lambda c: _data(c, "corpus_shards"),
    ),
    Stage(
        "process",
        process.run,
        outputs=lambda c: _data(c, "corpus_ps.parquet", "process_stats.json", "process_prefix.png"),
        inputs=lambda c: [*_data(c, "corpus.parquet"), c.policy.model.path],
        keys=(
            "process.strategy",
            "process.k",
            "process.separator",
            "process.max_segments",
            "process.segment_reward",
            "process.reward_correct_responses",
            "data.max_prompt_length",
            "data.max_response_length",
            *SAMPLING,
        ),
        partial=lambda c: _data(c, "process_shards"),
    ),
    Stage(
        "baselines",
        baselines.run,
        outputs=lambda c: _data(c, *(f"baselines/{name}.parquet" for name in ("sft", "rs", "dpo", "kto"))),
        inputs=lambda c: [*_data(c, "corpus.parquet", "prompts.parquet"), c.policy.model.path],
        keys=("trainer.seed",),
    ),
    Stage(
        "train",
        train,
        outputs=lambda c: _run_dir(c, *(f"export/{role}" for role in TRAINERS[c.algorithm.name].roles)),
        inputs=lambda c: [c.data.train_files, c.policy.model.path, c.value.model.path, c.ref.path],
        keys=TRAINING,
        partial=lambda c: [c.trainer.default_local_dir, *_run_dir(c, "metrics.jsonl", "tensorboard")],
    ),
    Stage(
        "eval",
        evaluate.run,
        outputs=lambda c: [
            str(evaluate.out_dir(c) / n) for n in ("summary.json", "table.md", "table.csv", "samples.parquet")
        ],
        inputs=lambda c: [
            *evaluate.models_and_names(c)[0],
            *(_data(c, "prompts.parquet") + _sft_texts(c) if _generated_eval_sets(c) else []),
            *_value_models(c),
        ],
        keys=(
            "evaluate",
            "rollout.backend",
            "rollout.dtype",
            "data.max_prompt_length",
            "trainer.seed",
            "algorithm.beta",  # Q's
        ),
    ),
    Stage(
        "report",
        report.run,
        outputs=lambda c: (
            [str(Path(c.paths.root) / "report.md")]
            + ([str(Path(c.paths.root) / "value_curves.png")] if c.report.value_curves else [])
        ),
        inputs=lambda c: (
            [str(evaluate.out_dir(c) / "summary.json")] + (_run_dir(c, "export/value") if c.report.value_curves else [])
        ),
        keys=("report",),
    ),
)


# ---------------------------------------------------------------------------------------------- fingerprints


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


def make_plan(cfg: DictConfig, targets: list[str], stages: tuple[Stage, ...] = STAGES) -> Plan:
    """`targets` and, transitively, the stages that make their inputs, in declaration order."""
    by_name = {stage.name: stage for stage in stages}
    for name in targets:
        if name not in by_name:
            raise InputError(f"pipeline.stages: unknown stage {name!r} (stages: {', '.join(by_name)})")
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


# ---------------------------------------------------------------------------------------------- the runner


def run_pipeline(cfg: DictConfig, stages: tuple[Stage, ...] = STAGES) -> dict[str, float]:
    """Run the planned stages that are not up to date; returns the seconds each stage that ran took."""
    targets = list(cfg.pipeline.stages)
    plan = make_plan(cfg, targets, stages)
    redo = cfg.pipeline.redo
    if redo not in (None, "all") and redo not in [s.name for s in plan.stages]:
        raise InputError(
            f"pipeline.redo={redo} is not one of the stages this run plans: {', '.join(s.name for s in plan.stages)}"
        )
    forced = {s.name for s in plan.stages} if redo == "all" else dependents(plan, cfg, redo) if redo else set()
    print(f"[pipeline] stages: {' -> '.join(s.name for s in plan.stages)}")
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
        stage.run(cfg)
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

if __name__ == "__main__":
    cli()
