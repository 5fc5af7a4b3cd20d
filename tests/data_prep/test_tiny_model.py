"""The tiny model factory: offline, deterministic by seed, loadable by transformers."""

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForTokenClassification, AutoTokenizer

from data_prep.models import build_value_model
from data_prep.tiny_model import build_char_tokenizer, build_tiny_policy, tiny_qwen2_config

TEXT = "Q: Ann has 4 pens. She buys 4 bags of 6.\n\n4*6=24\n\n4+24=28\n\n#### 28"


def test_char_tokenizer_round_trips_blank_lines_one_token_per_character(tiny_models):
    for tok in (build_char_tokenizer(), AutoTokenizer.from_pretrained(tiny_models[0])):
        ids = tok(TEXT)["input_ids"]
        assert len(ids) == len(TEXT)
        assert tok.decode(ids) == TEXT
        newline = tok("\n")["input_ids"]
        assert len(newline) == 1 and ids.count(newline[0]) == TEXT.count("\n")


def test_chat_template_and_special_tokens(tiny_models):
    tok = AutoTokenizer.from_pretrained(tiny_models[0])
    ids = tok.apply_chat_template([{"role": "user", "content": "2+2?"}], add_generation_prompt=True, tokenize=True)[
        "input_ids"
    ]
    assert tok.decode(ids) == "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
    assert tok.convert_ids_to_tokens(ids[0]) == "<|im_start|>"
    assert tok.decode([tok.eos_token_id]) == "<|im_end|>"
    assert tok.decode(ids + [tok.eos_token_id], skip_special_tokens=True) == "user\n2+2?\nassistant\n"


def test_policy_is_deterministic_by_seed(tmp_path):
    a = build_tiny_policy(tmp_path / "a", seed=3)
    b = build_tiny_policy(tmp_path / "b", seed=3)
    c = build_tiny_policy(tmp_path / "c", seed=4)
    wa, wb, wc = (load_file(p / "model.safetensors") for p in (a, b, c))
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert any(not torch.equal(wa[k], wc[k]) for k in wa)


def test_policy_is_a_small_qwen2_with_head_dim_32(tiny_models):
    model = AutoModelForCausalLM.from_pretrained(tiny_models[0])
    cfg = model.config
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert cfg.hidden_size // cfg.num_attention_heads >= 32
    assert sum(p.numel() for p in model.parameters()) < 2_000_000
    with pytest.raises(ValueError, match="head_dim"):
        tiny_qwen2_config(build_char_tokenizer(), hidden_size=64, num_heads=4)


def test_value_model_has_its_seeded_score_head_saved(tiny_models, tmp_path):
    policy, value = tiny_models
    again = build_value_model(policy, tmp_path / "v2", seed=0)
    other = build_value_model(policy, tmp_path / "v3", seed=1)
    heads = [load_file(p / "model.safetensors")["score.weight"] for p in (value, again, other)]
    assert torch.equal(heads[0], heads[1]) and not torch.equal(heads[0], heads[2])
    model = AutoModelForTokenClassification.from_pretrained(value)
    assert model.config.num_labels == 1 and model.config.architectures == ["Qwen2ForTokenClassification"]
    assert torch.equal(model.score.weight.detach(), heads[0])
    backbone = load_file(policy / "model.safetensors")
    loaded = load_file(value / "model.safetensors")
    assert torch.equal(backbone["model.embed_tokens.weight"], loaded["model.embed_tokens.weight"])
    ids = torch.tensor([[1, 40, 41, 42]])
    v1 = model(ids).logits
    v2 = AutoModelForTokenClassification.from_pretrained(value)(ids).logits
    assert v1.shape == (1, 4, 1) and torch.equal(v1, v2)


def test_a_zero_value_head_starts_v_at_zero(tiny_models, tmp_path):
    policy, value = tiny_models
    zero = AutoModelForTokenClassification.from_pretrained(build_value_model(policy, tmp_path / "v0", head_std=0.0))
    seeded = AutoModelForTokenClassification.from_pretrained(value)
    ids = torch.tensor([[1, 40, 41, 42]])
    assert torch.count_nonzero(zero(ids).logits) == 0 and torch.count_nonzero(seeded(ids).logits) > 0
    assert torch.equal(zero.model.embed_tokens.weight, seeded.model.embed_tokens.weight)
