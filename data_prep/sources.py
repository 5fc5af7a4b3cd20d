"""Prompt sources: the datasets a recipe draws problems from, their ground truths and prompt templates.

Each source loads a dataset, extracts ground truths and applies the paper's prompt template (A.1, Figure 1); its
responses are graded in the answer format `dqo_verl.reward.formats` declares for its data_source. Every loader
reads the hub through `datasets` (`dataset.path` = hub name) or a local file / folder in the same schema
(`dataset.path=/dir/train.parquet`). Besides the hub datasets there are two generated sources: the built-in
synthetic arithmetic task and reasoning-gym's task generators. The evaluation sets are built here too
(`eval_prompts`, registered for dqo_verl's eval harness as an entry point).
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import datasets
import pandas as pd
from omegaconf import DictConfig, OmegaConf

from data_prep import synthetic
from dqo_verl.config.errors import RowError, check_choice
from dqo_verl.reward.formats import answer_format
from dqo_verl.reward.grading import last_boxed


def seen_questions(data_dir: Path) -> set[str]:
    """Prompt texts of the training prompts, SFT and dev sets under `data_dir` (kept out of generated test sets)."""
    seen = set()
    for name in ("prompts.parquet", "sft.parquet", "dev.parquet"):
        if (data_dir / name).exists():
            seen.update(m[0]["content"] for m in pd.read_parquet(data_dir / name, columns=["prompt"])["prompt"])
    return seen


# generated evaluation splits of the synthetic task: the seed offset each is drawn with
SYNTHETIC_SPLITS = {"test": 10**6, "dev": 2 * 10**6}
DEV_EXCLUDES_TEST = 2000


def eval_prompts(name: str, spec: DictConfig, seed: int, data_dir: Path) -> pd.DataFrame:
    """The first `limit` problems of an evaluation set (prompt rows, training templates).

    Generated sets (synthetic, reasoning_gym) are drawn with `seed` (`evaluate.seed`) and leave out the
    training prompts, SFT and warm-up dev problems under `data_dir`; a synthetic set with `split: dev` also
    leaves out the first DEV_EXCLUDES_TEST test problems, so settings chosen on it are reported on unseen ones.
    """
    if spec.get("dataset", name) == "synthetic":
        split = spec.get("split") or "test"
        check_choice(f"evaluate.datasets.{name}.split", split, SYNTHETIC_SPLITS)
        difficulty = synthetic_difficulty(spec.get("difficulty"))
        exclude = seen_questions(data_dir)
        if split == "dev":  # disjoint from every test set of up to DEV_EXCLUDES_TEST problems
            test_seed = SYNTHETIC_SPLITS["test"] + seed
            test = build_synthetic_prompts(DEV_EXCLUDES_TEST, test_seed, exclude, "test", difficulty)
            exclude |= set(test["prompt"].map(lambda m: m[0]["content"]))
        df = build_synthetic_prompts(
            spec.limit, seed=SYNTHETIC_SPLITS[split] + seed, exclude=exclude, split=split, difficulty=difficulty
        )
    elif spec.get("dataset", name) == "reasoning_gym":
        df = build_reasoning_gym_prompts(
            spec.task,
            spec.limit,
            seed=10**6 + seed,
            split="test",
            config=spec.get("config"),
            exclude=seen_questions(data_dir),
        )
    else:
        df, _ = build_prompts(spec.get("dataset", name), spec.get("path"), spec.get("split", "test"))
    limit = spec.get("limit")
    return df.head(limit).reset_index(drop=True) if limit else df


GSM8K_INSTRUCTION = "Please reason step by step, and produce a final answer following 4 '#', like '#### 0'."

MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


def gsm8k_truth(answer: str) -> str | None:
    """GSM8K ground truth: the number after '####' (commas removed)."""
    if "####" not in answer:
        return None
    value = answer.rsplit("####", 1)[1].strip().replace(",", "")
    return value if re.fullmatch(r"-?\d+(\.\d+)?", value) else None


def boxed_truth(solution: str) -> str | None:
    """MATH / NuminaMath ground truth: the last \\boxed{} of the reference solution."""
    return last_boxed(solution)


def aime_truth(answer) -> str | None:
    text = str(answer).strip()
    return text if re.fullmatch(r"\d{1,3}", text) else None


@dataclass(frozen=True)
class PromptSource:
    """How one dataset becomes prompts."""

    hub: str
    data_source: str
    problem_key: str
    truth_key: str
    truth: Callable[[str], str | None]
    instruction: str | None
    hub_config: str | None = None
    split: str = "train"
    # the reference solution (for the SFT baseline), if the dataset has one
    solution_key: str | None = None
    # rows without a usable answer exist in the paper's data (proofs in NuminaMath): count and skip them
    skip_bad_rows: bool = False
    filter: Callable[[dict], bool] | None = None
    # the column naming each problem's origin, for `dataset.sources` (NuminaMath: "olympiads", "cn_k12", ...)
    source_key: str | None = None

    @property
    def answer_format(self) -> str | None:
        """How responses are graded: the format `dqo_verl.reward.formats` declares for this data_source."""
        return answer_format(self.data_source)


SOURCES: dict[str, PromptSource] = {
    "gsm8k": PromptSource(
        "openai/gsm8k",
        "openai/gsm8k",
        "question",
        "answer",
        gsm8k_truth,
        GSM8K_INSTRUCTION,
        "main",
        solution_key="answer",
    ),
    "math": PromptSource(
        "DigitalLearningGmbH/MATH-lighteval",
        "DigitalLearningGmbH/MATH-lighteval",
        "problem",
        "solution",
        boxed_truth,
        MATH_INSTRUCTION,
        "default",
        solution_key="solution",
    ),
    "math500": PromptSource(
        "HuggingFaceH4/MATH-500",
        "HuggingFaceH4/MATH-500",
        "problem",
        "answer",
        lambda a: str(a).strip() or None,
        MATH_INSTRUCTION,
        split="test",
        solution_key="solution",
    ),
    "numina": PromptSource(
        "AI-MO/NuminaMath-CoT",
        "AI-MO/NuminaMath-CoT",
        "problem",
        "solution",
        boxed_truth,
        None,
        skip_bad_rows=True,
        solution_key="solution",
        source_key="source",
    ),
    "aime24": PromptSource(
        "di-zhang-fdu/AIME-1983-2024",
        "aime24",
        "Question",
        "Answer",
        aime_truth,
        None,
        filter=lambda row: int(row.get("Year", 0)) == 2024,
    ),
}


def load_rows(path: str, hub_config: str | None, split: str) -> tuple[list[dict], str]:
    """Rows of a hub dataset split or of a local parquet / json / jsonl file or folder; and a name for errors."""
    local = Path(path).expanduser()
    if local.exists():
        files = sorted(local.glob("*.parquet")) + sorted(local.glob("*.json*")) if local.is_dir() else [local]
        if not files:
            raise RowError(str(local), 0, "dataset.path", "no .parquet / .json / .jsonl files in the folder")
        frames = []
        for f in files:
            frames.append(pd.read_parquet(f) if f.suffix == ".parquet" else pd.read_json(f, lines=f.suffix == ".jsonl"))
        return pd.concat(frames, ignore_index=True).to_dict("records"), str(local)
    ds = datasets.load_dataset(path, hub_config, split=split)
    return list(ds), f"{path}[{split}]"


def apply_template(problem: str, instruction: str | None) -> str:
    """The paper's prompt (A.1): the problem, then the dataset's instruction on a new line."""
    return problem if instruction is None else f"{problem}\n{instruction}"


def build_prompts(
    name: str,
    path: str | None = None,
    split: str | None = None,
    limit: int | None = None,
    seed: int = 0,
    sources: list[str] | None = None,
) -> tuple[pd.DataFrame, dict]:
    """verl-style prompt rows of dataset `name` (see SOURCES), and counts.

    `sources` keeps only the rows whose source column (`PromptSource.source_key`) is one of them;
    `limit` then draws a seeded random subset. Counts: 'read', 'other_sources', 'skipped' (no usable
    answer), 'rows' (kept).
    """
    src = SOURCES[name]
    split = split or src.split
    rows, where = load_rows(path or src.hub, src.hub_config, split)
    if sources and src.source_key is None:
        raise RowError(where, 0, "dataset.sources", f"dataset '{name}' has no source column to filter on")
    wanted = set(sources or ())
    out, skipped, other = [], 0, 0
    for i, row in enumerate(rows):
        if src.filter is not None and not src.filter(row):
            continue
        if wanted:
            origin = row.get(src.source_key)
            if not isinstance(origin, str):
                raise RowError(where, i, src.source_key, "missing source (needed by dataset.sources)")
            if origin not in wanted:
                other += 1
                continue
        problem = row.get(src.problem_key)
        if not isinstance(problem, str) or not problem.strip():
            raise RowError(where, i, src.problem_key, "missing or empty problem")
        raw = row.get(src.truth_key)
        if raw is None or (isinstance(raw, float) and raw != raw) or (isinstance(raw, str) and not raw.strip()):
            raise RowError(where, i, src.truth_key, "missing answer")
        truth = src.truth(raw)
        if truth is None:
            if src.skip_bad_rows:
                skipped += 1
                continue
            raise RowError(where, i, src.truth_key, f"cannot extract a ground truth from {str(raw)[-80:]!r}")
        out.append(
            {
                "data_source": src.data_source,
                "prompt": [{"role": "user", "content": apply_template(problem.strip(), src.instruction)}],
                "ability": "math",
                "reward_model": {"style": "rule", "ground_truth": truth},
                "extra_info": {
                    "split": split,
                    "index": i,
                    "question": problem.strip(),
                    "solution": str(row.get(src.solution_key) or "") if src.solution_key else "",
                },
            }
        )
    if limit is not None and limit < len(out):
        out = sorted(random.Random(seed).sample(out, limit), key=lambda r: r["extra_info"]["index"])
    return pd.DataFrame(out), {"read": len(rows), "other_sources": other, "skipped": skipped, "rows": len(out)}


def synthetic_difficulty(cfg: DictConfig | None) -> synthetic.Difficulty:
    """`dataset.difficulty` (any of the Difficulty fields) over the defaults."""
    fields = {k: v if isinstance(v, int) else tuple(v) for k, v in (cfg or {}).items()}
    return synthetic.Difficulty(**fields)


def build_synthetic_prompts(
    n: int,
    seed: int,
    exclude: set[str] | None = None,
    split: str = "train",
    difficulty: synthetic.Difficulty | None = None,
) -> pd.DataFrame:
    """Prompt rows of the built-in arithmetic task (the problem as is: a short, character-level prompt)."""
    return pd.DataFrame(
        synthetic.to_rows(synthetic.make_problems(n, seed, difficulty or synthetic.Difficulty(), exclude), split)
    )


def build_reasoning_gym_prompts(
    task: str, n: int, seed: int, split: str = "train", config: Mapping | None = None, exclude: set[str] | None = None
) -> pd.DataFrame:
    """`n` prompt rows from a `reasoning-gym` task generator (offline), in GSM8K format ('#### N' answers).

    `config` holds the generator's own options (e.g. basic_arithmetic's max_terms, max_digits);
    repeated questions and those whose prompt text is in `exclude` are skipped.
    """
    import reasoning_gym

    options = OmegaConf.to_container(config) if isinstance(config, DictConfig) else dict(config or {})
    seen = set(exclude or ())
    rows = []
    for item in reasoning_gym.create_dataset(task, size=2 * n + len(seen), seed=seed, **options):
        question = item["question"].strip()
        content = apply_template(question, GSM8K_INSTRUCTION)
        if content in seen:
            continue
        seen.add(content)
        rows.append(
            {
                "data_source": f"reasoning_gym/{task}",
                "prompt": [{"role": "user", "content": content}],
                "ability": "math",
                "reward_model": {"style": "rule", "ground_truth": str(item["answer"]).strip()},
                "extra_info": {"split": split, "index": len(rows), "question": question, "solution": ""},
            }
        )
        if len(rows) == n:
            return pd.DataFrame(rows)
    raise ValueError(
        f"reasoning-gym {task} with {options} gave only {len(rows)} distinct new problems of the {n} asked: "
        "widen its config or ask for fewer"
    )


def build_sft_set(
    path: str, n: int, seed: int, problem_key: str = "problem", response_key: str = "qwq"
) -> pd.DataFrame:
    """`n` random (problem, long chain-of-thought) pairs, e.g. QwQ-LongCoT-Verified-130K for Qwen2.5-QwQ."""
    rows, where = load_rows(path, None, "train")
    picked = random.Random(seed).sample(range(len(rows)), min(n, len(rows)))
    out = []
    for i in sorted(picked):
        for key in (problem_key, response_key):
            if not isinstance(rows[i].get(key), str) or not rows[i][key].strip():
                raise RowError(where, i, key, "missing or empty text")
        out.append({"prompt": [{"role": "user", "content": rows[i][problem_key]}], "response": rows[i][response_key]})
    return pd.DataFrame(out)


GENERATED = ("synthetic", "reasoning_gym")  # sets made by a generator, not read from a file or the hub


def check_dataset(cfg: DictConfig) -> None:
    """`dataset.name` names a source (checked before anything runs)."""
    check_choice("dataset.name", cfg.dataset.name, [*SOURCES, *GENERATED])


def check_eval_sets(cfg: DictConfig) -> None:
    """Every name in `evaluate.sets` is an entry of `evaluate.datasets`, and each entry's dataset a source."""
    for name in cfg.evaluate.sets:
        check_choice("evaluate.sets", name, cfg.evaluate.datasets)
        dataset = cfg.evaluate.datasets[name].get("dataset", name)
        check_choice(f"evaluate.datasets.{name}.dataset", dataset, [*SOURCES, *GENERATED])
