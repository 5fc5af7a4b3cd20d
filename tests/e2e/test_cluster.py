"""Cluster use on a throw-away 2-node Ray cluster: `ray job submit`, a killed worker, exact resume; the data stages
streaming over both nodes, resumed after a SIGKILLed driver and surviving a lost node. Each test stops only the
processes its cluster started."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from ray_cluster import LocalRayCluster
from safetensors.torch import load_file

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    # a short folder: Ray's unix sockets under <temp dir>/session_<date>_<pid>/sockets/ must stay within 107
    # bytes, which pytest's own temp folders exceeded once their numbers and the pids grew
    root = Path(tempfile.mkdtemp(prefix="rc"))
    c = LocalRayCluster(root, num_nodes=2, cpus_per_node=4)
    try:
        yield c
    finally:
        c.stop()
        shutil.rmtree(root, ignore_errors=True)


def overrides(tiny_models, corpus, out, *extra):
    policy, value = tiny_models
    return [
        "+recipe=tiny_cpu",
        f"data.train_files={corpus}",
        f"policy.model.path={policy}",
        f"value.model.path={value}",
        f"trainer.output_dir={out}",
        "trainer.nnodes=2",
        "trainer.n_gpus_per_node=1",
        "trainer.logger=[console]",
        *extra,
    ]


# 16 responses per update over 2 ranks: micro-batches of 8
MICRO_BATCHES_OF_8 = [
    f"{role}.engine.{key}=8"
    for role in ("policy", "value")
    for key in ("micro_batch_size_per_gpu", "infer_micro_batch_size_per_gpu")
]


def driver_env(cluster):
    return {**cluster.env, "PYTHONUNBUFFERED": "1"}


def start_driver(cluster, args, log: Path, module: str = "dqo_verl.main") -> subprocess.Popen:
    cmd = [sys.executable, "-m", module, *args, f"ray_init.address={cluster.address}"]
    return subprocess.Popen(
        cmd, cwd=REPO, env=driver_env(cluster), stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True
    )


def wait_for(predicate, timeout=300, proc=None, what=""):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"driver exited ({proc.returncode}) before {what}")
        time.sleep(0.05)
    raise TimeoutError(what)


def tracker_step(out: Path) -> int | None:
    tracker = out / "checkpoints" / "latest_checkpointed_iteration.txt"
    try:
        return int(tracker.read_text())
    except (FileNotFoundError, ValueError):
        return None


def weights(out: Path, step: int) -> dict:
    return {
        part: load_file(out / "checkpoints" / f"global_step_{step}" / part / "huggingface" / "model.safetensors")
        for part in ("policy", "value")
    }


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def training_worker_pids(cluster) -> list[int]:
    """The processes of the policy and value models (colocated: one per rank) of the one run on the cluster."""
    out = cluster._ray("list", "actors", f"--address={cluster.dashboard_url}", "--format=json", "--limit=1000").stdout
    return [
        a["pid"]
        for a in json.loads(out)
        if (a.get("name") or "").startswith("dqo_policy_value_") and a["state"] == "ALIVE"
    ]


def test_a_killed_worker_stops_the_driver_then_the_run_resumes_bit_exact_beside_a_submitted_job(
    cluster, tiny_models, tiny_corpus, tmp_path
):
    """A run whose worker is killed mid-run stops naming the group, its last checkpoint whole; rerun, it resumes
    and ends with the same weights, data order and losses as the same run made straight through `ray job submit`."""
    # 64 rows / 16 = 4 updates in one epoch; checkpoints every 2 updates, keep 1
    common = [
        "data.train_batch_size=16",
        "trainer.total_epochs=1",
        "trainer.save_freq=2",
        "trainer.max_ckpt_to_keep=1",
        *MICRO_BATCHES_OF_8,
    ]
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    log = tmp_path / "broken1.log"
    proc = start_driver(cluster, overrides(tiny_models, tiny_corpus, broken, *common), log)
    try:
        wait_for(lambda: (broken / "metrics.jsonl").exists(), proc=proc, what="the first update")
        pids = training_worker_pids(cluster)  # the groups of this run only: nothing else runs yet
        assert len(pids) == 2
        wait_for(lambda: tracker_step(broken) == 2, proc=proc, what="the step-2 checkpoint")
        os.kill(pids[1], signal.SIGKILL)  # mid-epoch, in update 3 of 4 (or, on a slow machine, a later step)
        code = proc.wait(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = log.read_text()
    assert code != 0
    # the kill lands during an update or while a checkpoint is written
    assert re.search(r"error: worker group '(policy|value)' failed at step \d+(, saving \S+)?: \w*Error", text), text[
        -3000:
    ]
    step = tracker_step(broken)
    assert step is not None and step >= 2
    last = broken / "checkpoints" / f"global_step_{step}"
    assert json.loads((last / "trainer_state.json").read_text())["global_step"] == step
    for part in ("policy", "value"):
        assert len(list((last / part).glob("model_world_size_2_rank_*.pt"))) == 2
        assert (last / part / "huggingface" / "model.safetensors").exists()

    # the straight run submitted as a job, the broken one resumed beside it
    job = cluster.submit(
        ["python", "-m", "dqo_verl.main", *overrides(tiny_models, tiny_corpus, straight, *common)], working_dir=REPO
    )
    resumed = subprocess.run(
        [
            sys.executable,
            "-m",
            "dqo_verl.main",
            *overrides(tiny_models, tiny_corpus, broken, *common),
            f"ray_init.address={cluster.address}",
        ],
        cwd=REPO,
        env=driver_env(cluster),
        capture_output=True,
        text=True,
    )
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert "[resume]" in resumed.stdout and f"global_step_{step} (global step {step})" in resumed.stdout
    status, logs = cluster.wait_job(job)
    assert status == "SUCCEEDED", logs[-3000:]
    assert "[pool] 2 ranks on 2 node(s) (cpu)" in logs
    assert (straight / "export" / "policy" / "model.safetensors").exists()
    assert tracker_step(straight) == 4

    a, b = weights(straight, 4), weights(broken, 4)
    for part in ("policy", "value"):
        assert a[part].keys() == b[part].keys()
        for name in a[part]:
            assert torch.equal(a[part][name], b[part][name]), (part, name)
    # the data order continued where it stopped: same batches, each update once
    ra, rb = records(straight), records(broken)
    assert [r["step"] for r in rb] == list(range(1, 5))
    assert [(r["epoch"], r["batch"], r["rows_sha1"]) for r in rb] == [
        (r["epoch"], r["batch"], r["rows_sha1"]) for r in ra
    ]
    assert [r["policy/loss"] for r in rb] == [r["policy/loss"] for r in ra]
    # keep-last-1 pruning; nothing half-written left behind
    assert [p.name for p in (broken / "checkpoints").glob("global_step_*")] == ["global_step_4"]
    assert not list((broken / "checkpoints").glob(".*"))


# ---- the data stages on the two nodes (last in this file: it takes a node away)


PIPELINE = "dqo_verl.pipeline"


def stage_args(policy, root: Path, *extra: str) -> list[str]:
    """The corpus and score stages of the tiny recipe on a given policy (no warm-up, no value model): 12 prompts
    x 4 samples, a prompt per shard, one HF engine per node; 8 responses per graded shard."""
    return [
        "+recipe=tiny_cpu",
        f"paths.root={root}",
        "sft_stage=null",
        "models.base=null",
        "models.value=null",
        f"policy.model.path={policy}",
        "rollout.backend=hf",
        "rollout.n=4",
        "rollout.max_tokens=48",
        "rollout.shard_prompts=1",
        "rollout.engines_per_node=1",
        "trainer.nnodes=2",
        "score.shard_rows=8",
        *extra,
    ]


def shards_by_node(stage: str, text: str) -> dict[str, int]:
    """{node: shards} from a stage's `[stage] N shards (node a: n, node b: m); ...` line."""
    line = re.search(rf"\[{stage}\] \d+ shards \(([^)]*)\)", text)
    assert line, text[-3000:]
    return {node: int(n) for node, n in re.findall(r"node (\w+): (\d+)", line.group(1))}


def test_data_stages_stream_over_both_nodes_resume_after_a_kill_and_survive_a_lost_node(cluster, tiny_models, tmp_path):
    from transformers import AutoTokenizer

    from data_prep.sources import build_synthetic_prompts
    from dqo_verl.data.chat import add_prompt_ids
    from dqo_verl.data.io import write_parquet_atomic

    policy, root = tiny_models[0], tmp_path / "root"
    data = root / "data"
    prompts = add_prompt_ids(build_synthetic_prompts(12, seed=0), AutoTokenizer.from_pretrained(policy))
    write_parquet_atomic(prompts, data / "prompts.parquet")
    shards = data / "samples_shards"

    def written():
        return {p.name: p.stat().st_mtime_ns for p in shards.glob("part-*.parquet")}

    # the driver killed midway through the corpus
    args = stage_args(policy, root, "pipeline.stages=[corpus]")
    proc = start_driver(cluster, args, tmp_path / "killed.log", PIPELINE)
    wait_for(lambda: len(written()) >= 2, proc=proc, what="two corpus shards")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = written()
    assert 2 <= len(before) < 12, (tmp_path / "killed.log").read_text()[-2000:]

    # rerun: the missing shards only, then grading; each stage's work on both nodes
    rerun = subprocess.run(
        [
            sys.executable,
            "-m",
            "dqo_verl.pipeline",
            *stage_args(policy, root, "pipeline.stages=[corpus,score]"),
            f"ray_init.address={cluster.address}",
        ],
        cwd=REPO,
        env=driver_env(cluster),
        capture_output=True,
        text=True,
        timeout=600,
    )
    print(rerun.stdout[-4000:])  # the stages' lines, shards per node among them, in the test's output
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    corpus_nodes, score_nodes = shards_by_node("corpus", rerun.stdout), shards_by_node("score", rerun.stdout)
    assert len(corpus_nodes) == 2 and sum(corpus_nodes.values()) == 12 - len(before)
    assert len(score_nodes) == 2 and sum(score_nodes.values()) == 6
    assert {name: written()[name] for name in before} == before  # finished shards were not redone
    samples = pd.read_parquet(data / "samples.parquet")
    assert [(u, k) for u, k in zip(samples["uid"], samples["sample"])] == [(u, k) for u in range(12) for k in range(4)]
    scored = pd.read_parquet(data / "corpus.parquet", columns=["uid", "sample", "score"])
    assert scored[["uid", "sample"]].equals(samples[["uid", "sample"]]) and scored["score"].isin([0.0, 1.0]).all()

    # the corpus made again, and a node lost midway: its engine's shard is retried on the other node
    log = tmp_path / "lost_node.log"
    args = stage_args(policy, root, "pipeline.stages=[corpus]", "pipeline.redo=corpus")
    proc = start_driver(cluster, args, log, PIPELINE)
    wait_for(lambda: "[corpus] 12 prompts" in log.read_text() and len(written()) >= 1, proc=proc, what="a shard")
    cluster.kill_node("node1")
    try:
        code = proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = log.read_text()
    print(text[-3000:])
    assert code == 0, text[-3000:]
    again = pd.read_parquet(data / "samples.parquet")
    assert len(again) == 48 and again["response"].tolist() == samples["response"].tolist()  # seeded per sample
