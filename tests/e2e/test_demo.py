"""A shortened `make demo`: the pipeline runs every stage of tiny_cpu in order; then `make iterate` finds it up to
date but for what changed or has not run yet, and adds a second round of DQO on top."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from transformers import AutoModelForCausalLM

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
SHORT = [
    "sft_stage.steps=20",
    "sft_stage.problems=640",
    "sft_stage.check_every=10",
    "sft_stage.check_from=10",
    "sft_stage.target_accuracy=0",
    "sft_stage.dev_problems=20",
    "dataset.limit=16",
    "rollout.n=4",
    "rollout.max_tokens=64",
    "rollout.backend=hf",  # vLLM's engine is tested in test_corpus.py; a stage starts engines faster without it
    "process.k=2",
    "evaluate.datasets.synthetic.limit=24",
    "evaluate.max_tokens=64",
    "evaluate.sampling.seeds=[0]",
    "trainer.logger=[console]",
]
LAST_LINE = r"demo: greedy accuracy base=\d\.\d\d dqo=\d\.\d\d \(n=24 test problems\)"


def pipeline(root, *extra):
    cmd = [sys.executable, "-m", "dqo_verl.pipeline", "+recipe=tiny_cpu", f"paths.root={root}", *SHORT, *extra]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    return out.stdout


def test_short_demo_end_to_end(tmp_path):
    root = tmp_path / "demo"
    out = pipeline(root)
    last = out.strip().splitlines()[-1]
    assert re.fullmatch(LAST_LINE, last), last
    stages = "base -> sft -> value -> prompts -> corpus -> score -> process -> train -> eval -> report"
    assert f"[pipeline] stages: {stages}" in out and out.count(": running (no record of an earlier run)") == 10

    # the warm-up stops at the first dev check that reaches the target (0 here: the first)
    assert "[sft] step 10: greedy accuracy" in out and "over 10 steps" in out
    data = root / "data"
    questions = {
        name: {m[0]["content"] for m in pd.read_parquet(data / f"{name}.parquet")["prompt"]} for name in ("dev", "sft")
    }
    assert len(questions["dev"]) == 20 and len(questions["sft"]) == 640 and not questions["dev"] & questions["sft"]
    prompts = pd.read_parquet(data / "prompts.parquet")
    corpus = pd.read_parquet(data / "corpus.parquet")
    assert len(prompts) == 16 and len(corpus) == 16 * 4
    assert set(corpus["score"]) <= {0.0, 1.0} and corpus.groupby("uid").size().eq(4).all()
    assert "[score] 64 responses of 16 prompts" in out
    ps = pd.read_parquet(data / "corpus_ps.parquet")
    assert len(ps) == len(corpus) and (data / "process_prefix.png").exists()
    for ends, rewards, prefix, s, ids in zip(
        ps["segment_ends"], ps["process_rewards"], ps["correct_prefix"], ps["score"], ps["response_ids"]
    ):
        assert len(ends) == len(rewards) and ends[-1] == len(ids) - 1 and list(ends) == sorted(set(ends))
        assert sum(rewards) == pytest.approx(1.0 if s == 1 else prefix / len(ends))
    stats = json.loads((data / "process_stats.json").read_text())
    assert stats["responses"] == 64 and stats["failed_responses_searched"] == int((ps["score"] == 0).sum())

    run = root / "run"
    step = int((run / "checkpoints" / "latest_checkpointed_iteration.txt").read_text())
    assert step == 64 // 32  # one epoch of 2 updates
    policy = AutoModelForCausalLM.from_pretrained(run / "export" / "policy")
    assert policy.dtype == torch.float32
    assert (run / "export" / "value" / "model.safetensors").exists()

    summary = json.loads((root / "eval" / "summary.json").read_text())["results"]
    assert set(summary) == {"base", "dqo"}
    assert summary["dqo"]["synthetic sample"]["seeds"] == 1
    assert "| dqo" in (root / "eval" / "table.md").read_text()
    assert (root / "value_curves.png").read_bytes()[:4] == b"\x89PNG"
    assert (root / "report.md").read_text().strip().splitlines()[-1] == last

    # `make iterate ROUNDS=2`, with one report setting changed and a stage not run yet: round 1 is the run above,
    # where only those two stages run, and it says why; round 2 samples a corpus from round 1's policy on the same
    # prompts and continues DQO from its policy and value, round 1's policy as the reference
    cmd = [sys.executable, "-m", "dqo_verl.pipeline.iterate", "+recipe=tiny_cpu", f"paths.root={root}", *SHORT]
    cmd += ["report.value_curves=false", "pipeline.stages=[baselines,report]", "iterate.rounds=2"]
    it = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert it.returncode == 0, it.stdout[-4000:] + it.stderr[-4000:]
    again, second = it.stdout.split("[iterate] round 2/2")
    assert "[pipeline] corpus: running (no record of an earlier run)" in second
    assert (
        "[pipeline] stages: base -> sft -> value -> prompts -> corpus -> score -> baselines -> train -> eval -> report"
        in again
    )
    assert again.count("up to date") == 8 and "[pipeline] baselines: running (no record of an earlier run)" in again
    assert "[pipeline] report: running (report.value_curves: True -> False" in again
    for name in ("sft", "rs", "dpo", "kto"):
        assert (data / "baselines" / f"{name}.parquet").exists()
    assert "| DQO | 64 | 16 |" in again and (data / "baselines" / "positive_rate.png").exists()
    assert (root / "report.md").read_text().strip().splitlines()[-1] == last  # the same evaluation, reported again
    round2 = root / "iterate" / "round2"
    assert pd.read_parquet(round2 / "data" / "prompts.parquet").equals(prompts)
    assert len(pd.read_parquet(round2 / "data" / "corpus.parquet")) == 16 * 4
    for record, reads in (
        (round2 / "data" / ".stages" / "corpus.json", [run / "export" / "policy"]),
        (round2 / "run" / "export" / ".stages" / "train.json", [run / "export" / "policy", run / "export" / "value"]),
    ):
        inputs = json.loads(record.read_text())["inputs"]
        assert all(str(path) in inputs for path in reads), inputs
    assert str(root / "assets" / "policy") not in inputs  # the reference is round 1's policy, not the original
    after = AutoModelForCausalLM.from_pretrained(round2 / "run" / "export" / "policy")
    assert not torch.equal(after.lm_head.weight, policy.lm_head.weight)  # round 2 trained on
    table = pd.read_csv(root / "iterate" / "table.csv")
    assert list(table["round"]) == [0, 1, 2] and list(table["responses"][1:]) == [64, 64]
    assert table["synthetic greedy"][1] == pytest.approx(100 * summary["dqo"]["synthetic greedy"]["accuracy"])
    assert (root / "iterate" / "accuracy.png").read_bytes()[:4] == b"\x89PNG"
