"""`make bench-scale`: does the driver's memory grow with the training corpus? Measured in one run on this machine.

Writes two synthetic corpora of the same shape (64-token prompts, 256-token responses, reference log-probs
included: 320 tokens a row, as in issue 15's measurement) of 10k and 160k rows, streamed to parquet, then
trains DQO on each (same tiny models, batch 64, a few updates through the Ray worker groups) in a fresh
driver process and reads that process's peak RSS. Also times the corpus check (per 100k rows) and the
reference-cache write: the sharded cache of `ref_cache.py` vs the single file of the corpus plus its
log-probs that earlier versions wrote.

Then generates a corpus with a long-tailed length mix (`bench_gen.py --stop-chars`: most responses short,
a few at the length limit) through the corpus stage (Ray Data, engine actors) and by raw `vllm.LLM.generate`.

Last line: `bench-scale: mem160k/mem10k=R1 gen-busy=R2 gen/raw=R3`: R1 driver peak RSS ratio, R2 the share
of the stage's engine time spent generating, R3 the stage's generated tokens per second over raw vLLM's.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

PROMPT, RESPONSE, BATCH = 64, 256, 64


def write_corpus(path: Path, rows: int, vocab: int, seed: int = 0, chunk: int = 8192) -> None:
    """`rows` random rows in row groups of 256, written a chunk at a time (never whole in memory)."""
    rng = np.random.default_rng(seed)
    writer = None
    for start in range(0, rows, chunk):
        n = min(chunk, rows - start)
        prompts = rng.integers(3, vocab, (n, PROMPT))
        responses = rng.integers(3, vocab, (n, RESPONSE))
        table = pa.table(
            {
                "uid": np.arange(start, start + n) // 4,
                "prompt_ids": pa.FixedSizeListArray.from_arrays(prompts.ravel(), PROMPT).cast(pa.list_(pa.int64())),
                "response_ids": pa.FixedSizeListArray.from_arrays(responses.ravel(), RESPONSE).cast(
                    pa.list_(pa.int64())
                ),
                "score": rng.integers(0, 2, n).astype(np.float64),
                "ref_logprobs": pa.FixedSizeListArray.from_arrays(
                    (-rng.random(n * RESPONSE) * 6).astype(np.float32), RESPONSE
                ).cast(pa.list_(pa.float32())),
            }
        )
        writer = writer or pq.ParquetWriter(path, table.schema)
        writer.write_table(table, row_group_size=256)
    writer.close()


def train_here(corpus: Path, models: Path, steps: int) -> dict:
    """DQO on `corpus` in this process (the driver); its peak RSS and times."""
    from dqo_verl.config.compose import compose_config
    from dqo_verl.trainer.methods import make_trainer
    from dqo_verl.workers.groups import init_ray

    cfg = compose_config(
        "tiny_cpu",
        [
            f"data.train_files={corpus}",
            f"policy.model.path={models / 'policy'}",
            f"value.model.path={models / 'value'}",
            f"trainer.output_dir={corpus.parent / ('run_' + corpus.stem)}",
            f"data.train_batch_size={BATCH}",
            f"data.max_prompt_length={PROMPT}",
            f"data.max_response_length={RESPONSE}",
            f"trainer.total_training_steps={steps}",
            "trainer.save_freq=-1",
            "trainer.resume_mode=disable",
            "trainer.logger=[console]",
            *[
                f"{r}.engine.{k}=8"
                for r in ("policy", "value")
                for k in ("micro_batch_size_per_gpu", "infer_micro_batch_size_per_gpu")
            ],
        ],
    )
    start = time.perf_counter()
    trainer = make_trainer(cfg)  # opens and checks the corpus
    scan_s = time.perf_counter() - start
    init_ray(cfg)
    start = time.perf_counter()
    with trainer:
        trainer.fit()
    fit_s = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"rows": len(trainer.corpus), "peak_rss_mb": peak, "scan_s": scan_s, "fit_s": fit_s}


def ref_cache_writes(corpus: Path, work: Path) -> dict:
    """Seconds to write the 160k-row reference cache: as shards of log-probs, and as the old single file."""
    from dqo_verl.data.io import write_parquet_atomic
    from dqo_verl.data.trainset import ParquetRows
    from dqo_verl.trainer.ref_cache import write_shard

    reader = ParquetRows([corpus])
    start = time.perf_counter()
    for first, table in reader.batches(["ref_logprobs"], rows=8192):
        logps = list(table["ref_logprobs"].to_numpy(zero_copy_only=False))  # one array a row, as computed
        write_shard(work / "cache.ref", first, logps, {"dqo.bench": "1"})
    sharded = time.perf_counter() - start
    whole = pq.read_table(corpus).to_pandas()  # the old way: the whole corpus with its log-probs, one file
    start = time.perf_counter()
    write_parquet_atomic(whole, work / "cache_old.ref.parquet")
    return {"sharded_s": sharded, "single_file_s": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--small", type=int, default=10_000)
    parser.add_argument("--large", type=int, default=160_000)
    parser.add_argument("--train-on", type=Path, help=argparse.SUPPRESS)  # the child: one driver's run
    parser.add_argument("--models", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--skip-memory", action="store_true", help="only the generation figures (R2, R3)")
    args = parser.parse_args()
    if args.train_on:
        print("RESULT " + json.dumps(train_here(args.train_on, args.models, args.steps)))
        return

    r1 = None if args.skip_memory else memory(args)
    r2, r3 = generation()
    print(f"bench-scale: mem160k/mem10k={'-' if r1 is None else f'{r1:.2f}'} gen-busy={r2:.2f} gen/raw={r3:.2f}")


def memory(args) -> float:
    """Driver peak RSS training on the large corpus over the small one (and the check and cache-write times)."""
    from data_prep.models import build_value_model
    from data_prep.tiny_model import build_tiny_policy

    work = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    policy = build_tiny_policy(work / "policy", seed=0)
    build_value_model(policy, work / "value", seed=0)
    vocab = json.loads((policy / "config.json").read_text())["vocab_size"]
    runs = {}
    for rows in (args.small, args.large):
        corpus = work / f"corpus_{rows}.parquet"
        start = time.perf_counter()
        write_corpus(corpus, rows, vocab)
        print(
            f"[bench-scale] wrote {rows} rows in {time.perf_counter() - start:.1f}s ({corpus.stat().st_size >> 20} MB)"
        )
        cmd = [sys.executable, __file__, "--train-on", str(corpus), "--models", str(work), "--steps", str(args.steps)]
        out = subprocess.run(cmd, capture_output=True, text=True)
        lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
        if out.returncode or not lines:
            sys.exit(f"training on {corpus} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
        runs[rows] = json.loads(lines[-1][len("RESULT ") :])
    writes = ref_cache_writes(work / f"corpus_{args.large}.parquet", work)

    print(f"\nDQO, batch {BATCH}, {args.steps} updates, rows of {PROMPT}+{RESPONSE} tokens with reference log-probs")
    print(f"{'corpus rows':>12} {'driver peak RSS':>16} {'check s':>8} {'check s/100k':>13} {'train s':>8}")
    for rows, r in runs.items():
        print(
            f"{rows:>12} {r['peak_rss_mb']:>13.0f} MB {r['scan_s']:>8.2f} {r['scan_s'] / rows * 1e5:>13.2f} "
            f"{r['fit_s']:>8.1f}"
        )
    print(
        f"reference cache of {args.large} rows: shards {writes['sharded_s']:.1f}s, "
        f"one file with the corpus (before) {writes['single_file_s']:.1f}s"
    )
    r1 = runs[args.large]["peak_rss_mb"] / runs[args.small]["peak_rss_mb"]
    return r1


def generation() -> tuple[float, float]:
    """(engine busy share, stage / raw tok/s) on a long-tailed length mix."""
    import bench_gen  # this folder

    argv = ["--prompts", "64", "--n", "16", "--max-tokens", "192", "--stop-chars", "7", "--shard-prompts", "4"]
    args = bench_gen.parser().parse_args(argv)
    res = bench_gen.run_both(args, argv)
    print(
        f"\nlong-tail mix: {args.prompts} prompts x {args.n} samples, a sample ends at eos or at one of "
        f"{args.stop_chars} characters, or at {args.max_tokens} tokens (mean {res['pipeline']['mean_tokens']:.0f})"
    )
    for which, r in res.items():
        print(f"{which:>9}: {r['engines']} engine(s), {r['tokens']} tokens in {r['seconds']:.1f}s")
    rate = {k: v["tokens"] / v["seconds"] for k, v in res.items()}
    return res["pipeline"]["busy"], rate["pipeline"] / rate["raw"]


if __name__ == "__main__":
    main()
