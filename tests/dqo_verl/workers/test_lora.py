"""LoRA for the policy and the value model: the merged HF copy against peft's own forward, the value model's
adapters (head trained in full), and DQO updates with LoRA on both models end to end, resumed and exported."""

import json
from types import SimpleNamespace

import pytest
import torch
from peft import LoraConfig, TaskType, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForTokenClassification

from data_prep.models import build_value_model
from data_prep.tiny_model import build_tiny_policy
from dqo_verl.config.compose import compose_config
from dqo_verl.trainer.methods import make_trainer
from dqo_verl.workers.lora import merge_lora_folder, value_lora_module

TINY = {"hidden_size": 64, "num_layers": 2, "num_heads": 2, "intermediate_size": 128}
LORA = {"lora_rank": 4, "lora_alpha": 8, "target_modules": "all-linear", "exclude_modules": None}


def perturbed(peft_model, seed: int):
    """Random adapter weights (B starts at 0, which would make any merge look right) and head."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in peft_model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return peft_model


def save_like_verl(peft_model, plain_model, folder):
    """What verl's checkpoint manager writes under huggingface/: the plain model's config, the peft state dict."""
    plain_model.save_pretrained(folder, state_dict=peft_model.state_dict())


def test_merged_policy_folder_equals_the_adapted_model(tmp_path):
    path = build_tiny_policy(tmp_path / "base", seed=0, **TINY)
    lora = get_peft_model(
        AutoModelForCausalLM.from_pretrained(path),
        LoraConfig(task_type=TaskType.CAUSAL_LM, r=4, lora_alpha=8, target_modules="all-linear"),
    )
    perturbed(lora, 0).eval()
    save_like_verl(lora, AutoModelForCausalLM.from_pretrained(path), tmp_path / "hf")
    assert any(k.startswith("base_model.model.") for k in load_file(tmp_path / "hf" / "model.safetensors"))
    assert merge_lora_folder(tmp_path / "hf", scaling=8 / 4)
    assert not merge_lora_folder(tmp_path / "hf", scaling=2.0)  # already plain: nothing to do
    merged, info = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ids = torch.randint(3, 200, (2, 17))
    with torch.no_grad():
        assert torch.allclose(merged.eval()(ids).logits, lora(input_ids=ids).logits, atol=1e-5)
    base = load_file(path / "model.safetensors")
    weights = merged.state_dict()
    assert torch.equal(weights["model.embed_tokens.weight"], base["model.embed_tokens.weight"])  # not a target
    assert not torch.equal(
        weights["model.layers.0.self_attn.q_proj.weight"], base["model.layers.0.self_attn.q_proj.weight"]
    )


def test_value_model_adapters_train_the_head_in_full_and_merge(tmp_path):
    value_dir = build_value_model(build_tiny_policy(tmp_path / "base", seed=0, **TINY), tmp_path / "value", seed=0)
    engine = SimpleNamespace(model_config=SimpleNamespace(lora_adapter_path=None, **LORA))
    lora = value_lora_module(engine, AutoModelForTokenClassification.from_pretrained(value_dir))
    trainable = [n for n, p in lora.named_parameters() if p.requires_grad]
    head = "base_model.model.score.modules_to_save.default"  # the value stage's head has a bias
    assert {n for n in trainable if "lora_" not in n} == {f"{head}.weight", f"{head}.bias"}
    assert any("q_proj.lora_A" in n for n in trainable) and not any("score.lora_" in n for n in trainable)
    perturbed(lora, 1).eval()
    save_like_verl(lora, AutoModelForTokenClassification.from_pretrained(value_dir), tmp_path / "hf")
    assert merge_lora_folder(tmp_path / "hf", scaling=8 / 4)
    merged, info = AutoModelForTokenClassification.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ids = torch.randint(3, 200, (2, 11))
    with torch.no_grad():
        assert torch.allclose(merged.eval()(ids).logits, lora(input_ids=ids).logits, atol=1e-5)


@pytest.mark.slow
def test_dqo_updates_with_lora_on_both_models_resume_and_export_merged(ray_session, tiny_models, tiny_corpus, tmp_path):
    policy, value = tiny_models
    out = tmp_path / "run"
    lora = [f"{role}.model.{k}={v}" for role in ("policy", "value") for k, v in LORA.items() if v is not None]

    def run(steps: int) -> list[dict]:
        cfg = compose_config(
            "tiny_cpu",
            [
                f"data.train_files={tiny_corpus}",
                f"data.ref_cache_dir={tmp_path}/ref",
                f"policy.model.path={policy}",
                f"value.model.path={value}",
                f"trainer.output_dir={out}",
                "data.train_batch_size=32",
                *[
                    f"{r}.engine.{k}=16"
                    for r in ("policy", "value")
                    for k in ("micro_batch_size_per_gpu", "infer_micro_batch_size_per_gpu")
                ],
                "policy.optim.lr=1e-2",
                "value.optim.lr=1e-2",
                "value.zero_head=true",
                f"trainer.total_training_steps={steps}",
                "trainer.save_freq=1",
                "trainer.logger=[console]",
                "trainer.n_gpus_per_node=1",
                *lora,
            ],
        )
        with make_trainer(cfg) as trainer:  # started, and shut down whatever happens
            trainer.fit()
            return trainer.history

    first = run(1)
    resumed = run(2)  # continues from the step-1 checkpoint
    assert len(first) == 1 and len(resumed) == 1  # the second run did update 2 only
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]
    assert abs(first[0]["dqo/kl_seq_mean"]) < 1e-6  # adapters start at B = 0: the policy is its reference
    assert json.loads((out / "checkpoints" / "global_step_2" / "trainer_state.json").read_text())["global_step"] == 2

    # the exports are plain, merged HF models: only adapted layers and the value head moved
    exported, info = AutoModelForCausalLM.from_pretrained(out / "export" / "policy", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    start, trained = load_file(policy / "model.safetensors"), exported.state_dict()
    assert torch.equal(trained["model.embed_tokens.weight"], start["model.embed_tokens.weight"])
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(trained[q], start[q])
    v_model, info = AutoModelForTokenClassification.from_pretrained(out / "export" / "value", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert v_model.score.weight.abs().sum() > 0  # zeroed at the start, then trained
