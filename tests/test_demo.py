"""A shortened `make demo`: the pipeline runs every stage of tiny_cpu in order, and a rerun only what changed."""

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
REPO = Path(__file__).resolve().parents[1]
SHORT = [
    "sft.steps=40",
    "sft.problems=1280",
    "sft.check_every=20",
    "sft.check_from=20",
    "sft.target_accuracy=0",
    "sft.dev_problems=20",
    "dataset.limit=16",
    "rollout.n=4",
    "rollout.max_tokens=64",
    "process.k=2",
    "evaluate.datasets.synthetic.limit=24",
    "evaluate.max_tokens=64",
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
    out = pipeline(root, "evaluate.sampling.seeds=[0,1]")
    last = out.strip().splitlines()[-1]
    assert re.fullmatch(LAST_LINE, last), last
    stages = "base -> sft -> value -> prompts -> corpus -> score -> process -> train -> eval -> report"
    assert f"[pipeline] stages: {stages}" in out and out.count(": running (no record of an earlier run)") == 10

    # the warm-up stops at the first dev check that reaches the target (0 here: the first)
    assert "[sft] step 20: greedy accuracy" in out and "over 20 steps" in out
    data = root / "data"
    questions = {
        name: {m[0]["content"] for m in pd.read_parquet(data / f"{name}.parquet")["prompt"]} for name in ("dev", "sft")
    }
    assert len(questions["dev"]) == 20 and len(questions["sft"]) == 1280 and not questions["dev"] & questions["sft"]
    prompts = pd.read_parquet(data / "prompts.parquet")
    corpus = pd.read_parquet(data / "corpus.parquet")
    assert len(prompts) == 16 and len(corpus) == 16 * 4
    assert set(corpus["score"]) <= {0.0, 1.0}
    ps = pd.read_parquet(data / "corpus_ps.parquet")
    assert len(ps) == len(corpus) and ps["process_rewards"].map(len).eq(ps["segment_ends"].map(len)).all()
    assert json.loads((data / "process_stats.json").read_text())["responses"] == 64

    run = root / "run"
    step = int((run / "checkpoints" / "latest_checkpointed_iteration.txt").read_text())
    assert step == 64 // 32  # one epoch of 2 updates
    policy = AutoModelForCausalLM.from_pretrained(run / "export" / "policy")
    assert policy.dtype == torch.float32
    assert (run / "export" / "value" / "model.safetensors").exists()

    summary = json.loads((root / "eval" / "summary.json").read_text())["results"]
    assert set(summary) == {"base", "dqo"}
    assert summary["dqo"]["synthetic sample"]["seeds"] == 2
    assert "| dqo" in (root / "eval" / "table.md").read_text()
    assert (root / "value_curves.png").read_bytes()[:4] == b"\x89PNG"
    assert (root / "report.md").read_text().strip().splitlines()[-1] == last

    # a rerun with one evaluation setting changed redoes evaluation and report only, and says why
    again = pipeline(root, "evaluate.sampling.seeds=[0]")
    assert again.count("up to date") == 8
    assert "[pipeline] eval: running (evaluate.sampling.seeds: [0, 1] -> [0])" in again
    assert f"[pipeline] report: running (input {root / 'eval' / 'summary.json'} was remade by `eval`)" in again
    assert json.loads((root / "eval" / "summary.json").read_text())["results"]["dqo"]["synthetic sample"]["seeds"] == 1
    assert re.fullmatch(LAST_LINE, again.strip().splitlines()[-1])
