"""The context budget: the prompt and response tokens a stage asks of a model must fit its context.

Every stage that loads a model (sft, corpus, process, train, eval) checks, before any worker starts,
that the config entries it sums (e.g. data.max_prompt_length + data.max_response_length) stay within
each model's `max_position_embeddings`, and sizes its vLLM engines to exactly that budget
(docs/design.md, "Context budget").
"""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf
from transformers import AutoConfig

from dqo_verl.config.errors import InputError


def context_length(model: str) -> int | None:
    """`max_position_embeddings` of a model folder or hub name (None when its config has none)."""
    return getattr(AutoConfig.from_pretrained(model), "max_position_embeddings", None)


def check_budget(cfg: DictConfig, stage: str, keys: list[str], models: dict[str, str]) -> int:
    """The sum of the config entries `keys`; an InputError when it exceeds the context of a model in `models`
    ({config key: folder or hub name})."""
    parts = {key: int(OmegaConf.select(cfg, key)) for key in keys}
    total = sum(parts.values())
    for key, model in models.items():
        limit = context_length(model)
        if limit is not None and total > limit:
            terms = " + ".join(f"{k} ({v})" for k, v in parts.items())
            raise InputError(
                f"{stage}: the context budget {terms} = {total} tokens exceeds the context of {key} ({model}): "
                f"max_position_embeddings {limit}. Lower them so that they total at most {limit}"
            )
    return total


def engine_config(cfg: DictConfig, budget: int) -> dict:
    """The rollout section as the engines' config: vLLM's max_model_len is the stage's budget unless
    rollout.max_model_len sets it."""
    return {**OmegaConf.to_container(cfg.rollout, resolve=True), "max_model_len": cfg.rollout.max_model_len or budget}
