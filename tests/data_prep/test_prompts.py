"""Prompt sets: loaders on local files in each dataset's schema, templates, answer formats, bad rows."""

import json

import pandas as pd
import pytest
from transformers import AutoTokenizer

from data_prep.sources import (
    GSM8K_INSTRUCTION,
    MATH_INSTRUCTION,
    SOURCES,
    build_prompts,
    build_sft_set,
    build_synthetic_prompts,
)
from dqo_verl.config.errors import RowError
from dqo_verl.data.chat import add_prompt_ids
from dqo_verl.reward.formats import answer_format
from dqo_verl.reward.grading import ANSWER_FORMATS


def write(tmp_path, name, rows, fmt="parquet"):
    path = tmp_path / f"{name}.{fmt}"
    if fmt == "parquet":
        pd.DataFrame(rows).to_parquet(path)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


GSM8K_ROWS = [
    {"question": "Tom has 3 apples and buys 2. How many?", "answer": "3+2=<<3+2=5>>5\n#### 5"},
    {"question": "A shop sells 1,200 pens.", "answer": "It sells them all.\n#### 1,200"},
]


def test_gsm8k_loader_and_template(tmp_path):
    df, stats = build_prompts("gsm8k", str(write(tmp_path, "gsm8k", GSM8K_ROWS)))
    assert stats == {"read": 2, "other_sources": 0, "skipped": 0, "rows": 2}
    first = df.iloc[0]
    assert first["data_source"] == "openai/gsm8k"
    assert first["prompt"][0]["content"] == f"{GSM8K_ROWS[0]['question']}\n{GSM8K_INSTRUCTION}"
    assert GSM8K_INSTRUCTION == "Please reason step by step, and produce a final answer following 4 '#', like '#### 0'."
    assert df["reward_model"].map(lambda r: r["ground_truth"]).tolist() == ["5", "1200"]
    assert first["extra_info"]["solution"] == GSM8K_ROWS[0]["answer"]


def test_math_loaders_take_the_last_boxed_answer(tmp_path):
    rows = [
        {
            "problem": "Compute $1+1$.",
            "level": "Level 1",
            "type": "Algebra",
            "solution": "We get $\\boxed{1}$, no: $\\boxed{2}$.",
        },
        {"problem": "Simplify.", "level": "Level 2", "type": "Algebra", "solution": "It is $\\boxed{\\frac{1}{2}}$."},
    ]
    df, _ = build_prompts("math", str(write(tmp_path, "math", rows, "jsonl")))
    assert df["reward_model"].map(lambda r: r["ground_truth"]).tolist() == ["2", "\\frac{1}{2}"]
    assert df.iloc[0]["prompt"][0]["content"] == "Compute $1+1$.\n" + MATH_INSTRUCTION
    assert MATH_INSTRUCTION == "Please reason step by step, and put your final answer within \\boxed{}."
    m500 = [
        {"problem": "P", "solution": "s \\boxed{3}", "answer": "3", "subject": "Algebra", "level": 1, "unique_id": "a"}
    ]
    df5, _ = build_prompts("math500", str(write(tmp_path, "m500", m500)))
    assert df5.iloc[0]["reward_model"]["ground_truth"] == "3" and df5.iloc[0]["data_source"] == "HuggingFaceH4/MATH-500"


def test_numina_feeds_the_problem_as_is_and_counts_proofs_it_skips(tmp_path):
    rows = [
        {"source": "olympiads", "problem": "Find x.", "solution": "So $x=\\boxed{4}$.", "messages": []},
        {"source": "olympiads", "problem": "Prove it.", "solution": "Proof. Done.", "messages": []},
    ]
    df, stats = build_prompts("numina", str(write(tmp_path, "numina", rows)))
    assert stats == {"read": 2, "other_sources": 0, "skipped": 1, "rows": 1}
    assert df.iloc[0]["prompt"][0]["content"] == "Find x."
    assert df.iloc[0]["reward_model"]["ground_truth"] == "4"


def test_numina_sources_keep_the_olympiad_problems_then_a_seeded_sample(tmp_path):
    origins = ["olympiads", "cn_k12", "olympiads", "synthetic_math", "olympiads", "olympiads", "amc_aime"]
    rows = [
        {"source": o, "problem": f"P{i}", "solution": f"$\\boxed{{{i}}}$", "messages": []}
        for i, o in enumerate(origins)
    ]
    rows.append({"source": "olympiads", "problem": "Prove it.", "solution": "Proof.", "messages": []})
    path = str(write(tmp_path, "numina", rows))
    df, stats = build_prompts("numina", path, sources=["olympiads"])
    assert stats == {"read": 8, "other_sources": 3, "skipped": 1, "rows": 4}
    assert [m[0]["content"] for m in df["prompt"]] == ["P0", "P2", "P4", "P5"]
    two, stats = build_prompts("numina", path, limit=2, seed=3, sources=["olympiads", "amc_aime"])
    assert stats["rows"] == 2 and stats["other_sources"] == 2
    assert set(m[0]["content"] for m in two["prompt"]) <= {"P0", "P2", "P4", "P5", "P6"}
    again, _ = build_prompts("numina", path, limit=2, seed=3, sources=["olympiads", "amc_aime"])
    assert again["prompt"].tolist() == two["prompt"].tolist()


def test_sources_need_a_source_column(tmp_path):
    with pytest.raises(RowError, match="dataset.sources"):
        build_prompts("gsm8k", str(write(tmp_path, "gsm8k", GSM8K_ROWS)), sources=["olympiads"])
    rows = [{"problem": "P", "solution": "$\\boxed{1}$", "messages": []}]
    with pytest.raises(RowError, match=r"row 0, field 'source'"):
        build_prompts("numina", str(write(tmp_path, "numina", rows)), sources=["olympiads"])


def test_aime24_takes_the_2024_problems(tmp_path):
    rows = [
        {"ID": "2024-I-1", "Year": 2024, "Problem Number": 1, "Question": "Q1", "Answer": "204", "Part": "I"},
        {"ID": "2023-I-1", "Year": 2023, "Problem Number": 1, "Question": "Old", "Answer": "5", "Part": "I"},
        {"ID": "2024-II-3", "Year": 2024, "Problem Number": 3, "Question": "Q3", "Answer": "33", "Part": "II"},
    ]
    df, stats = build_prompts("aime24", str(write(tmp_path, "aime", rows)))
    assert stats["rows"] == 2
    assert [m[0]["content"] for m in df["prompt"]] == ["Q1", "Q3"]
    assert df["data_source"].unique().tolist() == ["aime24"]


def test_limit_is_a_seeded_subset(tmp_path):
    rows = [{"question": f"q{i}", "answer": f"#### {i}"} for i in range(50)]
    path = str(write(tmp_path, "g", rows))
    a, _ = build_prompts("gsm8k", path, limit=10, seed=1)
    b, _ = build_prompts("gsm8k", path, limit=10, seed=1)
    c, _ = build_prompts("gsm8k", path, limit=10, seed=2)
    assert a["reward_model"].tolist() == b["reward_model"].tolist() != c["reward_model"].tolist()
    assert len(a) == 10


@pytest.mark.parametrize(
    "rows,row,field,message",
    [
        ([GSM8K_ROWS[0], {"question": "", "answer": "#### 1"}], 1, "question", "empty problem"),
        ([{"answer": "#### 1"}], 0, "question", "missing"),
        ([GSM8K_ROWS[0], {"question": "q", "answer": None}], 1, "answer", "missing answer"),
        ([{"question": "q", "answer": "no marker here"}], 0, "answer", "cannot extract a ground truth"),
        ([{"question": "q", "answer": "#### five"}], 0, "answer", "cannot extract a ground truth"),
    ],
)
def test_bad_rows_name_file_row_and_field(tmp_path, rows, row, field, message):
    path = write(tmp_path, "bad", rows)
    with pytest.raises(RowError) as err:
        build_prompts("gsm8k", str(path))
    assert str(err.value).startswith(f"{path}, row {row}, field '{field}': ") and message in str(err.value)


def test_math_row_without_boxed_answer_is_an_error(tmp_path):
    path = write(tmp_path, "m", [{"problem": "p", "solution": "no box"}])
    with pytest.raises(RowError, match="row 0, field 'solution': cannot extract"):
        build_prompts("math", str(path))


def test_sft_set_from_long_cot_trajectories(tmp_path):
    rows = [{"problem": f"p{i}", "qwq": f"think {i} ... \\boxed{{{i}}}", "solution": "s"} for i in range(30)]
    path = write(tmp_path, "qwq", rows, "jsonl")
    sft = build_sft_set(str(path), n=8, seed=0)
    assert len(sft) == 8 and len(set(sft["response"])) == 8
    assert all(r.startswith("think") for r in sft["response"])
    assert sft.equals(build_sft_set(str(path), n=8, seed=0))
    with pytest.raises(RowError, match="field 'qwq'"):
        build_sft_set(str(write(tmp_path, "q2", [{"problem": "p", "qwq": ""}])), n=1, seed=0)


def test_chat_template_prompt_ids(tiny_models):
    tok = AutoTokenizer.from_pretrained(tiny_models[0])
    df = add_prompt_ids(build_synthetic_prompts(3, seed=0), tok)
    q = df.iloc[0]["prompt"][0]["content"]
    assert df.iloc[0]["raw_prompt"] == f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode(df.iloc[0]["prompt_ids"]) == df.iloc[0]["raw_prompt"]


def test_every_source_declares_an_answer_format_that_grading_knows():
    for name, src in SOURCES.items():
        assert src.answer_format in ANSWER_FORMATS
        assert answer_format(src.data_source) == answer_format(name) == answer_format(src.hub) == src.answer_format
    assert [answer_format(s) for s in ("openai/gsm8k", "DigitalLearningGmbH/MATH-lighteval", "aime24")] == [
        "gsm8k",
        "boxed",
        "boxed",
    ]
    assert answer_format(build_synthetic_prompts(1, seed=0).iloc[0]["data_source"]) == "gsm8k"
    assert answer_format("reasoning_gym/basic_arithmetic") == "gsm8k_or_last_number"
    assert answer_format("my/own_set") is None and answer_format("reasoning_gym") is None
