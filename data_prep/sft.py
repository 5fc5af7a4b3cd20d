"""The `sft` stage: supervised fine-tuning of `sft.model` into `sft.out`, the recipe's policy.

The fine-tuning set is either a dataset of (problem, response) trajectories (`sft.data`, e.g. 4,096
random QwQ-LongCoT-Verified-130K trajectories: Qwen2.5-QwQ, the paper's policy for NuminaMath, §5.1)
or, without `sft.data`, gold solutions of the synthetic task (the embedded default's warm-up).
Trajectories longer than the context budget (data.max_prompt_length, data.max_response_length) are
dropped, with a count printed, never truncated. Training is the `sft` trainer: verl `TrainingWorker`
groups on the recipe's resource pool, loss on response tokens only, checkpoints and resume as any
training run, an HF export.

With `sft.target_accuracy` (the synthetic task only), a checkpoint every `sft.check_every` updates is
evaluated from update `sft.check_from` on, by greedy decoding of `sft.dev_problems` held-out problems
on the rollout worker group; the run stops at the first checkpoint reaching the target: a base that is
still learning, with right and wrong answers, where DQO gains most (docs/results.md).

With `sft.target_loss`, the run stops before the first update at which the mean training loss of the last
`sft.loss_window` updates is at or below it (`sft.steps` stays the cap). Every update's batch is fresh
problems, so that mean estimates the held-out loss: the run stops at a point of learning rather than at an update
count, which a thread count or a machine moves by hundreds of updates (docs/design.md, "The warm-up").

Writes `${paths.data}/sft.parquet` (the texts trained on), `sft_tokens.parquet`, `dev.parquet` (the
dev problems, which evaluation keeps out of its test sets) and the run under `sft.run_dir`.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
from omegaconf import DictConfig, OmegaConf
from verl.utils import hf_tokenizer

from data_prep import synthetic
from data_prep.sources import build_sft_set, synthetic_difficulty
from dqo_verl.config.errors import InputError
from dqo_verl.data.budget import check_budget, engine_config
from dqo_verl.data.chat import add_prompt_ids, chat_prompt
from dqo_verl.data.io import build_folder, read_jsonl, write_parquet_atomic
from dqo_verl.eval.sampling import greedy_accuracy
from dqo_verl.trainer.methods import SFTTrainer
from dqo_verl.workers.groups import engines_per_node, init_ray
from dqo_verl.workers.rollout import RolloutGroup

# the warm-up's problems and dev problems are drawn with these offsets from sft.seed
PROBLEMS_SEED, DEV_SEED = 1000, 2000


# sft_stage.loss_window's default: updates in the loss target's mean
LOSS_WINDOW = 50


def loss_reached(losses: list[float], target: float, window: int) -> bool:
    """Whether the mean of the last `window` training losses is at or below `target`."""
    return len(losses) >= window and sum(losses[-window:]) / window <= target


class LossTarget:
    """`until` for `Trainer.fit`: whether the warm-up's mean loss over its last `window` updates has reached `target`.

    It reads the losses of a resumed run's earlier updates from its metrics.jsonl, and this process's from the
    trainer's `history`, so a resumed run stops where an uninterrupted one would.
    """

    def __init__(self, target: float, window: int, run_dir: Path, history: list[dict]):
        self.target, self.window, self.run_dir, self.history = target, window, run_dir, history
        self.earlier: list[float] | None = None

    def __call__(self, step: int) -> bool:
        if self.earlier is None:  # asked first at the step the run starts (or resumes) from: its last window
            records = sorted(read_jsonl(self.run_dir / "metrics.jsonl"), key=lambda r: r["step"])
            self.earlier = [r["policy/loss"] for r in records if r["step"] <= step][-self.window :]
        recent = [h["policy/loss"] for h in self.history[-self.window :]]
        if not loss_reached(self.earlier + recent, self.target, self.window):
            return False
        print(f"\n[sft] step {step}: mean loss of the last {self.window} updates <= {self.target}: stopping")
        return True


def trainer_config(cfg: DictConfig, train_file: Path) -> DictConfig:
    """The `sft` trainer's config: the recipe's, with the fine-tuning's model, data, schedule and run folder."""
    s = cfg.sft_stage
    checks = s.get("target_accuracy") is not None
    return OmegaConf.merge(
        cfg,
        {
            "algorithm": {"name": "sft"},
            "data": {"train_files": str(train_file), "train_batch_size": s.batch_size, "shuffle": True},
            "policy": {
                "model": {"path": s.model},
                "optim": {
                    "lr": s.lr,
                    "lr_warmup_steps": s.warmup_steps,
                    "lr_scheduler_type": s.get("lr_scheduler", "constant"),
                },
            },
            "trainer": {
                "experiment_name": f"{cfg.trainer.experiment_name}_sft",
                "output_dir": s.run_dir,
                "total_epochs": s.get("epochs", 1),
                "total_training_steps": s.get("steps"),
                "save_freq": s.check_every if checks else s.get("save_freq", -1),
                "max_ckpt_to_keep": 1,  # resuming needs the newest only
                "export_epoch": None,
                "seed": s.seed,
                "logger": [name for name in cfg.trainer.logger if name != "console"],  # the progress bar says enough
            },
        },
    )


def tokenize(texts: pd.DataFrame, tokenizer) -> pd.DataFrame:
    """prompt_ids (the chat template of the user turn) and response_ids (the response + eos) of each text row."""
    return pd.DataFrame(
        {
            "prompt_ids": [chat_prompt(tokenizer, p[0]["content"]) for p in texts["prompt"]],
            "response_ids": [tokenizer(r)["input_ids"] + [tokenizer.eos_token_id] for r in texts["response"]],
        }
    )


def within_budget(texts: pd.DataFrame, tokens: pd.DataFrame, cfg: DictConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The rows whose prompt and response fit data.max_prompt_length / max_response_length; prints what was dropped."""
    d = cfg.data
    long_prompt = tokens["prompt_ids"].map(len) > d.max_prompt_length
    long_response = tokens["response_ids"].map(len) > d.max_response_length
    keep = ~(long_prompt | long_response)
    if not keep.all():
        print(
            f"[sft] {int((~keep).sum())} of {len(keep)} trajectories dropped as longer than the budget "
            f"({int(long_prompt.sum())} prompts > data.max_prompt_length={d.max_prompt_length}, "
            f"{int(long_response.sum())} responses > data.max_response_length={d.max_response_length} tokens)"
        )
    if not keep.any():
        raise InputError(f"sft.data: no trajectory of {cfg.sft_stage.data.path} fits the budget (see above)")
    return texts[keep].reset_index(drop=True), tokens[keep].reset_index(drop=True)


def synthetic_texts(problems: list[dict]) -> pd.DataFrame:
    """(prompt, response) rows of synthetic problems: the question as the user turn, the gold solution."""
    return pd.DataFrame(
        {
            "prompt": [[{"role": "user", "content": p["question"]}] for p in problems],
            "response": [p["solution"] for p in problems],
        }
    )


def fine_tuning_set(cfg: DictConfig, tokenizer) -> tuple[pd.DataFrame, pd.DataFrame, list[dict]]:
    """(texts, tokens, dev problems): `sft.data`'s trajectories, or the synthetic task's problems and dev set."""
    s = cfg.sft_stage
    if s.get("data"):
        d = s.data
        texts = build_sft_set(
            d.path, d.n, d.get("seed", 0), d.get("problem_key", "problem"), d.get("response_key", "qwq")
        )
        return *within_budget(texts, tokenize(texts, tokenizer), cfg), []
    difficulty = synthetic_difficulty(cfg.dataset.get("difficulty"))
    problems = synthetic.make_problems(
        s.problems or s.steps * s.batch_size, seed=s.seed + PROBLEMS_SEED, difficulty=difficulty
    )
    dev = []
    if s.get("target_accuracy") is not None:
        exclude = {p["question"] for p in problems}
        dev = synthetic.make_problems(s.dev_problems, seed=s.seed + DEV_SEED, difficulty=difficulty, exclude=exclude)
    texts = synthetic_texts(problems)
    return *within_budget(texts, tokenize(texts, tokenizer), cfg), dev


def run(cfg: DictConfig) -> Path:
    """The `sft` stage."""
    s = cfg.sft_stage
    if s.get("data") and s.get("target_accuracy") is not None:
        raise InputError("sft.target_accuracy: the dev checks use the synthetic task; unset it when sft.data is set")
    window = s.get("loss_window", LOSS_WINDOW)
    if s.get("target_loss") is not None and window < 1:
        raise InputError(f"sft.loss_window: {window}; the loss target needs a window of at least 1 update")
    check_budget(cfg, "sft", ["data.max_prompt_length", "data.max_response_length"], {"sft.model": s.model})
    data = Path(cfg.paths.data)
    tokenizer = hf_tokenizer(s.model)
    texts, tokens, dev = fine_tuning_set(cfg, tokenizer)
    write_parquet_atomic(texts, data / "sft.parquet")
    train_file = data / "sft_tokens.parquet"
    write_parquet_atomic(tokens, train_file)
    lengths = tokens["response_ids"].map(len)
    print(f"[sft] {len(tokens)} trajectories, responses {lengths.mean():.0f} tokens on average (max {lengths.max()})")
    if dev:
        write_parquet_atomic(synthetic_texts(dev), data / "dev.parquet")  # evaluation keeps these out
    dev_prompts = add_prompt_ids(pd.DataFrame(synthetic.to_rows(dev, "dev")), tokenizer) if dev else None

    init_ray(cfg)
    checker: list[RolloutGroup] = []  # started at the first check, reloaded at the next ones
    budget = cfg.data.max_prompt_length + cfg.evaluate.max_tokens

    def reached_target(step: int, checkpoint: Path) -> bool:
        if dev_prompts is None or step < s.check_from or step >= s.steps:
            return False
        model = str(checkpoint / "policy" / "huggingface")
        if checker:
            checker[0].load(model)
        else:
            checker.append(RolloutGroup(engine_config(cfg, budget), model, cfg.trainer.nnodes, engines_per_node(cfg)))
        accuracy = greedy_accuracy(checker[0], dev_prompts, cfg.evaluate.max_tokens, cfg.score.workers)
        target = s.target_accuracy
        print(f"\n[sft] step {step}: greedy accuracy {accuracy:.3f} on {len(dev)} dev problems (target {target})")
        return accuracy >= s.target_accuracy

    trainer = SFTTrainer(trainer_config(cfg, train_file))
    until = None
    if s.get("target_loss") is not None:
        until = LossTarget(s.target_loss, window, Path(s.run_dir), trainer.history)
    try:
        trainer.fit(stop=reached_target, until=until)
    finally:
        trainer.shutdown()
        if checker:
            checker[0].shutdown()
    losses = [h["policy/loss"] for h in trainer.history]
    if losses:
        print(f"[sft] loss {losses[0]:.3f} -> {losses[-1]:.3f} over {len(losses)} steps")
    exported = Path(s.run_dir) / "export" / "policy"
    return build_folder(Path(s.out), lambda tmp: shutil.copytree(exported, tmp))


if __name__ == "__main__":  # `python -m data_prep.sft +recipe=NAME`: this stage (and what it needs) alone
    from dqo_verl.pipeline.runner import stage_command

    stage_command("sft")()
