"""`make demo`: the embedded default, end to end on a CPU, building everything it needs.

Stages, all under `--root` (default outputs/tiny_cpu); each writes its output atomically and is
skipped when the output exists (`--redo` starts over):
  1. base     tiny random Qwen2 + character tokenizer                        assets/base
  2. sft      warm-up on gold solutions of the synthetic task, until greedy    assets/policy
              accuracy on 200 dev problems reaches --sft-target
  3. value    value model = policy backbone + seeded score head               assets/value
  4. prompts  synthetic prompts (`make prompts`)                              data/prompts.parquet
  5. corpus   N samples per prompt on the rollout worker group (`make corpus`) data/samples.parquet
  6. score    graded 1/0 (`make score`)                                       data/corpus.parquet
  7. process  process scores from prefix completions (`make process`)         data/corpus_ps.parquet
  8. train    the main job: python -m dqo_verl.main +recipe=tiny_cpu          run/
  9. eval     base vs DQO on held-out problems, greedy and 5 sampling seeds   eval/
 10. values   V after each segment of a few test answers                      value_curves.png
The last line is `demo: greedy accuracy base=... dqo=... (n=... test problems)`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
from omegaconf import DictConfig, OmegaConf

from dqo_verl import synthetic
from dqo_verl.data import write_parquet_atomic
from dqo_verl.main import compose_config

RECIPE = "tiny_cpu"
SFT_SEED = 1000
DEV_SEED = 2000
SFT_STEPS = 1600


def greedy_accuracy(model_dir: Path, problems: list[dict], max_new_tokens: int = 128, batch_size: int = 100) -> float:
    """Greedy accuracy of an HF model on synthetic problems (transformers generate in this process)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from data_prep.prompts import chat_prompt
    from dqo_verl.grading import grade

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    pad = tokenizer.pad_token_id
    right = 0.0
    for i in range(0, len(problems), batch_size):
        chunk = problems[i : i + batch_size]
        prompts = [chat_prompt(tokenizer, p["question"]) for p in chunk]
        width = max(map(len, prompts))
        ids = torch.tensor([[pad] * (width - len(x)) + x for x in prompts])
        with torch.no_grad():
            out = model.generate(ids, attention_mask=(ids != pad).long(), max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
        texts = tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
        right += sum(grade(t, p["answer"], synthetic.DATA_SOURCE)["score"] for t, p in zip(texts, chunk))
    return right / len(problems)


def stage_sft(cfg: DictConfig, base: Path, out: Path, args) -> None:
    import ray
    from transformers import AutoTokenizer

    from data_prep.prompts import chat_prompt, synthetic_difficulty
    from dqo_verl.sft import run_sft
    from dqo_verl.trainer import init_ray

    tokenizer = AutoTokenizer.from_pretrained(base)
    difficulty = synthetic_difficulty(cfg.dataset.get("difficulty"))
    problems = synthetic.make_problems(args.sft_problems or args.sft_steps * args.sft_batch_size, seed=args.seed + SFT_SEED,
                                       difficulty=difficulty)
    dev = synthetic.make_problems(args.dev_problems, seed=args.seed + DEV_SEED, difficulty=difficulty,
                                  exclude={p["question"] for p in problems})
    for name, rows in (("sft", problems), ("dev", dev)):  # evaluation keeps these out of its test set
        write_parquet_atomic(pd.DataFrame({"prompt": [[{"role": "user", "content": p["question"]}] for p in rows],
                                           "response": [p["solution"] for p in rows]}), Path(cfg.paths.data) / f"{name}.parquet")
    rows = pd.DataFrame(
        {
            "prompt_ids": [chat_prompt(tokenizer, p["question"]) for p in problems],
            "response_ids": [tokenizer(p["solution"])["input_ids"] + [tokenizer.eos_token_id] for p in problems],
        }
    )
    # constant lr: the warm-up stops while the model is still learning fast, where DQO's extra signal shows most
    role = OmegaConf.merge(cfg.policy, {"model": {"path": str(base)}, "optim": {
        "lr": args.sft_lr, "lr_warmup_steps": 50, "lr_scheduler_type": "constant"}})

    def in_band(model_dir: Path, step: int) -> bool:
        accuracy = greedy_accuracy(model_dir, dev)
        print(f"\n[sft] step {step}: greedy accuracy {accuracy:.3f} on {len(dev)} dev problems (target {args.sft_target})")
        return accuracy >= args.sft_target

    init_ray(cfg)
    losses = run_sft(
        rows, role, cfg.checkpoint, out, steps=args.sft_steps, batch_size=args.sft_batch_size,
        pad_token_id=tokenizer.pad_token_id, nnodes=1, n_gpus_per_node=cfg.trainer.n_gpus_per_node, seed=args.seed,
        check_every=args.sft_check_every, check_from=args.sft_check_from, done=in_band,
    )
    ray.shutdown()
    print(f"[sft] loss {losses[0]:.3f} -> {losses[-1]:.3f} over {len(losses)} steps")


def build_models(cfg: DictConfig, assets: Path, args, stage: "Stages") -> None:
    """Stages 1-3: the tiny base model, its SFT warm-up, the value model (what `make tiny-model` runs)."""
    from dqo_verl.tiny_model import build_tiny_policy, build_value_model

    base, policy, value = assets / "base", assets / "policy", assets / "value"
    stage("base model", base, lambda tmp: build_tiny_policy(tmp, seed=args.seed), build_folder=True)
    stage("sft warm-up", policy, lambda tmp: stage_sft(cfg, base, tmp, args), build_folder=True)
    stage("value model", value, lambda tmp: build_value_model(policy, tmp, seed=args.seed), build_folder=True)


def in_process(fn, cfg: DictConfig):
    """Run a data stage in this process, then stop the Ray it started."""
    import ray

    try:
        return fn(cfg)
    finally:
        if ray.is_initialized():
            ray.shutdown()


def value_curves(cfg: DictConfig, out: Path, per_kind: int = 2) -> Path:
    """V after each segment of a few of the DQO policy's greedy test answers (right and wrong), one PNG."""
    import torch
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    from dqo_verl.checkpoints import CheckpointDir
    from dqo_verl.inspect_values import plot, segment_values

    value_dir = CheckpointDir(cfg.trainer.default_local_dir).latest() / "value" / "huggingface"
    tokenizer = AutoTokenizer.from_pretrained(value_dir)
    model = AutoModelForTokenClassification.from_pretrained(value_dir, dtype=torch.float32).eval()
    samples = pd.read_parquet(Path(cfg.evaluate.out_dir) / "samples.parquet")
    greedy = samples[(samples["model"] == "dqo") & (samples["decoding"] == "greedy")]
    curves = {}
    for score, kind in ((1.0, "right"), (0.0, "wrong")):
        for _, row in greedy[greedy["score"] == score].head(per_kind).iterrows():
            prompt_ids = tokenizer.apply_chat_template([{"role": "user", "content": row["prompt"]}], add_generation_prompt=True,
                                                       tokenize=True)["input_ids"]
            response_ids = tokenizer(row["response"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            df = segment_values(model, tokenizer, prompt_ids, response_ids)
            curves[f"test {row['uid']} ({kind})"] = df
            print(f"\n[values] test problem {row['uid']} ({kind} answer):")
            print(df.assign(text=df["text"].str.replace("\n", "\\n")).to_string(index=False))
    plot(curves, out)
    return out


class Stages:
    """Runs named stages once: a stage whose output exists is skipped (reruns reuse finished work)."""

    def __init__(self, tag: str):
        self.tag = tag

    def __call__(self, name: str, output: Path, fn, build_folder: bool = False) -> None:
        """Run `fn` unless `output` exists; with build_folder, fn(tmp) fills a folder renamed to output."""
        if output.exists():
            print(f"[{self.tag}] {name}: done already ({output})")
            return
        start = time.time()
        print(f"[{self.tag}] {name} ...")
        if build_folder:
            tmp = output.with_name(f".{output.name}.tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            fn(tmp)
            os.rename(tmp, output)
        else:  # the stage writes its output atomically itself
            fn()
        print(f"[{self.tag}] {name}: {time.time() - start:.0f}s -> {output}")


def run_pipeline(cfg: DictConfig, recipe: str, overrides: list[str], stage: Stages, process_scores: bool = True) -> dict:
    """Data stages, DQO training (the main job, in its own process), evaluation of base vs DQO;
    returns the evaluation results."""
    from data_prep import corpus, process, prompts, score
    from dqo_verl import evaluate

    data = Path(cfg.paths.data)
    stage("prompts", data / "prompts.parquet", lambda: in_process(prompts.prepare, cfg))
    stage("corpus", data / "samples.parquet", lambda: in_process(corpus.run, cfg))
    stage("score", data / "corpus.parquet", lambda: in_process(score.run, cfg))
    if process_scores:
        stage("process scores", data / "corpus_ps.parquet", lambda: in_process(process.run, cfg))
    command = [sys.executable, "-m", "dqo_verl.main", f"+recipe={recipe}", *overrides]
    stage("train DQO", Path(cfg.trainer.output_dir) / "export" / "policy",
          lambda: print(" ".join(command)) or subprocess.run(command, check=True))
    eval_dir = Path(cfg.evaluate.out_dir)
    stage("evaluate base and DQO", eval_dir / "summary.json", lambda: in_process(evaluate.run, cfg))
    print((eval_dir / "table.md").read_text())
    return json.loads((eval_dir / "summary.json").read_text())["results"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="outputs/tiny_cpu", help="everything goes under this folder")
    parser.add_argument("--models-only", action="store_true", help="stop after the models (make tiny-model)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sft-problems", type=int, default=None, help="default: steps x batch (each problem seen once)")
    parser.add_argument("--sft-steps", type=int, default=SFT_STEPS)
    parser.add_argument("--sft-batch-size", type=int, default=32)
    parser.add_argument("--sft-lr", type=float, default=2e-3)
    parser.add_argument("--sft-target", type=float, default=0.35, help="stop the warm-up at this dev greedy accuracy")
    parser.add_argument("--sft-check-every", type=int, default=100, help="steps between dev checks (0: never)")
    parser.add_argument("--sft-check-from", type=int, default=1000, help="first step to check")
    parser.add_argument("--dev-problems", type=int, default=200)
    parser.add_argument("--redo", action="store_true", help="rebuild every stage")
    parser.add_argument("overrides", nargs="*", help="extra key=value overrides of the tiny_cpu recipe")
    args = parser.parse_args(argv)

    root = Path(args.root).resolve()
    if args.redo:
        shutil.rmtree(root, ignore_errors=True)
    overrides = [f"paths.root={root}", f"trainer.seed={args.seed}", *args.overrides]
    cfg = compose_config(RECIPE, overrides)
    Path(cfg.paths.assets).mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    stage = Stages("demo")
    build_models(cfg, Path(cfg.paths.assets), args, stage)
    if args.models_only:
        return
    summary = run_pipeline(cfg, RECIPE, overrides, stage)
    stage("value curves", root / "value_curves.png", lambda: value_curves(cfg, root / "value_curves.png"))
    print(f"[demo] finished in {time.time() - t0:.0f}s: models {cfg.paths.assets}, data {cfg.paths.data}, "
          f"run {cfg.trainer.output_dir}, evaluation {cfg.evaluate.out_dir}, value curves {root / 'value_curves.png'}")
    base, dqo = summary["base"]["synthetic greedy"], summary["dqo"]["synthetic greedy"]
    print(f"demo: greedy accuracy base={base['accuracy']:.2f} dqo={dqo['accuracy']:.2f} (n={base['n']} test problems)")


if __name__ == "__main__":
    main()
