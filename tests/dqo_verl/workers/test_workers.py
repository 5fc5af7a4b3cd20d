"""Policy and value worker groups (2 ranks, FSDP2 on the CPU platform) against plain transformers."""

import pandas as pd
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForTokenClassification
from verl.utils import tensordict_utils as tu
from verl.workers.utils.padding import left_right_2_no_padding, no_padding_2_padding

from dqo_verl.config.compose import compose_config
from dqo_verl.trainer.batches import BatchSpec, build_batch
from dqo_verl.workers.groups import Role, make_resource_pool, release, release_pool, start_groups

pytestmark = pytest.mark.slow


def hf_response_outputs(model, batch, kind):
    """Per response token: log pi(a_t|s_t) or V(s_t), from an unpadded eager forward of each row."""
    out = torch.zeros(batch["responses"].shape, dtype=torch.float64)
    for i in range(batch["input_ids"].shape[0]):
        keep = batch["attention_mask"][i].bool()
        ids = batch["input_ids"][i][keep].unsqueeze(0)
        n_resp = int(batch["response_mask"][i].sum())
        n_prompt = ids.shape[1] - n_resp
        with torch.no_grad():
            logits = model(ids).logits[0].double()
        for t in range(n_resp):
            pos = n_prompt - 1 + t  # the state before response token t
            if kind == "log_probs":
                out[i, t] = torch.log_softmax(logits[pos], -1)[ids[0, pos + 1]]
            else:
                out[i, t] = logits[pos, 0]
    return out


# verl's unpadded path (use_remove_padding); the padded one, which tiny_cpu trains with, is checked through whole
# updates against plain transformers in test_train_e2e (test_worker_update_equals_bare_algo)
@pytest.mark.parametrize("use_remove_padding", [True])
def test_worker_log_probs_and_values_equal_transformers(ray_session, tiny_models, tiny_corpus, use_remove_padding):
    policy_path, value_path = tiny_models
    cfg = compose_config(
        "tiny_cpu",
        [
            f"policy.model.path={policy_path}",
            f"value.model.path={value_path}",
            f"policy.model.use_remove_padding={use_remove_padding}",
            f"value.model.use_remove_padding={use_remove_padding}",
            "policy.engine.infer_micro_batch_size_per_gpu=2",
            "value.engine.infer_micro_batch_size_per_gpu=2",
        ],
    )
    for role in (cfg.policy, cfg.value):
        role.model.override_config.attn_implementation = "sdpa"
    rows = pd.read_parquet(tiny_corpus).iloc[:8]
    batch = build_batch(rows, BatchSpec(pad_token_id=0))
    pool = make_resource_pool(1, 2, name="wtest")
    try:  # both models in one colocated process per rank
        groups = start_groups(
            pool,
            {"policy": Role("language_model", cfg.policy), "value": Role("value_model", cfg.value)},
            cfg.checkpoint,
        )
        td = left_right_2_no_padding(batch.copy())
        lp = tu.get(groups["policy"].infer(td, "in the test", calculate_entropy=False), "log_probs")
        v = tu.get(groups["value"].infer(td, "in the test"), "values")
        worker_lp = no_padding_2_padding(lp, td).double()
        worker_v = no_padding_2_padding(v, td).double()
        assert len({w for g in groups.values() for w in g.worker_group.workers}) == 2
        release(g.worker_group for g in groups.values())
    finally:
        release_pool(pool)
    mask = batch["response_mask"].bool()
    hf_policy = AutoModelForCausalLM.from_pretrained(policy_path, attn_implementation="eager").eval()
    hf_value = AutoModelForTokenClassification.from_pretrained(value_path, attn_implementation="eager").eval()
    want_lp = hf_response_outputs(hf_policy, batch, "log_probs")
    want_v = hf_response_outputs(hf_value, batch, "values")
    assert (worker_lp - want_lp)[mask].abs().max().item() < 1e-5
    assert (worker_v - want_v)[mask].abs().max().item() < 1e-5
    assert want_lp[mask].abs().min() > 1.0  # a random tiny model: real, non-trivial log-probs
