"""The data stages, declared for the pipeline runner and registered in pyproject.toml (`dqo_verl.stages`).

Only declarations: each names its function as "module:function", imported when the stage runs.
"""

from __future__ import annotations

from dqo_verl.config.stages import SAMPLING, Stage, data_files, sft_texts

BASE = Stage(
    "base",
    "data_prep.models:base",
    checks=("data_prep.models:check_base",),
    outputs=lambda c: [c.models.base.out] if c.models.base else [],
    keys=("models.base",),
)

SFT = Stage(
    "sft",
    "data_prep.sft:run",
    checks=("dqo_verl.workers.rollout:check_backend",),
    outputs=lambda c: [c.sft_stage.out, *sft_texts(c), *data_files(c, "sft_tokens.parquet")] if c.sft_stage else [],
    inputs=lambda c: [c.sft_stage.model] + ([c.sft_stage.data.path] if c.sft_stage.get("data") else []),
    keys=(
        "sft_stage",
        "dataset.difficulty",
        "policy.model",
        "policy.engine",
        "policy.optim",
        "checkpoint",
        "data.max_prompt_length",
        "data.max_response_length",
        "trainer.nnodes",
        "trainer.n_gpus_per_node",
        "rollout.backend",
        "rollout.dtype",
        "evaluate.max_tokens",
    ),
    partial=lambda c: [c.sft_stage.run_dir],
)

VALUE = Stage(
    "value",
    "data_prep.models:value",
    outputs=lambda c: [c.models.value.out] if c.models.value else [],
    inputs=lambda c: [c.models.value.source],
    keys=("models.value",),
)

PROMPTS = Stage(
    "prompts",
    "data_prep.prompts:prepare",
    checks=("data_prep.sources:check_dataset",),
    outputs=lambda c: data_files(c, "prompts.parquet"),
    inputs=lambda c: [c.policy.model.path],
    keys=("dataset", "data.max_prompt_length"),
)

CORPUS = Stage(
    "corpus",
    "data_prep.corpus:run",
    checks=("dqo_verl.workers.rollout:check_backend",),
    outputs=lambda c: data_files(c, "samples.parquet"),
    inputs=lambda c: [*data_files(c, "prompts.parquet"), c.policy.model.path],
    keys=("rollout.n", *SAMPLING),
    partial=lambda c: data_files(c, "samples_shards"),
)

SCORE = Stage(
    "score",
    "data_prep.score:score",
    outputs=lambda c: data_files(c, "corpus.parquet"),
    inputs=lambda c: data_files(c, "samples.parquet"),
    partial=lambda c: data_files(c, "corpus_shards"),
)

PROCESS = Stage(
    "process",
    "data_prep.process:run",
    checks=("dqo_verl.workers.rollout:check_backend", "data_prep.process:check"),
    outputs=lambda c: data_files(c, "corpus_ps.parquet", "process_stats.json", "process_prefix.png"),
    inputs=lambda c: [*data_files(c, "corpus.parquet"), c.policy.model.path],
    keys=(
        "process.strategy",
        "process.k",
        "process.separator",
        "process.max_segments",
        "process.segment_reward",
        "process.reward_correct_responses",
        "data.max_prompt_length",
        "data.max_response_length",
        *SAMPLING,
    ),
    partial=lambda c: data_files(c, "process_shards"),
)

BASELINES = Stage(
    "baselines",
    "data_prep.baselines:run",
    outputs=lambda c: data_files(c, *(f"baselines/{name}.parquet" for name in ("sft", "rs", "dpo", "kto"))),
    inputs=lambda c: [*data_files(c, "corpus.parquet", "prompts.parquet"), c.policy.model.path],
    keys=("trainer.seed",),
)
