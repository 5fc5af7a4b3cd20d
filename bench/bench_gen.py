"""`make bench-gen`: corpus generation throughput through the corpus stage (Ray Data streaming shards of
prompts to vLLM engine actors, atomic shard writes, per-sample seeds) against raw `vllm.LLM.generate` on
the same prompts and model, in one run on this machine. Prints a table, then
`bench-gen: pipeline/raw=R gen-busy=B`: generated tokens per second, pipeline over raw, and the share of
the engines' time spent generating (busy / (engines x the time from the first shard's start to the last
one's end)).

The raw baseline is what a user would write by hand: one in-process engine, one request per
prompt with `n` samples. The pipeline uses `--engines` engine actors (default: one per core), one
request per sample with its own seed. Both exclude engine start-up. `--stop-chars K` makes response
lengths long-tailed on the random tiny model: a sample stops at the first of K characters (or eos), so
lengths are about geometric (mean near 259 / (K + 1) tokens) and a few reach `--max-tokens`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from omegaconf import OmegaConf
from transformers import AutoTokenizer

from data_prep.corpus import SampleShards
from data_prep.sources import build_synthetic_prompts
from data_prep.streaming import combine_shards, mean_list_length, run_shards
from data_prep.tiny_model import build_tiny_policy
from dqo_verl.config.compose import compose_config
from dqo_verl.data.chat import add_prompt_ids
from dqo_verl.data.io import write_parquet_atomic
from dqo_verl.data.shards import shard_ranges
from dqo_verl.workers.groups import init_ray
from dqo_verl.workers.rollout import CPU_ENGINE_ENV, sampling_params

STOP_CHARACTERS = "0123456789+-*/=()"


def measure(which: str, args) -> dict:
    """Time one path; run in its own process so neither leaves threads or memory behind for the other."""
    os.environ.update(CPU_ENGINE_ENV)
    model = Path(args.work) / "policy"
    cfg = compose_config(
        "tiny_cpu",
        [
            f"policy.model.path={model}",
            f"rollout.n={args.n}",
            f"rollout.max_tokens={args.max_tokens}",
            f"rollout.engines_per_node={args.engines}",
            f"rollout.shard_prompts={args.shard_prompts}",
            "rollout.backend=vllm",
        ],
    )
    r = cfg.rollout
    stop = list(STOP_CHARACTERS[: args.stop_chars]) or None
    prompts = add_prompt_ids(build_synthetic_prompts(args.prompts, seed=0), AutoTokenizer.from_pretrained(model))
    if which == "raw":  # one engine in this process, one request per prompt with n samples
        from vllm import LLM, SamplingParams
        from vllm.inputs import TokensPrompt

        llm = LLM(
            model=str(model),
            seed=0,
            dtype=r.dtype,
            enforce_eager=r.enforce_eager,
            enable_prefix_caching=r.enable_prefix_caching,
            max_num_batched_tokens=r.max_num_batched_tokens,
            max_model_len=512,
            kv_cache_memory_bytes=r.kv_cache_memory_bytes,
        )
        sp = SamplingParams(
            n=args.n,
            temperature=r.temperature,
            top_p=r.top_p,
            top_k=r.top_k,
            min_p=r.min_p,
            max_tokens=args.max_tokens,
            logprobs=0,
            stop=stop,
            include_stop_str_in_output=True,
        )
        reqs = [TokensPrompt(prompt_token_ids=list(p)) for p in prompts["prompt_ids"]]
        llm.generate(reqs[:2], sp, use_tqdm=False)  # warm-up
        start = time.perf_counter()
        outs = llm.generate(reqs, sp, use_tqdm=False)
        return {
            "seconds": time.perf_counter() - start,
            "tokens": sum(len(c.token_ids) for o in outs for c in o.outputs),
            "engines": 1,
        }
    init_ray(cfg)  # the pipeline: the corpus stage's engine actors and shard files
    work = Path(args.work)
    write_parquet_atomic(prompts, work / "prompts.parquet")
    ranges = shard_ranges(len(prompts), r.shard_prompts)
    report = run_shards(
        SampleShards,
        ranges,
        work / "shards",
        desc="corpus",
        unit="prompt",
        actors=args.engines,
        fn_constructor_kwargs=dict(
            rollout={**OmegaConf.to_container(r, resolve=True), "max_model_len": 512, "engine": "vllm"},
            model=str(model),
            prompts=str(work / "prompts.parquet"),
            n=args.n,
            seed=0,
            params={**sampling_params(r), "stop": stop},
        ),
    )
    combine_shards(work / "shards", ranges, work / "samples.parquet", rows_per_unit=args.n)
    mean = mean_list_length(work / "samples.parquet", "response_ids")
    return {
        "seconds": report.window_s,
        "tokens": report.tokens,
        "engines": args.engines,
        "busy": report.busy_share,
        "mean_tokens": mean,
    }


def run_both(args, argv: list[str]) -> dict:
    """{raw, pipeline: measure(...)} on a tiny policy built for them, each path in its own process."""
    work = Path(tempfile.mkdtemp(prefix="bench-gen-"))
    build_tiny_policy(
        work / "policy",
        seed=0,
        hidden_size=args.hidden,
        num_layers=args.layers,
        num_heads=args.hidden // 64,
        intermediate_size=3 * args.hidden,
    )
    results = {}
    for which in ("raw", "pipeline"):
        cmd = [sys.executable, __file__, "--only", which, "--work", str(work), *argv]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode or "RESULT " not in out.stdout:
            sys.exit(f"bench-gen {which} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
        results[which] = json.loads(out.stdout.split("RESULT ", 1)[1].splitlines()[0])
    return results


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=48)
    parser.add_argument("--n", type=int, default=20)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--engines", type=int, default=os.cpu_count())
    parser.add_argument("--shard-prompts", type=int, default=8)
    parser.add_argument("--stop-chars", type=int, default=0)
    parser.add_argument("--only", choices=["raw", "pipeline"], help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    return parser


def main() -> None:
    args = parser().parse_args()
    if args.only:
        print("RESULT " + json.dumps(measure(args.only, args)))
        return

    results = run_both(args, sys.argv[1:])
    print(
        f"\nmodel: Qwen2 hidden {args.hidden}, {args.layers} layers; {args.prompts} prompts x {args.n} samples, "
        f"max {args.max_tokens} new tokens; {os.cpu_count()} CPU cores; each path in its own process"
    )
    print(f"{'path':<52} {'seconds':>8} {'tokens':>8} {'tok/s':>8}")
    names = {
        "raw": "raw vllm.LLM.generate (1 engine, n per request)",
        "pipeline": f"pipeline ({results['pipeline']['engines']} engines, seeded per sample)",
    }
    for which, res in results.items():
        print(f"{names[which]:<52} {res['seconds']:>8.2f} {res['tokens']:>8d} {res['tokens'] / res['seconds']:>8.0f}")
    rate = {k: v["tokens"] / v["seconds"] for k, v in results.items()}
    print(f"bench-gen: pipeline/raw={rate['pipeline'] / rate['raw']:.2f} gen-busy={results['pipeline']['busy']:.2f}")


if __name__ == "__main__":
    main()
