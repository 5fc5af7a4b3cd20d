"""`make compare`: every method trained on one corpus with the same budget, evaluated the same way (paper Table 3).

    python -m dqo_verl.pipeline.compare +recipe=NAME [compare.seeds=[0,1,2]] [key=value ...]  (make compare)

The recipe's data stages run first through the pipeline runner (corpus, score, process scores, baseline
sets; whatever is up to date is reused). Then each row of `compare.methods` (SFT, RS, DPO, KTO, DRO, DQO,
DQO + process scores) is trained with each seed of `compare.seeds`, and each row of `compare.ablations`
(lambda, importance weights, granularity) with the first seed, every run with the recipe's settings for
its method (`methods.<name>`) plus the row's overrides. Every trained policy and the base are evaluated
with the evaluation harness. Runs live under `${compare.out_dir}/<row>/seed<N>/` and are skipped when
already evaluated, so a killed comparison resumes.

Writes `${compare.out_dir}/table.md` (rows = methods, columns = each evaluation set's greedy and
sampled accuracy and the share of greedy answers cut at the length limit, mean ± sample std over seeds),
`table.csv`, `runs.csv` (every run) and `bars.png`.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from omegaconf import DictConfig, OmegaConf

from dqo_verl.config.compose import compose_config, entry_point, raw_overrides, with_command_line
from dqo_verl.config.errors import InputError
from dqo_verl.eval import harness as evaluate
from dqo_verl.pipeline import runner as pipeline
from dqo_verl.trainer import job
from dqo_verl.workers.groups import ray_scope


def slug(label: str) -> str:
    """A folder name for a row label."""
    return re.sub(r"[^a-z0-9]+", "_", label.lower()).strip("_")


def run_config(cfg: DictConfig, overrides: list[str], folder: Path, label: str, seed: int) -> DictConfig:
    """The config of one run: the recipe with the command line's and the row's overrides, its own folders."""
    return compose_config(
        cfg.compare.recipe,
        [
            *raw_overrides(cfg.compare),
            *overrides,
            f"trainer.seed={seed}",
            f"trainer.output_dir={folder / 'run'}",
            f"evaluate.out_dir={folder / 'eval'}",
            f"evaluate.models=[{folder / 'run' / 'export' / 'policy'}]",
            f"evaluate.names=['{label}']",
            "evaluate.epochs=false",
        ],
    )


CUT = " cut"  # the suffix of a column holding the share of greedy answers cut at the length limit


def results_of(summary_file: Path) -> dict:
    """{column: accuracy} of the one model in an evaluation summary, and each greedy column's cut share."""
    results = json.loads(summary_file.read_text())["results"]
    out = {}
    for cell_set in results.values():
        for column, cell in cell_set.items():
            out[column] = cell["accuracy"]
            if column.endswith(" greedy"):
                out[column + CUT] = cell.get("cut", 0.0)  # summaries written before cut shares were recorded: 0
    return out


def train_and_evaluate(cfg: DictConfig) -> dict:
    """Train (unless exported) and evaluate (unless evaluated) one run; its {column: accuracy}."""
    summary = Path(cfg.evaluate.out_dir) / "summary.json"
    if not summary.exists():
        if not (Path(cfg.trainer.output_dir) / "export" / "policy").exists():
            job.train(cfg)
        evaluate.run(cfg)
    return results_of(summary)


def table(runs: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """Rows = methods (in run order), cells = mean ± sample std over seeds (in %), with the seed count."""
    rows = {}
    for label, group in runs.groupby("method", sort=False):
        cells = {}
        for column in columns:
            values = 100 * group[column].to_numpy(dtype=float)
            std = values.std(ddof=1) if len(values) > 1 else float("nan")
            cells[column] = f"{values.mean():.1f}" + (f" ± {std:.1f}" if len(values) > 1 else "")
        cells["seeds"] = len(group)
        rows[label] = cells
    return pd.DataFrame(rows).T


def plot_bars(runs: pd.DataFrame, columns: list[str], out: Path) -> Path:
    """One group of bars per method (mean over seeds, error bar = std), a bar per column."""
    stats = runs.groupby("method", sort=False)[columns].agg(["mean", "std"]) * 100
    methods = list(stats.index)
    fig = Figure(figsize=(max(6, 1.1 * len(methods)), 4))
    ax = fig.subplots()
    width = 0.8 / len(columns)
    x = np.arange(len(methods))
    for i, column in enumerate(columns):
        ax.bar(
            x + i * width,
            stats[(column, "mean")],
            width,
            yerr=stats[(column, "std")].fillna(0),
            capsize=3,
            label=column,
        )
    ax.set_xticks(x + width * (len(columns) - 1) / 2, methods, rotation=30, ha="right")
    ax.set(ylabel="accuracy (%)", title="Methods on one corpus (mean ± std over seeds)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    return out


def run(cfg: DictConfig) -> pd.DataFrame:
    """`python -m dqo_verl.pipeline.compare`: the shared stages, every run, the table."""
    c = cfg.compare
    if not c.methods:
        raise InputError("compare.methods is empty")
    root = Path(c.out_dir)
    start = time.time()
    with ray_scope():
        pipeline.run_pipeline(OmegaConf.merge(cfg, {"pipeline": {"stages": list(c.stages), "redo": None}}))
        base = compose_config(
            c.recipe,
            [
                *raw_overrides(c),
                f"evaluate.out_dir={root / 'base'}",
                f"evaluate.models=[{cfg.policy.model.path}]",
                "evaluate.names=[base]",
                "evaluate.epochs=false",
            ],
        )
        if not (root / "base" / "summary.json").exists():
            evaluate.run(base)
        records = [{"method": "base", "seed": None, **results_of(root / "base" / "summary.json")}]
        plan = [(label, list(o), seed) for label, o in c.methods.items() for seed in c.seeds]
        plan += [(label, list(o), c.seeds[0]) for label, o in (c.ablations or {}).items()]
        if c.only:
            known = [label for label, _, _ in plan]
            unknown = [label for label in c.only if label not in known]
            if unknown:
                raise InputError(f"compare.only: no row {unknown[0]!r} (rows: {', '.join(dict.fromkeys(known))})")
            plan = [run for run in plan if run[0] in c.only]
        for i, (label, overrides, seed) in enumerate(plan):
            folder = root / slug(label) / f"seed{seed}"
            print(f"[compare] run {i + 1}/{len(plan)}: {label}, seed {seed} ({time.time() - start:.0f}s so far)")
            results = train_and_evaluate(run_config(cfg, overrides, folder, label, seed))
            records.append({"method": label, "seed": seed, **results})
    runs = pd.DataFrame(records)
    columns = [col for col in runs.columns if col not in ("method", "seed")]
    out = table(runs, columns)
    root.mkdir(parents=True, exist_ok=True)
    runs.to_csv(root / "runs.csv", index=False)
    out.to_csv(root / "table.csv")
    ablations = ", ".join(label for label in c.ablations or {} if label in runs["method"].values)
    note = f"\nOne seed for the ablation rows ({ablations}); the others over seeds {list(c.seeds)}.\n"
    (root / "table.md").write_text(out.to_markdown() + "\n" + (note if ablations else ""))
    plot_bars(runs, [col for col in columns if not col.endswith(CUT)], root / "bars.png")
    print(out.to_markdown())
    print(
        f"[compare] {len(plan)} runs in {time.time() - start:.0f}s -> {root} (table.md, table.csv, runs.csv, bars.png)"
    )
    return out


def main(cfg: DictConfig) -> pd.DataFrame:
    """The command: the recipe's name and the command line's overrides go to every run's config."""
    return run(with_command_line(cfg, "compare"))


cli = entry_point(main)

if __name__ == "__main__":
    cli()
