"""`make iterate`: rounds of DQO, each on a fresh corpus sampled from the policy the last round trained.

    python -m dqo_verl.pipeline.iterate +recipe=NAME iterate.rounds=3 [iterate.reference=original|last] [key=value ...]
                                                                         (make iterate RECIPE=NAME ROUNDS=3)

Round 1 is the recipe's own pipeline (`make pipeline RECIPE=NAME`: whatever is up to date is reused, so after
`make demo` round 1 costs nothing). Round r > 1 runs, under `${iterate.out_dir}/round<r>/`, the stages corpus ->
score (-> process, when the recipe trains on process rewards) -> train -> eval through the pipeline runner:
the corpus is sampled from round r-1's exported policy on the recipe's prompts, and DQO continues from round
r-1's policy and value (fresh optimizer state), against the recipe's reference model (`iterate.reference=
original`) or round r-1's policy (`last`). Every round is evaluated like round 1 on the same test problems.
A killed run resumes where it stopped (each round is a pipeline run).

Writes `${iterate.out_dir}/table.md` and `table.csv` (a row per round: the corpus it trained on and the
accuracy of its policy; row 0 is the base) and `accuracy.png`.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure
from omegaconf import DictConfig, OmegaConf

from dqo_verl.config.compose import compose_config, entry_point, raw_overrides, with_command_line
from dqo_verl.config.errors import InputError
from dqo_verl.eval.metrics import models_and_names, out_dir
from dqo_verl.pipeline import runner as pipeline
from dqo_verl.workers.groups import ray_scope

# what evaluation keeps out of generated test sets (evaluate.seen_questions): every round gets round 1's copy
SHARED_DATA = ("prompts.parquet", "sft.parquet", "dev.parquet")

REFERENCES = ("original", "last")

STATS = ("responses", "right %", "prompts with a right answer %", "response tokens")


def share(src: Path, dst: Path) -> None:
    """`dst` becomes `src` (a hard link, else a copy), all at once; nothing to do if it already is that file."""
    if dst.exists() and os.path.samefile(src, dst):
        return
    tmp = dst.with_name(f".{dst.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def round_config(first: DictConfig, r: int) -> DictConfig:
    """Round `r`'s config (r > 1), checked: every stage it runs writes inside the round's folder, and it trains
    on the corpus it samples."""
    it = first.iterate
    cfg = compose_config(it.recipe, [*raw_overrides(it), *round_overrides(first, r, it.reference)])
    folder = (Path(it.out_dir) / f"round{r}").resolve()
    paths = [("train", "read", cfg.data.train_files)]
    for stage in pipeline.make_plan(cfg, list(cfg.pipeline.stages)).stages:
        if stage.name != "prompts":  # round 1's, shared
            paths += [(stage.name, "write", path) for path in [*stage.outputs(cfg), *stage.partial(cfg)]]
    for stage, verb, path in paths:
        if not Path(path).resolve().is_relative_to(folder):
            raise InputError(f"iterate round {r}: the {stage} stage would {verb} {path}, outside {folder}")
    return cfg


def round_stages(cfg: DictConfig) -> list[str]:
    """The stages of a round after the first."""
    return ["corpus", "score", *(["process"] if cfg.algorithm.use_process_rewards else []), "train", "eval"]


def round_overrides(first: DictConfig, r: int, reference: str) -> list[str]:
    """The overrides that make round `r` (> 1) of a recipe whose round 1 is `first` (a resolved config)."""
    if reference not in REFERENCES:
        raise InputError(f"iterate.reference={reference} is not one of {', '.join(REFERENCES)}")
    folder = Path(first.iterate.out_dir) / f"round{r}"
    previous = Path(first.trainer.output_dir) if r == 2 else Path(first.iterate.out_dir) / f"round{r - 1}" / "run"
    export = folder / "run" / "export"
    overrides = [
        # every file a round writes is in its folder, whatever the command line set for round 1
        f"paths.root={first.paths.root}",
        f"paths.data={folder / 'data'}",
        f"data.train_files={folder / 'data' / Path(first.data.train_files).name}",
        "data.ref_cache_dir=null",
        f"trainer.output_dir={folder / 'run'}",
        f"trainer.default_local_dir={folder / 'run' / 'checkpoints'}",
        "trainer.tensorboard_dir=null",
        f"trainer.experiment_name={first.trainer.experiment_name}_round{r}",
        f"policy.model.path={previous / 'export' / 'policy'}",
        f"value.model.path={previous / 'export' / 'value'}",
        # the value model continues: its head is the last round's, not a fresh one
        "value.zero_head=false",
        f"ref.path={first.ref.path if reference == 'original' else previous / 'export' / 'policy'}",
        # the models are the last round's: nothing to build or warm up
        "models.base=null",
        "models.value=null",
        "sft_stage=null",
        f"pipeline.stages=[{','.join(round_stages(first))}]",
        "pipeline.redo=null",
        f"evaluate.out_dir={folder / 'eval'}",
        f"evaluate.models=[{export / 'policy'}]",
        f"evaluate.names=['round {r}']",
        "evaluate.epochs=false",
    ]
    if first.evaluate.value.model:  # value-guided decodings with the round's own value model
        overrides.append(f"evaluate.value.model={export / 'value'}")
    return overrides


def corpus_stats(corpus: pd.DataFrame) -> dict:
    """Size and quality of a graded corpus: responses, right answers, prompts with one, mean response tokens."""
    right = corpus["score"] == 1
    values = (
        len(corpus),
        100 * right.mean(),
        100 * right.groupby(corpus["uid"]).any().mean(),
        corpus["response_ids"].map(len).mean(),
    )
    return dict(zip(STATS, values))


def accuracies(summary_file: Path, name: str) -> dict:
    """{column: accuracy %} of model `name` in an evaluation summary."""
    results = json.loads(summary_file.read_text())["results"]
    if name not in results:
        raise InputError(f"{summary_file}: no model {name!r} (models: {', '.join(results)})")
    return {column: 100 * cell["accuracy"] for column, cell in results[name].items()}


def first_round_names(first: DictConfig) -> tuple[str | None, str]:
    """The row labels of the base and of the trained policy in round 1's evaluation (base: None if absent)."""
    models, names = models_and_names(first)
    paths = [Path(m).resolve() for m in models]
    trained = (Path(first.trainer.output_dir) / "export" / "policy").resolve()
    if trained not in paths:
        raise InputError(
            f"evaluate.models={list(models)}: round 1's evaluation must include the trained policy {trained}"
        )
    base = Path(first.policy.model.path).resolve()
    return (names[paths.index(base)] if base in paths else None), names[paths.index(trained)]


def plot_rounds(table: pd.DataFrame, columns: list[str], out: Path) -> Path:
    """Accuracy per round, a line per evaluation column."""
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for column in columns:
        ax.plot(table["round"], table[column], marker="o", label=column)
    ax.set_xticks(table["round"])
    ax.set(xlabel="round (0 = base)", ylabel="accuracy (%)", title="Iterative DQO")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    return out


def run(cfg: DictConfig) -> pd.DataFrame:
    """`python -m dqo_verl.pipeline.iterate`: round 1 (the recipe's pipeline), then rounds 2..K, then the table."""
    it = cfg.iterate
    if it.rounds < 1:
        raise InputError(f"iterate.rounds={it.rounds}: at least 1")
    root = Path(it.out_dir)
    start = time.time()
    rows = []
    with ray_scope():
        stages = list(dict.fromkeys([*cfg.pipeline.stages, "train", "eval"]))
        first = OmegaConf.merge(cfg, {"pipeline": {"stages": stages}})
        base_name, trained_name = first_round_names(first)
        later = {r: round_config(first, r) for r in range(2, it.rounds + 1)}  # bad settings fail before any work
        print(f"[iterate] round 1/{it.rounds}: the recipe's pipeline ({time.time() - start:.0f}s so far)")
        pipeline.run_pipeline(first)
        summary = out_dir(first) / "summary.json"
        if base_name is not None:
            rows.append({"round": 0, "model": base_name, **accuracies(summary, base_name)})
        stats = corpus_stats(pd.read_parquet(first.data.train_files))
        rows.append({"round": 1, "model": trained_name, **stats, **accuracies(summary, trained_name)})
        for r in range(2, it.rounds + 1):
            print(f"[iterate] round {r}/{it.rounds} ({time.time() - start:.0f}s so far)")
            rcfg = later[r]
            data = Path(rcfg.paths.data)
            data.mkdir(parents=True, exist_ok=True)
            for name in SHARED_DATA:
                if (Path(first.paths.data) / name).exists():
                    share(Path(first.paths.data) / name, data / name)
            pipeline.run_pipeline(rcfg)
            rows.append(
                {
                    "round": r,
                    "model": f"round {r}",
                    **corpus_stats(pd.read_parquet(rcfg.data.train_files)),
                    **accuracies(out_dir(rcfg) / "summary.json", f"round {r}"),
                }
            )
    table = pd.DataFrame(rows)
    columns = [c for c in table.columns if c not in ("round", "model", *STATS)]
    root.mkdir(parents=True, exist_ok=True)
    table.to_csv(root / "table.csv", index=False)
    (root / "table.md").write_text(table.to_markdown(index=False, floatfmt=".1f") + "\n")
    plot_rounds(table, columns, root / "accuracy.png")
    print(table.to_markdown(index=False, floatfmt=".1f"))
    print(f"[iterate] {it.rounds} rounds in {time.time() - start:.0f}s -> {root} (table.md, table.csv, accuracy.png)")
    return table


def main(cfg: DictConfig) -> pd.DataFrame:
    """The command: the recipe's name and the command line's overrides go to every round's config."""
    return run(with_command_line(cfg, "iterate"))


cli = entry_point(main)

if __name__ == "__main__":
    cli()
