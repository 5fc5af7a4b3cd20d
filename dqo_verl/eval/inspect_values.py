"""Process-value case study (paper Table 4): V at the end of each blank-line segment of a response.

`python -m dqo_verl.eval.inspect_values VALUE_MODEL --corpus CORPUS.parquet --rows 0 5 9 [--out DIR]`, or
`--prompt TEXT --response TEXT` for one response (chat-templated with the value model's tokenizer).
For each response it prints a table (segment index, V after the segment, the correctness mark when
the corpus has process labels, and the segment text) and saves one PNG with V against segment index
for all of them. Segment 0 is the prompt alone: V(s_0). Alignment is the training one: V(s_t) is the
value-model output at the last token before response token t.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd
import torch
from matplotlib.figure import Figure
from transformers import AutoModelForTokenClassification, AutoTokenizer

from dqo_verl.reward.steps import STEP_SEPARATOR, segment_ends


def segment_values(
    model,
    tokenizer,
    prompt_ids: list[int],
    response_ids: list[int],
    separator: str = STEP_SEPARATOR,
    max_segments: int | None = None,
) -> pd.DataFrame:
    """One row per state: 0 = after the prompt, i = after segment i (the last segment's end is terminal)."""
    ids = list(prompt_ids) + list(response_ids)
    with torch.no_grad():
        v = model(torch.tensor([ids])).logits[0, :, 0].double()
    ends = segment_ends(list(response_ids), tokenizer, separator, max_segments)
    p = len(prompt_ids)
    starts = [-1] + ends[:-1]  # the state after segment i is read at the position of its last token
    rows = []
    for i, e in enumerate(starts):
        seg_text = (
            tokenizer.decode(list(response_ids)[starts[i - 1] + 1 : e + 1], skip_special_tokens=True) if i else ""
        )
        rows.append({"segment": i, "token": e + 1, "value": float(v[p + e]), "text": seg_text})
    return pd.DataFrame(rows)


def plot(curves: dict[str, pd.DataFrame], path: Path) -> None:
    """V against segment index, one line per response (x: states known to be wrong), as a PNG."""
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    for label, df in curves.items():
        ax.plot(df["segment"], df["value"], marker="o", label=label)
        if "correct" in df:
            wrong = df[df["correct"] == False]  # noqa: E712
            ax.scatter(wrong["segment"], wrong["value"], marker="x", color="red", zorder=3)
    ax.set(xlabel="segment (0 = prompt only)", ylabel="V(s)", title="Value after each segment")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("value_model", help="HF folder of a value model (e.g. a checkpoint's value/huggingface)")
    parser.add_argument("--corpus", help="corpus parquet (prompt_ids, response_ids [, correct_prefix])")
    parser.add_argument("--rows", type=int, nargs="*", default=[0])
    parser.add_argument("--prompt")
    parser.add_argument("--response")
    parser.add_argument("--out", default="value_curves.png")
    args = parser.parse_args(argv)

    tokenizer = AutoTokenizer.from_pretrained(args.value_model)
    model = AutoModelForTokenClassification.from_pretrained(args.value_model, dtype=torch.float32).eval()
    items = []
    if args.prompt is not None:
        prompt_ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": args.prompt}], add_generation_prompt=True, tokenize=True
        )["input_ids"]
        items.append(
            ("response", prompt_ids, tokenizer(args.response, add_special_tokens=False)["input_ids"], None, None)
        )
    else:
        corpus = pd.read_parquet(args.corpus)
        for r in args.rows:
            rec = corpus.iloc[r]
            prefix = rec["correct_prefix"] if "correct_prefix" in corpus else None
            items.append(
                (
                    f"row {r} (score {rec.get('score', '?')})",
                    rec["prompt_ids"],
                    rec["response_ids"],
                    prefix,
                    rec.get("score"),
                )
            )
    curves = {}
    for label, prompt_ids, response_ids, prefix, score in items:
        df = segment_values(model, tokenizer, prompt_ids, response_ids)
        if prefix is not None:  # states after the first i* segments are known correct
            df["correct"] = (df["segment"] <= prefix) | (score == 1.0)
        curves[label] = df
        print(f"\n{label}")
        print(df.assign(text=df["text"].str.replace("\n", "\\n").str.slice(0, 60)).to_string(index=False))
    plot(curves, Path(args.out))
    print(f"\n[values] plot -> {args.out}")


if __name__ == "__main__":
    main()
