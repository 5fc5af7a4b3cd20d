"""A rehearsal of the paper's own chain: the `qwen_numina` recipe, with tiny local stand-ins in the hub schemas of
Qwen2.5-Math-7B, QwQ-LongCoT-Verified-130K and NuminaMath-CoT (and MATH-500 for evaluation), runs
sft -> prompts -> corpus -> score -> train -> eval -> report through the pipeline runner on CPU. Only sizes and CPU
settings are overridden: the budget (1,024 + 3,072 = the stand-in's 4,096 context), the Olympiad filter, the
epoch-1 export and the SFT export as policy, value and reference are the recipe's own."""

import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from data_prep import synthetic
from data_prep.tiny_model import build_tiny_policy
from dqo_verl import main
from dqo_verl.config.compose import compose_config
from dqo_verl.config.errors import InputError

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
FP32 = "{param_dtype:fp32,reduce_dtype:fp32,buffer_dtype:fp32}"


def boxed(solution: str) -> str:
    """A synthetic gold solution with its answer in \\boxed{} (Numina's and QwQ's answer format)."""
    body, answer = solution.rsplit("#### ", 1)
    return f"{body}The answer is $\\boxed{{{answer.strip()}}}$."


def stand_ins(root: Path) -> dict[str, Path]:
    """Local files in the hub datasets' schemas and a tiny model with Qwen2.5-Math-7B's 4,096-token context."""
    problems = synthetic.make_problems(80, seed=3)
    qwq = [{"problem": p["question"], "qwq": boxed(p["solution"]), "source": "numina"} for p in problems[:38]]
    qwq += [{"problem": "Prove it.", "qwq": "Let us think. " * 230, "source": "numina"}] * 2  # 3,220 tokens: dropped
    numina = [
        {
            "source": "olympiads" if i % 5 < 3 else "cn_k12",
            "problem": p["question"],
            "solution": boxed(p["solution"]),
            "messages": [{"role": "user", "content": p["question"]}, {"role": "assistant", "content": p["solution"]}],
        }
        for i, p in enumerate(problems[40:60])
    ]
    numina[0]["solution"] = "A proof, with no final answer."  # an olympiad row without a usable answer: skipped
    math500 = [
        {"problem": p["question"], "solution": boxed(p["solution"]), "answer": p["answer"]} for p in problems[60:]
    ]
    files = {"qwq": root / "qwq" / "train.parquet", "numina": root / "numina", "math500": root / "math500.parquet"}
    for path, rows in ((files["qwq"], qwq), (files["numina"] / "train.parquet", numina), (files["math500"], math500)):
        path.parent.mkdir(parents=True, exist_ok=True)
        pd.DataFrame(rows).to_parquet(path)
    files["base"] = build_tiny_policy(root / "Qwen2.5-Math-7B", seed=0, num_layers=2, max_position_embeddings=4096)
    return files


def overrides(root: Path, files: dict[str, Path]) -> list[str]:
    """The stand-ins, small sizes and CPU settings (fp32, one rank, one engine); nothing of the paper's choices."""
    run = root / "run"
    return [
        f"paths.root={run}",
        f"paths.assets={run}/assets",
        f"paths.data={run}/data",
        f"sft_stage.model={files['base']}",
        f"sft_stage.data.path={files['qwq']}",
        "sft_stage.data.n=40",
        "sft_stage.batch_size=8",
        "sft_stage.epochs=1",
        "sft_stage.lr=2e-3",
        f"dataset.path={files['numina']}",
        "dataset.limit=8",
        "rollout.n=4",
        "rollout.max_tokens=48",
        "rollout.dtype=float32",
        "rollout.enforce_eager=true",
        "rollout.engines_per_node=1",
        "rollout.backend=hf",
        "rollout.kv_cache_memory_bytes=67108864",
        "rollout.max_num_seqs=32",
        "trainer.n_gpus_per_node=1",
        "trainer.total_epochs=2",
        "trainer.logger=[console]",
        "data.train_batch_size=16",
        "ref.batch_size=64",
        *[
            f"{role}.{key}"
            for role in ("policy", "value")
            for key in (
                "engine.micro_batch_size_per_gpu=8",
                "engine.infer_micro_batch_size_per_gpu=8",
                "model.enable_gradient_checkpointing=false",
                "model.use_remove_padding=false",
            )
        ],
        *[f"+{role}.engine.mixed_precision={FP32}" for role in ("policy", "value")],
        "evaluate.sets=[math500]",
        f"evaluate.datasets.math500.path={files['math500']}",
        "evaluate.datasets.math500.limit=8",
        "evaluate.max_tokens=48",
        "evaluate.sampling.seeds=[0]",
    ]


def run(module: str, args: list[str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", module, "+recipe=qwen_numina", *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)


def test_qwen_numina_rehearsal_on_cpu(tmp_path):
    files = stand_ins(tmp_path)
    args = overrides(tmp_path, files)
    out = run("dqo_verl.pipeline", args)
    assert out.returncode == 0, out.stdout[-5000:] + out.stderr[-5000:]
    log = out.stdout
    assert "[pipeline] stages: sft -> prompts -> corpus -> score -> train -> eval -> report" in log
    times = dict(re.findall(r"\[pipeline\] (\w+): (\d+)s ->", log))
    assert list(times) == ["sft", "prompts", "corpus", "score", "train", "eval", "report"]
    print("stage seconds:", times)

    # sft: the over-long trajectories are dropped and counted; the export is the policy, value and reference
    assert (
        "[sft] 2 of 40 trajectories dropped as longer than the budget (0 prompts > data.max_prompt_length=1024, "
        "2 responses > data.max_response_length=3072 tokens)" in log
    )
    assert "[sft] 38 trajectories" in log and "over 4 steps" in log  # 38 // 8 updates
    qwq = tmp_path / "run" / "assets" / "qwen2.5-qwq"
    tuned, base = load_file(qwq / "model.safetensors"), load_file(files["base"] / "model.safetensors")
    assert not torch.equal(tuned["model.embed_tokens.weight"], base["model.embed_tokens.weight"])
    assert (tmp_path / "run" / "assets" / "sft_run" / "checkpoints" / "latest_checkpointed_iteration.txt").exists()

    # prompts: the Olympiad problems, a seeded sample of them
    assert "[prompts] 20 rows read, 8 from other sources than olympiads" in log
    assert "[prompts] 8 prompts (1 rows without a usable answer skipped)" in log
    prompts = pd.read_parquet(tmp_path / "run" / "data" / "prompts.parquet")
    numina = pd.read_parquet(files["numina"] / "train.parquet")
    olympiad = set(numina.loc[numina["source"] == "olympiads", "problem"])
    assert len(prompts) == 8 and {e["question"] for e in prompts["extra_info"]} <= olympiad

    # corpus and training: 8 x 4 responses by Qwen2.5-QwQ; two epochs of 2 updates, epoch 1 exported
    corpus = pd.read_parquet(tmp_path / "run" / "data" / "corpus.parquet")
    assert len(corpus) == 32 and set(corpus["score"]) <= {0.0, 1.0}
    assert "[export] epoch 1 (step 2)" in log
    checkpoints = tmp_path / "run" / "run" / "checkpoints"
    epoch1 = load_file(checkpoints / "global_step_2" / "policy" / "huggingface" / "model.safetensors")
    exported = load_file(tmp_path / "run" / "run" / "export" / "policy" / "model.safetensors")
    last = load_file(checkpoints / "global_step_4" / "policy" / "huggingface" / "model.safetensors")
    assert all(torch.equal(exported[k], epoch1[k]) for k in epoch1)
    assert not all(torch.equal(last[k], epoch1[k]) for k in epoch1)

    # eval: the base row is Qwen2.5-QwQ (the SFT export), against the exported DQO policy
    table = (tmp_path / "run" / "eval" / "table.md").read_text()
    assert "| base " in table and "| dqo " in table and "math500 greedy" in table

    # the budget: one more response token than the stand-in's context allows is refused before any worker starts
    with pytest.raises(InputError) as err:
        main.run(compose_config("qwen_numina", [*args, "data.max_response_length=3073"]))
    assert str(err.value) == (
        "dqo training: the context budget data.max_prompt_length (1024) + data.max_response_length (3073) = "
        f"4097 tokens exceeds the context of policy.model.path ({qwq}): max_position_embeddings 4096. "
        "Lower them so that they total at most 4096"
    )
