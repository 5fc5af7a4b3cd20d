"""A shortened `make demo`: every stage runs, in order, and its output is consistent."""

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


def test_short_demo_end_to_end(tmp_path):
    root = tmp_path / "demo"
    cmd = [
        sys.executable, "-m", "dqo_verl.demo", "--root", str(root), "--sft-steps", "40", "--sft-problems", "1280",
        "--sft-check-every", "20", "--sft-check-from", "20", "--sft-target", "0", "--dev-problems", "20",
        "dataset.limit=16", "rollout.n=4", "rollout.max_tokens=64", "process.k=2", "evaluate.datasets.synthetic.limit=24",
        "evaluate.sampling.seeds=[0,1]", "evaluate.max_tokens=64", "trainer.logger=[console]",
    ]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    last = out.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"demo: greedy accuracy base=\d\.\d\d dqo=\d\.\d\d \(n=24 test problems\)", last), last

    # the warm-up stops at the first dev check that reaches the target (0 here: the first)
    assert "[sft] step 20: greedy accuracy" in out.stdout and "over 20 steps" in out.stdout
    data = root / "data"
    questions = {name: {m[0]["content"] for m in pd.read_parquet(data / f"{name}.parquet")["prompt"]} for name in ("dev", "sft")}
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
    assert (run / "checkpoints" / f"global_step_{step}" / "value" / "huggingface" / "model.safetensors").exists()

    summary = json.loads((root / "eval" / "summary.json").read_text())["results"]
    assert set(summary) == {"base", "dqo"}
    assert summary["dqo"]["synthetic sample"]["seeds"] == 2
    assert "| dqo" in (root / "eval" / "table.md").read_text()
    assert (root / "value_curves.png").read_bytes()[:4] == b"\x89PNG"

    # a rerun reuses every finished stage
    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0
    assert again.stdout.count("done already") == 10 and again.stdout.strip().splitlines()[-1] == last
