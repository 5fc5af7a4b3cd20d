"""`make compare`: the table and chart from crafted runs, and the orchestration of its runs."""

import json
from pathlib import Path

import pandas as pd
import pytest
from omegaconf import OmegaConf

from dqo_verl.config.compose import compose_config
from dqo_verl.config.errors import InputError
from dqo_verl.eval import harness as evaluate
from dqo_verl.pipeline import compare
from dqo_verl.pipeline import runner as pipeline
from dqo_verl.pipeline.compare import plot_bars, slug, table
from dqo_verl.trainer import job


def test_the_table_gives_mean_and_sample_std_over_seeds(tmp_path):
    runs = pd.DataFrame(
        [
            {"method": "base", "seed": None, "synthetic greedy": 0.5, "synthetic sample": 0.4},
            {"method": "DQO", "seed": 0, "synthetic greedy": 0.60, "synthetic sample": 0.50},
            {"method": "DQO", "seed": 1, "synthetic greedy": 0.62, "synthetic sample": 0.47},
            {"method": "DQO", "seed": 2, "synthetic greedy": 0.58, "synthetic sample": 0.53},
            {"method": "DQO, lambda 0.95", "seed": 0, "synthetic greedy": 0.55, "synthetic sample": 0.45},
        ]
    )
    out = table(runs, ["synthetic greedy", "synthetic sample"])
    assert list(out.index) == ["base", "DQO", "DQO, lambda 0.95"]
    assert out.loc["DQO", "synthetic greedy"] == "60.0 ± 2.0" and out.loc["DQO", "synthetic sample"] == "50.0 ± 3.0"
    assert out.loc["base", "synthetic greedy"] == "50.0" and out.loc["DQO", "seeds"] == 3
    assert plot_bars(runs, ["synthetic greedy"], tmp_path / "bars.png").read_bytes()[:4] == b"\x89PNG"
    assert slug("DQO + PS") == "dqo_ps" and slug("DQO, no IS on the value loss") == "dqo_no_is_on_the_value_loss"


def test_results_of_reads_accuracies_and_each_greedy_cut_share(tmp_path):
    summary = tmp_path / "summary.json"
    cells = {"synthetic greedy": {"accuracy": 0.6, "cut": 0.25}, "synthetic sample": {"accuracy": 0.5, "cut": 0.3}}
    summary.write_text(json.dumps({"results": {"synthetic": cells, "dev": {"dev greedy": {"accuracy": 0.4}}}}))
    assert compare.results_of(summary) == {
        "synthetic greedy": 0.6,
        "synthetic sample": 0.5,
        "synthetic greedy cut": 0.25,
        "dev greedy": 0.4,
        "dev greedy cut": 0.0,
    }


def test_compare_trains_every_row_once_with_its_method_settings_and_resumes(tmp_path, monkeypatch):
    """The orchestration of `make compare`, with the data stages, training and evaluation replaced by recorders
    (each is tested end to end elsewhere): one run per row and seed in its own folders, the method's settings,
    the ablations on the first seed, the base evaluated once, and a rerun that trains and evaluates nothing."""
    calls = {"stages": [], "train": [], "eval": []}

    def train(cfg):
        calls["train"].append(cfg)
        (Path(cfg.trainer.output_dir) / "export" / "policy").mkdir(parents=True)

    def evaluate_run(cfg):
        calls["eval"].append(cfg)
        seed = cfg.trainer.seed if cfg.evaluate.names != ["base"] else 0
        accuracy = 0.5 + 0.1 * seed + (0.2 if cfg.algorithm.name == "rs" else 0.0)
        out = Path(cfg.evaluate.out_dir)
        out.mkdir(parents=True)
        results = {"synthetic": {"synthetic greedy": {"accuracy": accuracy}}}
        (out / "summary.json").write_text(json.dumps({"results": results}))

    monkeypatch.setattr(pipeline, "run_pipeline", lambda cfg: calls["stages"].append(list(cfg.pipeline.stages)))
    monkeypatch.setattr(job, "train", train)
    monkeypatch.setattr(evaluate, "run", evaluate_run)
    root = tmp_path / "cmp"
    overrides = [f"paths.root={tmp_path}", f"compare.out_dir={root}", "compare.seeds=[1,2]"]
    cfg = OmegaConf.merge(
        compose_config("tiny_cpu", overrides),
        {"compare": {"recipe": "tiny_cpu", "overrides": overrides, "only": ["RS", "DQO", "DQO, lambda 0.95"]}},
    )
    out = compare.run(cfg)

    assert calls["stages"] == [["score", "process", "baselines"]]
    runs = [(c.algorithm.name, c.algorithm.lam, c.trainer.seed, c.trainer.output_dir) for c in calls["train"]]
    assert runs == [
        ("rs", 1.0, 1, str(root / "rs" / "seed1" / "run")),
        ("rs", 1.0, 2, str(root / "rs" / "seed2" / "run")),
        ("dqo", 1.0, 1, str(root / "dqo" / "seed1" / "run")),
        ("dqo", 1.0, 2, str(root / "dqo" / "seed2" / "run")),
        ("dqo", 0.95, 1, str(root / "dqo_lambda_0_95" / "seed1" / "run")),  # an ablation: the first seed only
    ]
    rs = calls["train"][0]
    assert rs.trainer.total_epochs == cfg.methods.rs.trainer.total_epochs  # the recipe's settings for RS
    base, *trained = calls["eval"]
    assert list(base.evaluate.models) == [cfg.policy.model.path] and str(base.evaluate.out_dir) == str(root / "base")
    for c in trained:
        assert list(c.evaluate.models) == [str(Path(c.trainer.output_dir) / "export" / "policy")]
    assert list(out.index) == ["base", "RS", "DQO", "DQO, lambda 0.95"]
    assert out.loc["RS", "synthetic greedy"] == "85.0 ± 7.1" and out.loc["DQO", "seeds"] == 2
    assert "One seed for the ablation rows (DQO, lambda 0.95)" in (root / "table.md").read_text()
    assert len(pd.read_csv(root / "runs.csv")) == 6 and (root / "bars.png").exists()

    calls["train"].clear(), calls["eval"].clear()
    again = compare.run(cfg)  # everything evaluated: only the table is made again
    assert calls["train"] == calls["eval"] == [] and again.equals(out)
    with pytest.raises(InputError, match="compare.only: no row 'PPO'"):
        compare.run(OmegaConf.merge(cfg, {"compare": {"only": ["PPO"]}}))


@pytest.mark.parametrize("recipe", ["tiny_cpu", "realism_smollm2"])
def test_every_row_of_a_recipe_composes_and_changes_the_run(recipe, tmp_path):
    """Each method and ablation row of a recipe's comparison makes a valid config that differs from plain DQO's."""
    cfg = compose_config(recipe, [f"paths.root={tmp_path}"])
    cfg = OmegaConf.merge(cfg, {"compare": {"recipe": recipe, "overrides": [f"paths.root={tmp_path}"]}})
    rows = {**cfg.compare.methods, **(cfg.compare.ablations or {})}
    configs = {
        label: OmegaConf.to_container(compare.run_config(cfg, list(o), tmp_path / "row", "row", 0), resolve=True)
        for label, o in rows.items()
    }
    assert "DQO" in configs and len(configs) >= 2
    same = [label for label, c in configs.items() if label != "DQO" and c == configs["DQO"]]
    assert same == [], f"rows that change nothing: {same}"
