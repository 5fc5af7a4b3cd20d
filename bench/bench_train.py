"""`make bench-train`: DQO update throughput through the Ray worker groups vs a bare PyTorch loop,
and DQO (token actions) vs DRO (`granularity=sequence`) step time, measured in one run on this CPU.

The bare loop computes the same things on the same model and data in one process (torch threads =
all cores): policy and value forward passes for the targets, `algo.py`'s lambda-returns and
importance weights, then one AdamW step on the value loss and one on the policy loss (grad clip 1).
The Ray path is the trainer's `train_step` with 2 ranks per group (FSDP2 over gloo). Prints a table,
then `bench-train: ray/bare=R1 dqo/dro=R2` (R1: response tokens/s ratio; R2: step time ratio).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForTokenClassification

from data_prep.models import build_value_model
from data_prep.tiny_model import build_tiny_policy
from dqo_verl.config.compose import compose_config
from dqo_verl.trainer import algo
from dqo_verl.trainer.batches import BatchSpec, build_batch, epoch_batches
from dqo_verl.trainer.methods import make_trainer
from dqo_verl.workers.groups import init_ray


def make_corpus(path: Path, rows: int, prompt_len: int, response_len: int, vocab: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    recs = []
    for _ in range(rows):
        n = int(rng.integers(response_len * 3 // 4, response_len + 1))
        recs.append(
            {
                "prompt_ids": rng.integers(3, vocab, prompt_len).tolist(),
                "response_ids": rng.integers(3, vocab, n).tolist() + [2],
                "score": float(rng.integers(0, 2)),
                "ref_logprobs": (-rng.random(n + 1) * 6).astype(np.float32).tolist(),
            }
        )
    pd.DataFrame(recs).to_parquet(path)


def bare_loop(cfg, corpus: pd.DataFrame, batches: list[np.ndarray], warmup: int) -> list[float]:
    """Seconds per update of the single-process loop (same losses, model, data, optimizer)."""
    torch.set_num_threads(os.cpu_count())
    policy = AutoModelForCausalLM.from_pretrained(
        cfg.policy.model.path, dtype=torch.float32, attn_implementation="sdpa"
    )
    value = AutoModelForTokenClassification.from_pretrained(
        cfg.value.model.path, dtype=torch.float32, attn_implementation="sdpa"
    )
    opts = {
        m: torch.optim.AdamW(
            m.parameters(), lr=r.optim.lr, weight_decay=r.optim.weight_decay, betas=tuple(r.optim.betas)
        )
        for m, r in ((policy, cfg.policy), (value, cfg.value))
    }
    a = cfg.algorithm
    spec = BatchSpec(pad_token_id=0, granularity=a.granularity or "token")

    def response_outputs(model, b, kind):
        out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], position_ids=b["position_ids"]).logits
        p = b["prompts"].shape[1]
        out = out[:, p - 1 : -1]  # the state before each response token
        if kind == "values":
            return out.squeeze(-1)
        return torch.log_softmax(out.float(), -1).gather(-1, b["responses"].unsqueeze(-1)).squeeze(-1)

    def step(model, loss):
        opts[model].zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opts[model].step()

    times = []
    for i, idx in enumerate(batches):
        start = time.perf_counter()
        b = build_batch(corpus.iloc[idx], spec)
        mask = b["response_mask"].bool()
        ends = b["action_ends"]
        with torch.no_grad():
            log_ratio = torch.where(mask, response_outputs(policy, b, "log_probs") - b["ref_logprobs"], 0.0)
            values = response_outputs(value, b, "values")
        t = algo.dqo_targets(log_ratio, values, b["rewards"], ends, a.beta, a.lam, a.is_log_clip)
        v_loss, _ = algo.dqo_value_loss(
            algo.values_at_action_starts(response_outputs(value, b, "values"), ends), t.returns, t.weights, t.mask
        )
        step(value, v_loss)
        lr_grad = torch.where(mask, response_outputs(policy, b, "log_probs") - b["ref_logprobs"], 0.0)
        p_loss, _ = algo.dqo_policy_loss(
            algo.collapse_to_actions(lr_grad, ends), t.values, t.rewards, t.returns, t.weights, t.mask, a.beta
        )
        step(policy, p_loss)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


def ray_loop(cfg, batches: list[np.ndarray], warmup: int) -> list[float]:
    """Seconds per update of the trainer's train_step through the Ray worker groups."""
    with make_trainer(cfg) as trainer:
        times = []
        for i, idx in enumerate(batches):
            rows = trainer.corpus.read(idx)
            start = time.perf_counter()
            trainer.train_step(rows, i)
            if i >= warmup:
                times.append(time.perf_counter() - start)
        return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--response-len", type=int, default=384)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=6)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-train-"))
    policy = build_tiny_policy(
        work / "policy",
        seed=0,
        hidden_size=args.hidden,
        num_layers=args.layers,
        num_heads=args.hidden // 64,
        intermediate_size=3 * args.hidden,
    )
    value = build_value_model(policy, work / "value", seed=0)
    rows = args.batch * (args.steps + args.warmup)
    make_corpus(work / "corpus.parquet", rows, args.prompt_len, args.response_len, vocab=250, seed=0)
    micro = args.batch // 2
    base = [
        f"data.train_files={work / 'corpus.parquet'}",
        f"policy.model.path={policy}",
        f"value.model.path={value}",
        f"trainer.output_dir={work / 'out'}",
        f"data.train_batch_size={args.batch}",
        f"data.max_response_length={args.response_len + 1}",
        f"data.max_prompt_length={args.prompt_len}",
        *[
            f"{r}.engine.{k}={micro}"
            for r in ("policy", "value")
            for k in ("micro_batch_size_per_gpu", "infer_micro_batch_size_per_gpu")
        ],
    ]
    configs = {name: compose_config("tiny_cpu", [*base, f"algorithm.name={name}"]) for name in ("dqo", "dro")}
    corpus = pd.read_parquet(work / "corpus.parquet")  # every row fits the length limits
    batches = epoch_batches(len(corpus), args.batch, seed=0, epoch=0)
    tokens = [int(corpus.iloc[idx]["response_ids"].map(len).sum()) for idx in batches[args.warmup :]]

    results = {"bare PyTorch loop (DQO)": bare_loop(configs["dqo"], corpus, batches, args.warmup)}
    init_ray(configs["dqo"])
    results["Ray groups, DQO (token)"] = ray_loop(configs["dqo"], batches, args.warmup)
    results["Ray groups, DRO (sequence)"] = ray_loop(configs["dro"], batches, args.warmup)

    c = AutoConfig.from_pretrained(policy)
    print(
        f"\nmodel: Qwen2 hidden {c.hidden_size}, {c.num_hidden_layers} layers; batch {args.batch} responses of "
        f"~{statistics.mean(tokens) / args.batch:.0f} tokens (+{args.prompt_len} prompt); {args.steps} timed updates "
        f"after {args.warmup} warm-up; {os.cpu_count()} CPU cores; Ray: 2 ranks per group (FSDP2, gloo)"
    )
    print(f"{'path':<30} {'s/update':>10} {'resp tok/s':>12}")
    rate = {}
    for name, times in results.items():
        rate[name] = sum(tokens) / sum(times)
        print(f"{name:<30} {statistics.mean(times):>10.3f} {rate[name]:>12.1f}")
    r1 = rate["Ray groups, DQO (token)"] / rate["bare PyTorch loop (DQO)"]
    r2 = statistics.mean(results["Ray groups, DQO (token)"]) / statistics.mean(results["Ray groups, DRO (sequence)"])
    print(f"bench-train: ray/bare={r1:.2f} dqo/dro={r2:.2f}")


if __name__ == "__main__":
    main()
