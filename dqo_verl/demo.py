"""`make demo`: the embedded default, end to end on a CPU, building everything it needs.

Stages (each writes its output atomically and is skipped when the output exists; `--redo` reruns):
  1. base    tiny random Qwen2 + character tokenizer                     assets/base
  2. sft     warm-up on gold solutions of the synthetic task              assets/policy
  3. value   value model = policy backbone + seeded score head            assets/value
  4. prompts synthetic prompts (`make prompts`)                           data/prompts.parquet
  5. corpus  N samples per prompt, rollout worker group (`make corpus`)   data/samples.parquet
  6. score   graded 1/0 (`make score`)                                    data/corpus.parquet
  7. train   the main job: python -m dqo_verl.main +recipe=tiny_cpu
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
from dqo_verl.main import compose_config

RECIPE = "tiny_cpu"
SFT_SEED = 1000


def stage_sft(cfg: DictConfig, base: Path, out: Path, args) -> None:
    import ray
    from transformers import AutoTokenizer

    from data_prep.prompts import chat_prompt
    from dqo_verl.sft import run_sft
    from dqo_verl.trainer import init_ray

    tokenizer = AutoTokenizer.from_pretrained(base)
    problems = synthetic.make_problems(args.sft_problems, seed=args.seed + SFT_SEED)
    rows = pd.DataFrame(
        {
            "prompt_ids": [chat_prompt(tokenizer, p["question"]) for p in problems],
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


def build_models(cfg: DictConfig, assets: Path, args, stage) -> None:
    """Stages 1-3: the tiny base model, its SFT warm-up, the value model (what `make tiny-model` runs)."""
    from dqo_verl.tiny_model import build_tiny_policy, build_value_model

    base, policy, value = assets / "base", assets / "policy", assets / "value"
    stage("base model", base, lambda tmp: build_tiny_policy(tmp, seed=args.seed))
    stage("sft warm-up", policy, lambda tmp: stage_sft(cfg, base, tmp, args))
    stage("value model", value, lambda tmp: build_value_model(policy, tmp, seed=args.seed))


def in_process(fn, cfg: DictConfig):
    """Run a data stage in this process, then stop the Ray it started."""
    import ray

    try:
        return fn(cfg)
    finally:
        if ray.is_initialized():
            ray.shutdown()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--assets", default="outputs/tiny_cpu/assets")
    parser.add_argument("--data", default="outputs/tiny_cpu/data")
    parser.add_argument("--models-only", action="store_true", help="stop after the models (make tiny-model)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sft-problems", type=int, default=4000)
    parser.add_argument("--sft-steps", type=int, default=500)
    parser.add_argument("--sft-batch-size", type=int, default=32)
    parser.add_argument("--sft-lr", type=float, default=2e-3)
    parser.add_argument("--redo", action="store_true", help="rebuild every stage")
    parser.add_argument("overrides", nargs="*", help="extra key=value overrides for the main job")
    args = parser.parse_args(argv)

    assets = Path(args.assets).resolve()
    data = Path(args.data).resolve()
    if args.redo:
        shutil.rmtree(assets, ignore_errors=True)
        shutil.rmtree(data, ignore_errors=True)
    assets.mkdir(parents=True, exist_ok=True)
    overrides = [f"paths.assets={assets}", f"paths.data={data}", f"trainer.seed={args.seed}", *args.overrides]
    cfg = compose_config(RECIPE, overrides)
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

    build_models(cfg, assets, args, stage)
    if args.models_only:
        return
    from data_prep import corpus, prompts, score

    stage("prompts", data / "prompts.parquet", lambda: in_process(prompts.prepare, cfg))
    stage("corpus", data / "samples.parquet", lambda: in_process(corpus.run, cfg))
    stage("score", data / "corpus.parquet", lambda: in_process(score.run, cfg))

    print(f"[demo] train: python -m dqo_verl.main +recipe={RECIPE} {' '.join(overrides)}")
    subprocess.run([sys.executable, "-m", "dqo_verl.main", f"+recipe={RECIPE}", *overrides], check=True)
    print(f"[demo] finished in {time.time() - t0:.0f}s")
    print(f"[demo] models: {assets}")
    print(f"[demo] data: {data}")
    print(f"[demo] outputs: {Path(cfg.trainer.output_dir).resolve()}")


if __name__ == "__main__":
    main()
