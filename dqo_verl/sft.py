"""The `sft` stage: supervised fine-tuning of a base model, stopped while it is still learning.

The embedded default's warm-up: `sft.model` is fine-tuned on gold solutions of the synthetic task with
the `sft` trainer (verl `TrainingWorker` groups, response tokens only). A checkpoint every
`sft.check_every` updates is evaluated, from update `sft.check_from` on, by greedy decoding of
`sft.dev_problems` held-out problems on the rollout worker group; the run stops at the first
checkpoint whose accuracy reaches `sft.target_accuracy`, which becomes `sft.out`. DQO gains most on a
base that is still learning, with both right and wrong answers (docs/results.md).

Writes `${paths.data}/sft.parquet` and `dev.parquet` (the warm-up's problems, which evaluation keeps
out of its test sets) and the run itself under `sft.run_dir` (checkpoints, metrics.jsonl).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
from omegaconf import DictConfig, OmegaConf
from verl.utils import hf_tokenizer

from dqo_verl import synthetic
from dqo_verl.data import write_parquet_atomic
from dqo_verl.evaluate import greedy_accuracy
from dqo_verl.models import build_folder
from dqo_verl.prompts import add_prompt_ids, chat_prompt, synthetic_difficulty
from dqo_verl.rollout import RolloutGroup
from dqo_verl.trainers import SFTTrainer
from dqo_verl.workers import engines_per_node, init_ray

# the warm-up's problems and dev problems are drawn with these offsets from sft.seed
PROBLEMS_SEED, DEV_SEED = 1000, 2000


def trainer_config(cfg: DictConfig, train_file: Path) -> DictConfig:
    """The `sft` trainer's config: the recipe's, with the warm-up's model, data, schedule and run folder."""
    s = cfg.sft
    return OmegaConf.merge(
        cfg,
        {
            "algorithm": {"name": "sft"},
            "data": {"train_files": str(train_file), "train_batch_size": s.batch_size, "shuffle": True},
            "policy": {
                "model": {"path": s.model},
                "optim": {"lr": s.lr, "lr_warmup_steps": s.warmup_steps, "lr_scheduler_type": "constant"},
            },
            "trainer": {
                "experiment_name": f"{cfg.trainer.experiment_name}_sft",
                "output_dir": s.run_dir,
                "total_epochs": 1,
                "total_training_steps": s.steps,
                "save_freq": s.check_every,
                "max_ckpt_to_keep": 1,
                "seed": s.seed,
                "logger": [name for name in cfg.trainer.logger if name != "console"],  # the progress bar says enough
            },
        },
    )


def run(cfg: DictConfig) -> Path:
    """The `sft` stage."""
    s = cfg.sft
    data = Path(cfg.paths.data)
    tokenizer = hf_tokenizer(s.model)
    difficulty = synthetic_difficulty(cfg.dataset.get("difficulty"))
    problems = synthetic.make_problems(
        s.problems or s.steps * s.batch_size, seed=s.seed + PROBLEMS_SEED, difficulty=difficulty
    )
    dev = synthetic.make_problems(
        s.dev_problems, seed=s.seed + DEV_SEED, difficulty=difficulty, exclude={p["question"] for p in problems}
    )
    for name, rows in (("sft", problems), ("dev", dev)):  # evaluation keeps these out of its test sets
        texts = {
            "prompt": [[{"role": "user", "content": p["question"]}] for p in rows],
            "response": [p["solution"] for p in rows],
        }
        write_parquet_atomic(pd.DataFrame(texts), data / f"{name}.parquet")
    train_file = data / "sft_tokens.parquet"
    tokens = {
        "prompt_ids": [chat_prompt(tokenizer, p["question"]) for p in problems],
        "response_ids": [tokenizer(p["solution"])["input_ids"] + [tokenizer.eos_token_id] for p in problems],
    }
    write_parquet_atomic(pd.DataFrame(tokens), train_file)
    dev_prompts = add_prompt_ids(pd.DataFrame(synthetic.to_rows(dev, "dev")), tokenizer)

    init_ray(cfg)
    checker: list[RolloutGroup] = []  # started at the first check, reloaded at the next ones

    def reached_target(step: int, checkpoint: Path) -> bool:
        if step < s.check_from or step >= s.steps:
            return False
        model = str(checkpoint / "policy" / "huggingface")
        if checker:
            checker[0].load(model)
        else:
            rollout = {
                **OmegaConf.to_container(cfg.rollout, resolve=True),
                "max_model_len": cfg.data.max_prompt_length + cfg.evaluate.max_tokens,
            }
            checker.append(RolloutGroup(rollout, model, cfg.trainer.nnodes, engines_per_node(cfg)))
        accuracy = greedy_accuracy(checker[0], dev_prompts, cfg.evaluate.max_tokens, cfg.score.workers)
        target = s.target_accuracy
        print(f"\n[sft] step {step}: greedy accuracy {accuracy:.3f} on {len(dev)} dev problems (target {target})")
        return accuracy >= s.target_accuracy

    trainer = SFTTrainer(trainer_config(cfg, train_file))
    try:
        trainer.fit(stop=reached_target)
    finally:
        trainer.shutdown()
        if checker:
            checker[0].shutdown()
    losses = [h["policy/loss"] for h in trainer.history]
    if losses:
        print(f"[sft] loss {losses[0]:.3f} -> {losses[-1]:.3f} over {len(losses)} steps")
    exported = Path(s.run_dir) / "export" / "policy"
    return build_folder(Path(s.out), lambda tmp: shutil.copytree(exported, tmp))
