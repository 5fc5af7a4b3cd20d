"""The training driver end to end: Ray groups of 2 ranks, DQO losses, reference cache, checkpoints, export."""

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from dqo_verl.main import compose_config
from dqo_verl.trainer import DQOTrainer

pytestmark = pytest.mark.slow


def config(tiny_models, corpus, out, *extra):
    policy, value = tiny_models
    return compose_config(
        "tiny_cpu",
        [
            f"data.train_files={corpus}",
            f"policy.model.path={policy}",
            f"value.model.path={value}",
            f"trainer.output_dir={out}",
            "data.train_batch_size=32",
            "policy.engine.micro_batch_size_per_gpu=8",
            "policy.engine.infer_micro_batch_size_per_gpu=8",
            "value.engine.micro_batch_size_per_gpu=8",
            "value.engine.infer_micro_batch_size_per_gpu=8",
            "trainer.logger=[console]",
            *extra,
        ],
    )


def train(cfg):
    trainer = DQOTrainer(cfg)
    try:
        trainer.fit()
        return trainer.history
    finally:
        trainer.shutdown()


def private_copy(corpus, tmp_path):
    """The corpus in a folder of the test's own, so its reference cache starts absent."""
    path = tmp_path / "data" / "corpus.parquet"
    path.parent.mkdir()
    shutil.copy(corpus, path)
    return path


def test_dqo_training_end_to_end(ray_session, tiny_models, tiny_corpus, tmp_path, capsys):
    out = tmp_path / "run"
    tiny_corpus = private_copy(tiny_corpus, tmp_path)
    cache = tiny_corpus.with_name("corpus.ref.parquet")
    cfg = config(
        tiny_models, tiny_corpus, out,
        "trainer.total_epochs=6", "algorithm.lam=0.5", "policy.optim.lr=3e-3", "value.optim.lr=3e-3",
    )
    history = train(cfg)
    printed = capsys.readouterr().out

    # the reference group ran once and wrote the cache, which equals the initial policy's log-probs
    assert "[ref] computing reference log-probs of 64 responses" in printed
    cached = pd.read_parquet(cache)
    corpus = pd.read_parquet(tiny_corpus)
    assert len(cached) == len(corpus)
    assert all(len(r) == len(lp) for r, lp in zip(cached["response_ids"], cached["ref_logprobs"]))
    assert np.isfinite(np.concatenate(cached["ref_logprobs"].to_list())).all()
    assert abs(history[0]["dqo/kl_seq_mean"]) < 1e-4  # policy == reference before the first update

    # 64 rows / 32 = 2 updates per epoch, 6 epochs; both losses fall
    assert len(history) == 12
    for key in ("value/loss", "policy/loss"):
        first, last = np.mean([h[key] for h in history[:2]]), np.mean([h[key] for h in history[-2:]])
        assert last < 0.5 * first, (key, first, last)
    assert all(np.isfinite(h["policy/grad_norm"]) and h["policy/grad_norm"] > 0 for h in history)

    # a checkpoint per epoch (policy, value, optimizer, data position), tracker last
    ckpts = out / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("global_step_*")) == sorted(f"global_step_{2 * e}" for e in range(1, 7))
    assert (ckpts / "latest_checkpointed_iteration.txt").read_text() == "12"
    last = ckpts / "global_step_12"
    for part in ("policy", "value"):
        assert (last / part / "model_world_size_2_rank_1.pt").exists()
        assert (last / part / "optim_world_size_2_rank_0.pt").exists()
    assert json.loads((last / "trainer_state.json").read_text())["global_step"] == 12
    assert not list(ckpts.glob(".*tmp"))

    # the exported policy loads in transformers, differs from the start, and tokenizes the same way
    export = out / "export" / "policy"
    model = AutoModelForCausalLM.from_pretrained(export)
    assert model.dtype == torch.float32  # the weights as trained, not downcast
    start = load_file(tiny_models[0] / "model.safetensors")
    trained = model.state_dict()
    assert start.keys() <= trained.keys()
    assert any(not torch.allclose(trained[k], start[k]) for k in start)
    assert AutoTokenizer.from_pretrained(export)("a\n\nb")["input_ids"] == AutoTokenizer.from_pretrained(tiny_models[0])(
        "a\n\nb"
    )["input_ids"]


def test_reference_cache_is_reused(ray_session, tiny_models, tiny_corpus, tmp_path, capsys):
    tiny_corpus = private_copy(tiny_corpus, tmp_path)
    cache = tiny_corpus.with_name("corpus.ref.parquet")
    train(config(tiny_models, tiny_corpus, tmp_path / "first", "trainer.total_training_steps=1"))
    assert "computing reference" in capsys.readouterr().out
    stamp = cache.stat().st_mtime_ns
    capsys.readouterr()
    history = train(config(tiny_models, tiny_corpus, tmp_path / "again", "trainer.total_training_steps=1"))
    printed = capsys.readouterr().out
    assert "[ref] reusing cached reference log-probs" in printed
    assert "computing reference" not in printed
    assert cache.stat().st_mtime_ns == stamp
    assert len(history) == 1 and abs(history[0]["dqo/kl_seq_mean"]) < 1e-4


def bare_dqo_step(cfg, rows):
    """algo.py on plain transformers models in this process: losses and gradient norms of one update."""
    from transformers import AutoModelForTokenClassification

    from dqo_verl import algo
    from dqo_verl.data import BatchSpec, build_batch

    policy = AutoModelForCausalLM.from_pretrained(cfg.policy.model.path, dtype=torch.float32, attn_implementation="eager")
    value = AutoModelForTokenClassification.from_pretrained(cfg.value.model.path, dtype=torch.float32, attn_implementation="eager")
    b = build_batch(rows, BatchSpec(pad_token_id=0, granularity=cfg.algorithm.granularity))

    def response_outputs(model, kind):
        out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], position_ids=b["position_ids"]).logits
        out = out[:, b["prompts"].shape[1] - 1 : -1]
        if kind == "values":
            return out.squeeze(-1)
        return torch.log_softmax(out, -1).gather(-1, b["responses"].unsqueeze(-1)).squeeze(-1)

    mask, ends, a = b["response_mask"].bool(), b["action_ends"], cfg.algorithm
    log_ratio = torch.where(mask, response_outputs(policy, "log_probs") - b["ref_logprobs"], 0.0)
    values = response_outputs(value, "values")
    a_lr, a_r = algo.collapse_to_actions(log_ratio, ends), algo.collapse_to_actions(b["rewards"], ends)
    a_v, a_m = algo.values_at_action_starts(values, ends), algo.action_mask(ends)
    returns = algo.compute_lambda_returns(a_r, a_lr, a_v, a_m, a.beta, a.lam)
    weights = algo.compute_is_weights(a_lr, a_m, a.is_log_clip)
    p_loss, _ = algo.dqo_policy_loss(a_lr, a_v.detach(), a_r, returns, weights, a_m, a.beta)
    v_loss, _ = algo.dqo_value_loss(a_v, returns, weights, a_m)
    (p_loss + v_loss).backward()
    norm = lambda m: torch.sqrt(sum((p.grad**2).sum() for p in m.parameters() if p.grad is not None)).item()  # noqa: E731
    return {"policy/loss": p_loss.item(), "value/loss": v_loss.item(), "policy/grad_norm": norm(policy), "value/grad_norm": norm(value)}


@pytest.mark.parametrize("granularity,lam", [("token", 0.5), ("step", 1.0)])
def test_worker_update_equals_bare_algo(ray_session, tiny_models, tiny_corpus, tmp_path, granularity, lam):
    """One update through the 2-rank FSDP groups computes what algo.py computes on plain transformers."""
    cfg = config(tiny_models, private_copy(tiny_corpus, tmp_path), tmp_path / "run",
                 f"algorithm.granularity={granularity}", f"algorithm.lam={lam}")
    trainer = DQOTrainer(cfg)
    try:
        rows = trainer.corpus.iloc[:32]
        got = trainer.train_step(rows, 0)
    finally:
        trainer.shutdown()
    want = bare_dqo_step(cfg, rows)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-4), key
