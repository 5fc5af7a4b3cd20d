"""Hydra config: base + recipe composition, command-line overrides, `--cfg job`."""

import sys

import yaml
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from dqo_verl import main
from dqo_verl.config.compose import RECIPES_DIR, compose_config, register_recipes
from dqo_verl.pipeline.runner import make_plan


def test_recipes_are_registered():
    names = register_recipes()
    assert "tiny_cpu" in names
    assert sorted(names) == sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def test_tiny_recipe_composes_over_base_with_overrides():
    assert compose_config("tiny_cpu").algorithm.beta == 0.1  # the recipe's own (our choice, docs/results.md)
    # realism_smollm2 composes over tiny_cpu but measured its beta on its own corpus: the file sets it, so a change
    # of tiny_cpu's beta cannot move it (docs/results.md)
    realism = yaml.safe_load((RECIPES_DIR / "realism_smollm2.yaml").read_text())
    assert realism["algorithm"]["beta"] == compose_config("realism_smollm2").algorithm.beta == 0.1
    cfg = compose_config("tiny_cpu", ["algorithm.beta=0.2", "paths.assets=/x"])
    assert cfg.algorithm.beta == 0.2 and cfg.algorithm.lam == 1.0  # override, base default
    assert cfg.data.train_files == "outputs/tiny_cpu/data/corpus.parquet"
    assert cfg.policy.model.path == "/x/policy" and cfg.value.model.path == "/x/value"
    assert cfg.policy.engine.strategy == "fsdp2" and cfg.value.engine.strategy == "fsdp2"
    assert cfg.policy.optim._target_ == "verl.workers.config.FSDPOptimizerConfig"  # verl's own config groups
    assert cfg.trainer.n_gpus_per_node == 2 and cfg.trainer.experiment_name == "tiny_cpu"
    assert cfg.trainer.default_local_dir == "outputs/tiny_cpu/run/checkpoints"
    assert "hf_model" in cfg.checkpoint.save_contents


def test_cfg_job_prints_the_composed_config(monkeypatch, capsys):
    """`python -m dqo_verl.main +recipe=tiny_cpu key=value --cfg job`, run in this process."""
    argv = ["dqo_verl.main", "+recipe=tiny_cpu", "algorithm.granularity=sequence", "--cfg", "job"]
    monkeypatch.setattr(sys, "argv", argv)
    previous = HydraConfig.instance().cfg
    try:
        main.main()
    finally:  # Hydra's state, which the command sets, would leak into later tests
        HydraConfig.instance().cfg = previous
        GlobalHydra.instance().clear()
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["algorithm"]["granularity"] == "sequence"
    assert cfg["policy"]["optim"]["lr"] == 2e-5 and cfg["value"]["optim"]["lr"] == 3e-4


PAPER = {
    "qwen_numina": ("outputs/qwen_numina/assets/qwen2.5-qwq", 5e-7, 3072, "AI-MO/NuminaMath-CoT"),  # the SFT export
    "qwen2_gsm8k": ("Qwen/Qwen2-7B-Instruct", 5e-7, 1024, "openai/gsm8k"),
    "qwen2_math": ("Qwen/Qwen2-7B-Instruct", 5e-7, 2048, "DigitalLearningGmbH/MATH-lighteval"),
    "gemma_gsm8k": ("google/gemma-1.1-7b-it", 1e-7, 1024, "openai/gsm8k"),
    "gemma_math": ("google/gemma-1.1-7b-it", 1e-7, 2048, "DigitalLearningGmbH/MATH-lighteval"),
}


def test_paper_recipes_follow_appendix_a2():
    for name, (model, policy_lr, max_response, dataset) in PAPER.items():
        for variant in (name, f"{name}_ps"):
            cfg = compose_config(variant)
            a = cfg.algorithm
            assert (a.beta, a.lam, a.is_log_clip) == (0.03, 1.0, 1.0), variant
            assert a.is_policy is None and a.is_value is None  # the method's own: DQO's weights on both (Table 6)
            assert a.name == "dqo" and a.granularity is None  # DQO's own: token actions
            assert a.use_process_rewards == variant.endswith("_ps")
            assert cfg.policy.model.path == model and cfg.value.model.path == model
            assert cfg.policy.optim.lr == policy_lr and cfg.value.optim.lr == 5e-6
            assert cfg.data.train_batch_size == 256 and cfg.data.max_response_length == max_response
            assert cfg.data.train_batch_size // (cfg.trainer.nnodes * cfg.trainer.n_gpus_per_node) == 32
            assert (cfg.trainer.nnodes, cfg.trainer.n_gpus_per_node) == (1, 8)
            assert cfg.trainer.total_epochs == 5 and cfg.trainer.save_freq == -1  # a checkpoint per epoch
            assert cfg.trainer.export_epoch == (1 if name == "qwen_numina" else 2)  # the paper's reported checkpoint
            assert cfg.dataset.path == dataset
            assert cfg.trainer.experiment_name == variant
            assert (cfg.process.strategy, cfg.process.max_segments, cfg.process.k) == ("linear", None, 20)  # paper A.1
            corpus = "corpus_ps.parquet" if variant.endswith("_ps") else "corpus.parquet"
            assert cfg.data.train_files == f"outputs/{name}/data/{corpus}"  # _ps reuses its base recipe's corpus


def test_qwen_numina_takes_the_papers_olympiad_problems():
    for variant in ("qwen_numina", "qwen_numina_ps"):
        d = compose_config(variant).dataset
        assert (d.name, list(d.sources), d.limit) == ("numina", ["olympiads"], 8919)  # paper Table 8
    assert compose_config("qwen2_math").dataset.sources is None
    d = compose_config("qwen_numina").data
    assert d.max_prompt_length + d.max_response_length == 4096  # paper Figure 3: Qwen2.5-Math-7B's context


def test_qwen_numina_makes_qwen25_qwq_and_starts_every_model_from_it():
    cfg = OmegaConf.to_container(compose_config("qwen_numina"), resolve=True)
    s = cfg["sft_stage"]
    assert s["model"] == "Qwen/Qwen2.5-Math-7B" and s["out"] == "outputs/qwen_numina/assets/qwen2.5-qwq"  # paper §5.1
    assert (s["data"]["path"], s["data"]["n"], s["data"]["response_key"]) == (
        "qingy2024/QwQ-LongCoT-Verified-130K",
        4096,
        "qwq",
    )
    assert (s["lr"], s["batch_size"], s["epochs"]) == (2e-5, 64, 3)  # A.2's SFT baseline for Qwen (our choice)
    assert cfg["policy"]["model"]["path"] == cfg["value"]["model"]["path"] == cfg["ref"]["path"] == s["out"]
    assert cfg["evaluate"]["models"][0] == s["out"]  # evaluation's base row is Qwen2.5-QwQ
    plan = make_plan(compose_config("qwen_numina"), ["eval"])
    assert [s.name for s in plan.stages] == ["sft", "prompts", "corpus", "score", "train", "eval"]
    mine = compose_config("qwen_numina", ["policy.model.path=/models/mine"])  # a model of one's own: no sft
    assert [s.name for s in make_plan(mine, ["eval"]).stages] == ["prompts", "corpus", "score", "train", "eval"]


def test_paper_recipe_paths_are_overridable():
    for name in ("qwen_numina", "gemma_math_ps"):
        cfg = OmegaConf.to_container(compose_config(name, ["policy.model.path=/models/mine"]), resolve=True)
        assert cfg["policy"]["model"]["path"] == "/models/mine"
        assert cfg["value"]["model"]["path"] == "/models/mine"  # the value model follows the policy
        assert cfg["ref"]["path"] == "/models/mine" and cfg["evaluate"]["models"][0] == "/models/mine"
        assert cfg["trainer"]["experiment_name"] == name


def test_baselines_take_the_papers_settings_per_model_family_and_the_command_line_wins():
    dpo = compose_config("qwen2_gsm8k", ["algorithm.name=dpo"])
    assert (dpo.algorithm.beta, dpo.policy.optim.lr, dpo.data.train_batch_size, dpo.trainer.total_epochs) == (
        0.1,
        1e-7,
        64,
        1,
    )  # paper A.2
    assert (
        dpo.trainer.output_dir == "outputs/qwen2_gsm8k/run_dpo"
        and dpo.evaluate.out_dir == "outputs/qwen2_gsm8k/eval_dpo"
    )
    assert dpo.evaluate.models[1] == "outputs/qwen2_gsm8k/run_dpo/export/policy"
    lr = {
        (recipe, method): compose_config(recipe, [f"algorithm.name={method}"]).policy.optim.lr
        for recipe in ("qwen2_math", "qwen_numina", "gemma_gsm8k")
        for method in ("sft", "rs", "kto")
    }
    assert lr == {
        ("qwen2_math", "sft"): 2e-5,
        ("qwen2_math", "rs"): 2e-5,
        ("qwen2_math", "kto"): 1e-7,
        ("qwen_numina", "sft"): 2e-5,
        ("qwen_numina", "rs"): 2e-5,
        ("qwen_numina", "kto"): 1e-7,
        ("gemma_gsm8k", "sft"): 5e-6,
        ("gemma_gsm8k", "rs"): 1e-6,
        ("gemma_gsm8k", "kto"): 5e-8,
    }
    sft = compose_config("gemma_math", ["algorithm.name=sft"])
    assert sft.data.train_files == "outputs/gemma_math/data/baselines/sft.parquet" and sft.trainer.total_epochs == 3
    assert compose_config("qwen2_gsm8k", ["algorithm.name=dro"]).trainer.export_epoch == 1
    mine = compose_config("qwen2_gsm8k", ["algorithm.name=dpo", "policy.optim.lr=3e-7", "data.train_batch_size=128"])
    assert (mine.policy.optim.lr, mine.data.train_batch_size, mine.algorithm.beta) == (3e-7, 128, 0.1)
    dqo = compose_config("qwen2_gsm8k")
    assert (dqo.policy.optim.lr, dqo.data.train_batch_size, dqo.trainer.output_dir) == (
        5e-7,
        256,
        "outputs/qwen2_gsm8k/run",
    )
    assert compose_config("tiny_cpu", ["algorithm.name=dpo"]).policy.optim.lr == 2e-5  # a recipe without methods
