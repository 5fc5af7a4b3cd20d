"""The training driver end to end: colocated Ray groups of 2 ranks, DQO losses, reference cache, checkpoints, export."""

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer
from verl.workers.utils.padding import left_right_2_no_padding

from dqo_verl.config.compose import compose_config
from dqo_verl.trainer import algo
from dqo_verl.trainer.batches import BatchSpec, build_batch
from dqo_verl.trainer.checkpoints import epoch_checkpoints
from dqo_verl.trainer.methods import DQOTrainer, make_trainer

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
    with make_trainer(cfg) as trainer:  # started, and shut down whatever happens
        trainer.fit()
        return trainer.history


def private_copy(corpus, tmp_path):
    """The corpus in a folder of the test's own, so its reference cache starts absent."""
    path = tmp_path / "data" / "corpus.parquet"
    path.parent.mkdir()
    shutil.copy(corpus, path)
    return path


@pytest.fixture(scope="module")
def e2e(ray_session, tiny_models, tiny_corpus, tmp_path_factory):
    """One DQO run of 6 epochs on a private corpus copy (its reference cache starts absent)."""
    import contextlib
    import io

    tmp = tmp_path_factory.mktemp("e2e")
    corpus = private_copy(tiny_corpus, tmp)
    out = tmp / "run"
    cfg = config(
        tiny_models,
        corpus,
        out,
        "trainer.total_epochs=6",
        "trainer.export_epoch=3",
        "algorithm.lam=0.5",
        "policy.optim.lr=3e-3",
        "value.optim.lr=3e-3",
    )
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        history = train(cfg)
    return {"history": history, "printed": printed.getvalue(), "corpus": corpus, "out": out, "tmp": tmp}


def test_dqo_training_end_to_end(e2e, tiny_models):
    history, printed, out = e2e["history"], e2e["printed"], e2e["out"]
    # the initial policy computed the reference cache before its first update
    assert "[ref] computing reference log-probs of 64 responses with the initial policy" in printed
    cached = pd.read_parquet(e2e["corpus"].with_name("corpus.ref"))  # its shards, in row order
    corpus = pd.read_parquet(e2e["corpus"])
    assert len(cached) == len(corpus)
    assert all(len(r) == len(lp) for r, lp in zip(corpus["response_ids"], cached["ref_logprobs"]))
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
    assert (
        AutoTokenizer.from_pretrained(export)("a\n\nb")["input_ids"]
        == AutoTokenizer.from_pretrained(tiny_models[0])("a\n\nb")["input_ids"]
    )
    assert (out / "export" / "value" / "model.safetensors").exists()  # every model is exported

    # trainer.export_epoch=3: the export is epoch 3's checkpoint (step 6), not the last one
    assert "[export] epoch 3 (step 6)" in printed
    epoch3 = load_file(ckpts / "global_step_6" / "policy" / "huggingface" / "model.safetensors")
    last = load_file(ckpts / "global_step_12" / "policy" / "huggingface" / "model.safetensors")
    exported = load_file(export / "model.safetensors")
    assert all(torch.equal(exported[k], epoch3[k]) for k in epoch3)
    assert any(not torch.equal(exported[k], last[k]) for k in last)
    assert list(epoch_checkpoints(ckpts)) == [1, 2, 3, 4, 5, 6]


def test_reference_cache_is_reused_while_corpus_reference_and_limits_stay(e2e, tiny_models, tmp_path, capsys):
    from dqo_verl.trainer import ref_cache

    cache = e2e["corpus"].with_name("corpus.ref")
    stamp = [p.stat().st_mtime_ns for p in sorted(cache.iterdir())]
    cfg = config(tiny_models, e2e["corpus"], tmp_path / "again")
    corpus = pd.read_parquet(e2e["corpus"])
    capsys.readouterr()
    # the same corpus, reference and limits: read back, no group needed
    rows = make_trainer(cfg).corpus
    ref_cache.attach_ref_logprobs(rows, e2e["corpus"], cfg, pool=None, policy=None, reference=None, pad_token_id=0)
    assert "[ref] reusing cached reference log-probs" in capsys.readouterr().out
    assert [p.stat().st_mtime_ns for p in sorted(cache.iterdir())] == stamp
    reused = rows.read(np.arange(len(rows)))
    assert reused["ref_logprobs"].map(len).equals(corpus["response_ids"].map(len))
    # other length limits: recomputed (here the check stops before any group would start)
    other_limits = config(tiny_models, e2e["corpus"], tmp_path / "x", "data.max_response_length=150")
    assert ref_cache.fingerprint(other_limits, e2e["corpus"], 64) != ref_cache.fingerprint(cfg, e2e["corpus"], 64)


def bare_dqo_step(cfg, rows):
    """algo.py on plain transformers models in this process: losses and gradient norms of one update."""
    from transformers import AutoModelForTokenClassification

    policy = AutoModelForCausalLM.from_pretrained(
        cfg.policy.model.path, dtype=torch.float32, attn_implementation="eager"
    )
    value = AutoModelForTokenClassification.from_pretrained(
        cfg.value.model.path, dtype=torch.float32, attn_implementation="eager"
    )
    if cfg.value.zero_head:
        with torch.no_grad():
            value.score.weight.zero_()
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
    t = algo.dqo_targets(log_ratio, values, b["rewards"], ends, a.beta, a.lam, a.is_log_clip, a.is_weight_form)
    p_loss, _ = algo.dqo_policy_loss(
        algo.collapse_to_actions(log_ratio, ends),
        t.values,
        t.rewards,
        t.returns,
        t.weights,
        t.mask,
        a.beta,
        loss_agg_mode=a.policy_loss_agg,
    )
    if a.kl_coef:
        p_loss = p_loss + a.kl_coef * algo.aggregate(
            algo.token_kl(log_ratio, mask, a.kl_estimator), mask, a.policy_loss_agg
        )
    v_loss, _ = algo.dqo_value_loss(
        algo.values_at_action_starts(values, ends), t.returns, t.weights, t.mask, loss_agg_mode=a.value_loss_agg
    )
    (p_loss + v_loss).backward()
    norm = lambda m: torch.sqrt(sum((p.grad**2).sum() for p in m.parameters() if p.grad is not None)).item()  # noqa: E731
    return {
        "policy/loss": p_loss.item(),
        "value/loss": v_loss.item(),
        "policy/grad_norm": norm(policy),
        "value/grad_norm": norm(value),
    }


# lambda < 1 with step actions, a reference model of its own and the controls away from the paper's (per-response
# loss aggregation, a token-level KL, length-normalised weights), and token actions with a zeroed head (the
# lambda-returns of each granularity and the controls' formulas are checked against loops in test_algo)
CONTROLS = [
    "algorithm.policy_loss_agg=seq-mean-token-mean",
    "algorithm.value_loss_agg=seq-mean-token-sum",
    "algorithm.kl_coef=0.5",
    "algorithm.is_weight_form=length-normalized",
]


@pytest.mark.parametrize(
    "granularity,lam,zero_head,own_reference", [("step", 0.5, False, True), ("token", 1.0, True, False)]
)
def test_worker_update_equals_bare_algo(e2e, tiny_models, tmp_path, capsys, granularity, lam, zero_head, own_reference):
    """One update through the 2-rank FSDP groups computes what algo.py computes on plain transformers."""
    extra = [f"algorithm.granularity={granularity}", f"algorithm.lam={lam}", f"value.zero_head={zero_head}"]
    extra += CONTROLS if own_reference else []
    if own_reference:  # a reference that is not the initial policy (same weights, another folder)
        ref_copy, other_cache = tmp_path / "ref", tmp_path / "other_ref"
        shutil.copytree(tiny_models[0], ref_copy)
        extra += [f"ref.path={ref_copy}", f"data.ref_cache_dir={other_cache}"]
    cfg = config(tiny_models, e2e["corpus"], tmp_path / "run", *extra)
    with DQOTrainer(cfg) as trainer:
        rows = trainer.corpus.read(np.arange(32))
        got = trainer.train_step(rows, 0)
    printed = capsys.readouterr().out
    if own_reference:  # computed by a forward-only group: the same log-probs as the initial policy's in the e2e run
        assert f"[ref] computing reference log-probs of 64 responses with {ref_copy}" in printed
        ours = np.concatenate(pd.read_parquet(other_cache)["ref_logprobs"].to_list())
        theirs = np.concatenate(pd.read_parquet(e2e["corpus"].with_name("corpus.ref"))["ref_logprobs"].to_list())
        assert np.abs(ours - theirs).max() < 1e-5
    else:
        assert "[ref] reusing cached reference log-probs" in printed  # a second run reuses the e2e run's cache
    # the tiny value model's head is random: zeroed, V is exactly 0 on every state before the first update
    assert (got["value/values_mean"] == 0.0) == zero_head
    want = bare_dqo_step(cfg, rows)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-4), key


def baseline_loss(cfg, b, log_probs: torch.Tensor) -> torch.Tensor:
    """The baseline method's loss of a batch from its per-token log-probs [B, T]."""
    mask, a = b["response_mask"].bool(), cfg.algorithm
    if a.name == "rs":  # mean NLL of the response tokens
        return -torch.where(mask, log_probs, 0.0).sum() / mask.sum()
    r = torch.where(mask, log_probs - b["ref_logprobs"], 0.0).sum(dim=1)
    if a.name == "dpo":
        return algo.dpo_loss(r[0::2], r[1::2], a.beta)[0]
    z0 = algo.kto_reference_point(r[1::2])
    good = b["rewards"][0::2].sum(dim=1) > 0.5
    return algo.kto_loss(r[0::2], good, z0, a.beta, a.kto.desirable_weight, a.kto.undesirable_weight)[0]


def bare_baseline_step(cfg, rows):
    """The baseline method's loss on plain transformers in this process: its value and gradient norm."""
    policy = AutoModelForCausalLM.from_pretrained(
        cfg.policy.model.path, dtype=torch.float32, attn_implementation="eager"
    )
    b = build_batch(rows, BatchSpec(pad_token_id=0))
    logits = policy(input_ids=b["input_ids"], attention_mask=b["attention_mask"], position_ids=b["position_ids"]).logits
    log_probs = torch.log_softmax(logits[:, b["prompts"].shape[1] - 1 : -1], -1)
    loss = baseline_loss(cfg, b, log_probs.gather(-1, b["responses"].unsqueeze(-1)).squeeze(-1))
    loss.backward()
    norm = torch.sqrt(sum((p.grad**2).sum() for p in policy.parameters() if p.grad is not None)).item()
    return {"policy/loss": loss.item(), "policy/grad_norm": norm}


@pytest.mark.parametrize("method", ["rs", "dpo", "kto"])
def test_baseline_update_equals_its_loss_on_plain_transformers(e2e, tiny_models, tmp_path, method):
    """One update of each baseline through a 1-rank FSDP group: DPO and KTO step on the driver's per-response
    coefficients (the surrogate), which must carry the loss's own gradient."""
    cfg = config(
        tiny_models,
        e2e["corpus"],
        tmp_path / "run",
        f"algorithm.name={method}",
        "algorithm.beta=0.1",
        "algorithm.kto.undesirable_weight=1.5",
        "data.train_batch_size=16",
        "trainer.n_gpus_per_node=1",
        "policy.optim.lr=1e-3",
    )
    with make_trainer(cfg) as trainer:
        rows = trainer.corpus.read(np.arange(16 * trainer.unit_rows))
        got = trainer.train_step(rows, 0)
        batch = trainer.make_batch(rows)
        after = trainer.forward(left_right_2_no_padding(batch), ("policy",), 1)["policy"]
    want = bare_baseline_step(cfg, rows)
    assert want["policy/grad_norm"] > 0
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-4), key
    # and the step went down that gradient, not up it (a norm cannot tell)
    assert baseline_loss(cfg, batch, after).item() < got["policy/loss"]


def test_outcome_verifier_update_equals_its_loss_on_plain_transformers(e2e, tiny_models, tmp_path):
    """One update of the plain outcome verifier (the value model alone) through a 2-rank FSDP group: its loss and
    gradient norm are `algo.outcome_verifier_loss`'s on plain transformers (the zeroed head: V = 0 before it)."""
    from transformers import AutoModelForTokenClassification

    cfg = config(tiny_models, e2e["corpus"], tmp_path / "run", "algorithm.name=verifier", "value.zero_head=true")
    with make_trainer(cfg) as trainer:
        assert set(trainer.groups) == {"value"}
        rows = trainer.corpus.read(np.arange(32))
        got = trainer.train_step(rows, 0)
    value = AutoModelForTokenClassification.from_pretrained(
        cfg.value.model.path, dtype=torch.float32, attn_implementation="eager"
    )
    with torch.no_grad():
        value.score.weight.zero_()
    b = build_batch(rows, BatchSpec(pad_token_id=0))
    out = value(input_ids=b["input_ids"], attention_mask=b["attention_mask"], position_ids=b["position_ids"]).logits
    values = out[:, b["prompts"].shape[1] - 1 : -1].squeeze(-1)
    loss, _ = algo.outcome_verifier_loss(values, b["rewards"], b["response_mask"])
    loss.backward()
    norm = torch.sqrt(sum((p.grad**2).sum() for p in value.parameters() if p.grad is not None)).item()
    assert loss.item() == pytest.approx(float(rows["score"].mean()), rel=1e-6)  # V = 0: the mean of R^2 = R
    assert got["value/loss"] == pytest.approx(loss.item(), rel=1e-4)
    assert got["value/grad_norm"] == pytest.approx(norm, rel=1e-4) and norm > 0


def test_until_ends_a_run_between_checkpoints_with_a_checkpoint_there_and_a_resume_stops_at_once(
    e2e, tiny_models, tmp_path
):
    """`Trainer.fit(until=...)` (the warm-up's loss target): asked before every update, it ends the run at that
    step with a checkpoint and an export of it, where no checkpoint was due; a resume asks it first and stops."""
    out = tmp_path / "run"
    cfg = config(
        tiny_models,
        e2e["corpus"],
        out,
        "algorithm.name=sft",
        "data.train_batch_size=16",
        "trainer.n_gpus_per_node=1",
        "trainer.total_epochs=2",  # 8 updates, checkpoints at the epoch ends (4, 8) only
    )
    asked = []
    with make_trainer(cfg) as trainer:
        trainer.fit(until=lambda step: asked.append(step) or step == 3)
        assert asked == [0, 1, 2, 3] and len(trainer.history) == 3
        ckpts = out / "checkpoints"
        assert (ckpts / "latest_checkpointed_iteration.txt").read_text() == "3"
        assert [p.name for p in ckpts.glob("global_step_*")] == ["global_step_3"]
        saved = load_file(ckpts / "global_step_3" / "policy" / "huggingface" / "model.safetensors")
        exported = load_file(out / "export" / "policy" / "model.safetensors")
        assert all(torch.equal(exported[k], saved[k]) for k in saved)
        trainer.fit(until=lambda step: asked.append(step) or step >= 3)  # resumes from the checkpoint of step 3
    assert asked[4:] == [3] and len(trainer.history) == 3
    assert [p.name for p in ckpts.glob("global_step_*")] == ["global_step_3"]
