"""The `report` stage: the evaluation table, the value curves of a few test answers, and a last line.

Writes `${paths.root}/report.md`: the evaluation table, then the line
`<report.label>: greedy accuracy <first model>=0.xx <second model>=0.yy (n=N test problems)`
comparing the first two evaluated models on the first evaluation set. With `report.value_curves`, it
also plots V after each blank-line segment of a few of the trained policy's greedy test answers (right
and wrong ones) with the trained value model: `${paths.root}/value_curves.png`. The pipeline prints
the report when it ends.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import torch
from omegaconf import DictConfig
from transformers import AutoModelForTokenClassification, AutoTokenizer

from dqo_verl.eval.inspect_values import plot, segment_values
from dqo_verl.eval.metrics import out_dir
from dqo_verl.eval.plot_metrics import plot_run
from dqo_verl.reward.steps import STEP_SEPARATOR


def value_curves(
    value_dir: Path, samples: pd.DataFrame, model: str, out: Path, per_kind: int = 2, separator: str = STEP_SEPARATOR
) -> Path:
    """V after each step of `per_kind` right and wrong greedy answers of `model`, one PNG."""
    tokenizer = AutoTokenizer.from_pretrained(value_dir)
    value = AutoModelForTokenClassification.from_pretrained(value_dir, dtype=torch.float32).eval()
    greedy = samples[(samples["model"] == model) & (samples["decoding"] == "greedy")]
    curves = {}
    for score, kind in ((1.0, "right"), (0.0, "wrong")):
        for _, row in greedy[greedy["score"] == score].head(per_kind).iterrows():
            messages = [{"role": "user", "content": row["prompt"]}]
            prompt_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"]
            response_ids = tokenizer(row["response"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            df = segment_values(value, tokenizer, prompt_ids, response_ids, separator)
            curves[f"test {row['uid']} ({kind})"] = df
            print(f"\n[values] test problem {row['uid']} ({kind} answer):")
            print(df.assign(text=df["text"].str.replace("\n", "\\n")).to_string(index=False))
    plot(curves, out)
    return out


def last_line(label: str, summary: dict, evaluation_set: str) -> str:
    """`label: greedy accuracy a=0.xx b=0.yy (n=N test problems)` for the first two models of `summary`."""
    models = list(summary["results"])[:2]
    column = f"{evaluation_set} greedy"
    cells = [summary["results"][m][column] for m in models]
    scores = " ".join(f"{m}={c['accuracy']:.2f}" for m, c in zip(models, cells))
    return f"{label}: greedy accuracy {scores} (n={cells[0]['n']} test problems)"


def run(cfg: DictConfig) -> Path:
    """The `report` stage."""
    root, eval_dir = Path(cfg.paths.root), out_dir(cfg)
    summary = json.loads((eval_dir / "summary.json").read_text())
    parts = [f"# {cfg.report.label}\n", (eval_dir / "table.md").read_text()]
    if cfg.report.value_curves:
        png = root / "value_curves.png"
        samples = pd.read_parquet(eval_dir / "samples.parquet")
        value_curves(
            Path(cfg.trainer.output_dir) / "export" / "value",
            samples,
            list(summary["results"])[1],
            png,
            separator=cfg.process.separator,
        )
        parts.append(f"![V after each segment of a few test answers]({png.name})\n")
    run_dir = Path(cfg.trainer.output_dir)
    if (run_dir / "metrics.jsonl").exists():  # the training curves and the per-class diagnostics, as PNG
        plots = plot_run(run_dir)
        diagnostics = [p for p in plots if p.name == "diagnostics.png"]
        if diagnostics:
            parts.append(f"![training by response class]({os.path.relpath(diagnostics[0], root)})\n")
        print(f"[report] training plots: {run_dir / 'plots'}")
    parts.append(last_line(cfg.report.label, summary, cfg.evaluate.sets[0]) + "\n")
    out = root / "report.md"
    tmp = out.with_name(".report.md.tmp")
    tmp.write_text("\n".join(parts))
    tmp.replace(out)
    return out
