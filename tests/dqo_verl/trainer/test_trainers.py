"""The trainer family: `algorithm.name` picks the method; each declares its models, columns and batches."""

import numpy as np
import pandas as pd
import pytest
import torch

from dqo_verl.config.compose import compose_config
from dqo_verl.config.errors import InputError
from dqo_verl.data.pairs import preference_pairs
from dqo_verl.trainer.base import Trainer
from dqo_verl.trainer.batches import epoch_batches
from dqo_verl.trainer.methods import (
    TRAINERS,
    DPOTrainer,
    DQOTrainer,
    DROTrainer,
    KTOTrainer,
    RSTrainer,
    SFTTrainer,
    make_trainer,
)


def cfg(tiny_models, corpus, *extra):
    return compose_config(
        "tiny_cpu",
        [
            f"data.train_files={corpus}",
            f"policy.model.path={tiny_models[0]}",
            f"value.model.path={tiny_models[1]}",
            *extra,
        ],
    )


def test_algorithm_name_picks_the_trainer_and_its_granularity(tiny_models, tiny_corpus):
    assert set(TRAINERS) == {"dqo", "dro", "sft", "rs", "dpo", "kto", "verifier"}
    assert all(issubclass(t, Trainer) for t in TRAINERS.values())
    verifier = make_trainer(cfg(tiny_models, tiny_corpus, "algorithm.name=verifier"))
    assert verifier.roles == {"value": "value_model"} and not verifier.uses_reference
    dqo = make_trainer(cfg(tiny_models, tiny_corpus))
    assert type(dqo) is DQOTrainer and dqo.spec_granularity == "token"
    assert dqo.roles == {"policy": "language_model", "value": "value_model"} and dqo.uses_reference
    step = make_trainer(cfg(tiny_models, tiny_corpus, "algorithm.granularity=step"))
    assert step.spec_granularity == "step"
    dro = make_trainer(cfg(tiny_models, tiny_corpus, "algorithm.name=dro"))
    assert type(dro) is DROTrainer and dro.spec_granularity == "sequence"
    assert (dqo.is_policy, dqo.is_value, dro.is_policy, dro.is_value) == (True, True, False, False)
    asked = make_trainer(cfg(tiny_models, tiny_corpus, "algorithm.name=dro", "algorithm.is_value=true"))
    assert (asked.is_policy, asked.is_value) == (False, True)
    ablation = make_trainer(cfg(tiny_models, tiny_corpus, "algorithm.is_policy=false"))  # paper Table 6
    assert (ablation.is_policy, ablation.is_value) == (False, True)
    rows = dro.corpus.read(np.arange(4))
    assert dro.make_batch(rows)["action_ends"].sum(dim=1).tolist() == [1, 1, 1, 1]  # one action per response
    assert dqo.make_batch(rows)["action_ends"].sum(dim=1).tolist() == rows["response_ids"].map(len).tolist()
    sft = make_trainer(cfg(tiny_models, tiny_corpus, "algorithm.name=sft"))
    assert type(sft) is SFTTrainer and sft.roles == {"policy": "language_model"} and not sft.uses_reference


def test_bad_method_settings_are_input_errors(tiny_models, tiny_corpus):
    with pytest.raises(
        InputError, match="algorithm.granularity=token is not one of \\('sequence',\\) for algorithm.name=dro"
    ):
        make_trainer(cfg(tiny_models, tiny_corpus, "algorithm.name=dro", "algorithm.granularity=token"))
    with pytest.raises(InputError, match="algorithm.name=ppo is not one of"):
        make_trainer(cfg(tiny_models, tiny_corpus, "algorithm.name=ppo"))
    with pytest.raises(InputError, match="train_batch_size=24 must be a multiple of the 2 ranks x policy.engine"):
        make_trainer(cfg(tiny_models, tiny_corpus, "data.train_batch_size=24"))
    with pytest.raises(InputError, match="64 rows, fewer than data.train_batch_size=128"):
        make_trainer(cfg(tiny_models, tiny_corpus, "data.train_batch_size=128"))
    with pytest.raises(
        InputError, match=r"trainer.export_epoch=2 is not one of the run's epochs \(trainer.total_epochs=1\)"
    ):
        make_trainer(cfg(tiny_models, tiny_corpus, "trainer.export_epoch=2"))


def test_the_config_passed_in_is_left_as_it_was(tiny_models, tiny_corpus):
    config = cfg(tiny_models, tiny_corpus)
    before = str(config)
    trainer = make_trainer(config)
    assert trainer.sections["policy"].model.override_config.attn_implementation == "sdpa"
    assert str(config) == before and config.policy.model.override_config.attn_implementation is None


def everything(trainer: Trainer) -> pd.DataFrame:
    return trainer.corpus.read(np.arange(len(trainer.corpus)))


def test_baseline_methods_train_on_rows_of_their_own(tiny_models, tiny_corpus):
    corpus = pd.read_parquet(tiny_corpus)
    rs = make_trainer(cfg(tiny_models, tiny_corpus, "algorithm.name=rs", "data.train_batch_size=32"))
    assert type(rs) is RSTrainer and len(rs.corpus) == (corpus["score"] == 1).sum()
    assert (everything(rs)["score"] == 1).all()
    assert not rs.uses_reference and rs.steps_per_epoch == len(rs.corpus) // 32

    # DPO: (chosen, rejected) rows of one prompt, the baselines stage's pairs; a batch is 16 whole pairs
    dpo = make_trainer(cfg(tiny_models, tiny_corpus, "algorithm.name=dpo", "data.train_batch_size=16"))
    pairs = preference_pairs(corpus, seed=0)
    assert type(dpo) is DPOTrainer and dpo.uses_reference and len(dpo.corpus) == 2 * len(pairs) == 64
    chosen, rejected = everything(dpo).iloc[0::2], everything(dpo).iloc[1::2]
    assert (chosen["score"] == 1).all() and (rejected["score"] == 0).all()
    assert chosen["uid"].tolist() == rejected["uid"].tolist()
    assert dpo.steps_per_epoch == 2
    for rows in epoch_batches(len(dpo.corpus), 16, seed=0, epoch=3, unit_rows=2):
        assert len(rows) == 32 and (rows[0::2] % 2 == 0).all() and (rows[1::2] == rows[0::2] + 1).all()

    # KTO: every response, then the same response under another prompt (for the reference point z0)
    kto = make_trainer(cfg(tiny_models, tiny_corpus, "algorithm.name=kto", "data.train_batch_size=16"))
    own, other = everything(kto).iloc[0::2].reset_index(drop=True), everything(kto).iloc[1::2].reset_index(drop=True)
    assert type(kto) is KTOTrainer and len(kto.corpus) == 2 * len(corpus) and kto.steps_per_epoch == 4
    assert own["response_ids"].map(list).tolist() == corpus["response_ids"].map(list).tolist()
    assert own["response_ids"].map(list).tolist() == other["response_ids"].map(list).tolist()
    prompt_of = {tuple(p): u for p, u in zip(corpus["prompt_ids"], corpus["uid"])}
    assert all(prompt_of[tuple(p)] != u for p, u in zip(other["prompt_ids"], own["uid"]))
    again = make_trainer(cfg(tiny_models, tiny_corpus, "algorithm.name=kto")).corpus  # seeded
    assert np.array_equal(kto.corpus.rows, again.rows) and np.array_equal(kto.corpus.prompt_rows, again.prompt_rows)

    with pytest.raises(InputError, match=r"32 units of 2\), fewer than data.train_batch_size=64"):
        make_trainer(cfg(tiny_models, tiny_corpus, "algorithm.name=dpo", "data.train_batch_size=64"))


def test_critic_warmup_updates_only_the_value_for_its_first_steps(tiny_models, tiny_corpus):
    trainer = make_trainer(cfg(tiny_models, tiny_corpus, "trainer.critic_warmup=2", "trainer.total_epochs=2"))
    td = trainer.make_batch(trainer.corpus.read(np.arange(4)))
    td["ref_logprobs"] = torch.zeros(td["response_mask"].shape)
    trainer.forward = lambda td, roles, step: {role: torch.zeros(td["response_mask"].shape) for role in roles}
    seen = []
    trainer.train = lambda fields, td, step, **meta: seen.append(sorted(fields)) or {}
    warm = [trainer.update(td, step)["dqo/critic_warmup"] for step in range(3)]
    assert seen == [["value"], ["value"], ["policy", "value"]] and warm == [1.0, 1.0, 0.0]
    with pytest.raises(InputError, match="critic_warmup=2 leaves none of the run's 2 updates to the policy"):
        make_trainer(cfg(tiny_models, tiny_corpus, "trainer.critic_warmup=2"))
