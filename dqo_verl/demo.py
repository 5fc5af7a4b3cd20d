"""`make demo`: the embedded default, end to end on a CPU, building everything it needs.

Stages (each writes its output atomically and is skipped when the output exists; `--redo` reruns):
  1. base    tiny random Qwen2 + character tokenizer                     assets/base
  2. sft     warm-up on gold solutions of the synthetic task              assets/policy
  3. prompts held-out synthetic prompts (verl parquet)                    assets/prompts.parquet
  4. corpus  N samples per prompt from the warmed-up policy, graded 1/0   assets/corpus.parquet
  5. value   value model = policy backbone + seeded score head            assets/value
  6. train   the main job: python -m dqo_verl.main +recipe=tiny_cpu
"""

from __future__ import annotations

import argparse
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
from dqo_verl.generate import SamplingConfig, sample_hf
from dqo_verl.grading import grade
from dqo_verl.main import compose_config

RECIPE = "tiny_cpu"


def chat_prompt_ids(tokenizer, question: str) -> list[int]:
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=True
    )["input_ids"]


def stage_sft(cfg: DictConfig, base: Path, out: Path, args) -> None:
    import ray
    from transformers import AutoTokenizer

    from dqo_verl.sft import run_sft
    from dqo_verl.trainer import init_ray

    tokenizer = AutoTokenizer.from_pretrained(base)
    problems = synthetic.make_problems(args.sft_problems, seed=args.seed + 1)
    rows = pd.DataFrame(
        {
            "prompt_ids": [chat_prompt_ids(tokenizer, p["question"]) for p in problems],
            "response_ids": [tokenizer(p["solution"])["input_ids"] + [tokenizer.eos_token_id] for p in problems],
        }
    )
    role = OmegaConf.merge(cfg.policy, {"model": {"path": str(base)}, "optim": {"lr": args.sft_lr}})
    init_ray(cfg)
    losses = run_sft(
        rows, role, cfg.checkpoint, out, steps=args.sft_steps, batch_size=args.sft_batch_size,
        pad_token_id=tokenizer.pad_token_id, nnodes=1, n_gpus_per_node=cfg.trainer.n_gpus_per_node, seed=args.seed,
    )
    ray.shutdown()
    print(f"[sft] loss {losses[0]:.3f} -> {losses[-1]:.3f} over {len(losses)} steps")


def stage_prompts(out: Path, args) -> None:
    sft_questions = {p["question"] for p in synthetic.make_problems(args.sft_problems, seed=args.seed + 1)}
    problems = synthetic.make_problems(args.prompts, seed=args.seed + 2, exclude=sft_questions)
    write_parquet_atomic(pd.DataFrame(synthetic.to_rows(problems, "train")), out)


def stage_corpus(policy: Path, prompts: Path, out: Path, args) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(policy)
    table = pd.read_parquet(prompts)
    prompt_ids = [chat_prompt_ids(tokenizer, msgs[0]["content"]) for msgs in table["prompt"]]
    cfg = SamplingConfig(n=args.samples, max_new_tokens=args.max_new_tokens, seed=args.seed)
    samples = sample_hf(str(policy), prompt_ids, cfg, desc="corpus")
    rows = []
    for i, s in enumerate(samples):
        prompt_row = table.iloc[i // cfg.n]
        truth = prompt_row["reward_model"]["ground_truth"]
        graded = grade(s["response"], truth, prompt_row["data_source"])
        rows.append(
            {
                "data_source": prompt_row["data_source"],
                "prompt": prompt_row["prompt"],
                "reward_model": prompt_row["reward_model"],
                "extra_info": {**prompt_row["extra_info"], "sample": i % cfg.n},
                "uid": int(i // cfg.n),
                **s,
                **graded,
            }
        )
    corpus = pd.DataFrame(rows)
    write_parquet_atomic(corpus, out)
    print(f"[corpus] {len(corpus)} responses, positive rate {corpus['score'].mean():.3f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--assets", default="outputs/tiny_cpu/assets")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sft-problems", type=int, default=4000)
    parser.add_argument("--sft-steps", type=int, default=500)
    parser.add_argument("--sft-batch-size", type=int, default=32)
    parser.add_argument("--sft-lr", type=float, default=2e-3)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--redo", action="store_true", help="rebuild every stage")
    parser.add_argument("overrides", nargs="*", help="extra key=value overrides for the main job")
    args = parser.parse_args(argv)

    from dqo_verl.tiny_model import build_tiny_policy, build_value_model

    assets = Path(args.assets).resolve()
    if args.redo:
        shutil.rmtree(assets, ignore_errors=True)
    assets.mkdir(parents=True, exist_ok=True)
    overrides = [f"paths.assets={assets}", f"trainer.seed={args.seed}", *args.overrides]
    cfg = compose_config(RECIPE, overrides)
    base, policy, value = assets / "base", assets / "policy", assets / "value"
    prompts, corpus = assets / "prompts.parquet", assets / "corpus.parquet"
    t0 = time.time()

    def stage(name: str, output: Path, fn) -> None:
        if output.exists():
            print(f"[demo] {name}: done already ({output})")
            return
        start = time.time()
        print(f"[demo] {name} ...")
        if output.suffix:  # a file: its stage writes it atomically
            fn()
        else:  # a folder: build beside it, then rename
            tmp = output.with_name(f".{output.name}.tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            fn(tmp)
            os.rename(tmp, output)
        print(f"[demo] {name}: {time.time() - start:.0f}s -> {output}")

    stage("base model", base, lambda tmp: build_tiny_policy(tmp, seed=args.seed))
    stage("sft warm-up", policy, lambda tmp: stage_sft(cfg, base, tmp, args))
    stage("prompts", prompts, lambda: stage_prompts(prompts, args))
    stage("corpus", corpus, lambda: stage_corpus(policy, prompts, corpus, args))
    stage("value model", value, lambda tmp: build_value_model(policy, tmp, seed=args.seed))

    print(f"[demo] train: python -m dqo_verl.main +recipe={RECIPE} {' '.join(overrides)}")
    subprocess.run([sys.executable, "-m", "dqo_verl.main", f"+recipe={RECIPE}", *overrides], check=True)
    print(f"[demo] finished in {time.time() - t0:.0f}s")
    print(f"[demo] assets: {assets}")
    print(f"[demo] outputs: {Path(cfg.trainer.output_dir).resolve()}")


if __name__ == "__main__":
    main()
