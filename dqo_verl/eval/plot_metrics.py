"""Training curves as PNG: `python -m dqo_verl.eval.plot_metrics RUN_DIR [--eval SUMMARY.json ...]`.

Reads the trainer's `RUN_DIR/metrics.jsonl` and writes `RUN_DIR/plots/`: losses, importance-weight
statistics, V at the first response state (and its return), KL to the reference, gradient norms, and the
per-class diagnostics (right, wrong, cut at a length limit) in one `diagnostics.png`;
with evaluation summaries (`dqo_verl.eval.harness`'s summary.json) of checkpoints (`.../global_step_N/...`),
also accuracy per checkpoint.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from dqo_verl.data.io import read_jsonl

PANELS = {
    "losses": ["policy/loss", "value/loss"],
    "is_weights": [
        "dqo/is_weight_mean",
        "dqo/is_weight_min",
        "dqo/is_weight_max",
        "dqo/is_weight_below_0.05",
        "dqo/is_weight_clipped",
    ],
    "values": ["dqo/v_first_mean", "dqo/returns_first_mean", "dqo/reward_mean"],
    "kl": ["dqo/kl_seq_mean"],
    "grad_norm": ["policy/grad_norm", "value/grad_norm"],
}


# by response class (`diag/<class>/<key>`, trainer.methods.DQOTrainer.diagnostics): one panel per key
DIAGNOSTICS = {
    "sequence log-ratio": ["seq_log_ratio"],
    "trajectory weight (mean)": ["weight_mean"],
    "weights at the clip": ["weight_clipped"],
    "V(s_0) (solid) vs return (dashed)": ["v_first", "return_first"],
    "V at the last action (solid) vs return (dashed)": ["v_last", "return_last"],
    "token NLL under the policy": ["nll"],
    "policy loss share": ["policy_loss_share"],
    "value loss share": ["value_loss_share"],
}
CLASS_COLORS = {"right": "tab:green", "wrong": "tab:red", "cut": "tab:gray"}


def plot_diagnostics(metrics: pd.DataFrame, path: Path) -> Path | None:
    """One PNG of the per-class diagnostics over the updates (right, wrong, cut at a length limit)."""
    if not any(c.startswith("diag/") for c in metrics.columns):
        return None
    fig = Figure(figsize=(12, 6))
    axes = fig.subplots(2, 4).ravel()
    for ax, (title, keys) in zip(axes, DIAGNOSTICS.items()):
        for name, color in CLASS_COLORS.items():
            for key, style in zip(keys, ("-", "--")):
                column = f"diag/{name}/{key}"
                if column in metrics:
                    label = name if style == "-" else None
                    ax.plot(metrics["step"], metrics[column], style, color=color, label=label)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("update", fontsize=8)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def load_metrics(run_dir: Path) -> pd.DataFrame:
    return pd.DataFrame(read_jsonl(run_dir / "metrics.jsonl"))


def checkpoint_accuracy(summaries: list[Path]) -> pd.DataFrame:
    """(step, column, accuracy) for every evaluated model whose path names a global_step_N."""
    rows = []
    for path in summaries:
        s = json.loads(Path(path).read_text())
        for name, model_path in s["models"].items():
            m = re.search(r"global_step_(\d+)", model_path)
            if m:
                for col, res in s["results"].get(name, {}).items():
                    rows.append({"step": int(m.group(1)), "column": col, "accuracy": res["accuracy"]})
    return pd.DataFrame(rows, columns=["step", "column", "accuracy"])


def plot_run(run_dir: Path, summaries: list[Path] = ()) -> list[Path]:
    """One PNG per panel of RUN_DIR/metrics.jsonl (and accuracy per checkpoint) in RUN_DIR/plots/."""
    metrics = load_metrics(run_dir)
    out = run_dir / "plots"
    out.mkdir(exist_ok=True)
    written = []
    for name, keys in PANELS.items():
        keys = [k for k in keys if k in metrics]
        if not keys:
            continue
        fig = Figure(figsize=(6, 3.5))
        ax = fig.subplots()
        for k in keys:
            ax.plot(metrics["step"], metrics[k], label=k)
        ax.set(xlabel="update", title=name.replace("_", " "))
        ax.legend(fontsize=7)
        fig.tight_layout()
        written.append(out / f"{name}.png")
        fig.savefig(written[-1], dpi=120)
    diagnostics = plot_diagnostics(metrics, out / "diagnostics.png")
    if diagnostics:
        written.append(diagnostics)
    acc = checkpoint_accuracy(list(summaries))
    if len(acc):
        fig = Figure(figsize=(6, 3.5))
        ax = fig.subplots()
        for col, g in acc.groupby("column"):
            g = g.sort_values("step")
            ax.plot(g["step"], 100 * g["accuracy"], marker="o", label=col)
        ax.set(xlabel="checkpoint (update)", ylabel="accuracy %", title="accuracy per checkpoint")
        ax.legend(fontsize=7)
        fig.tight_layout()
        written.append(out / "accuracy.png")
        fig.savefig(written[-1], dpi=120)
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="a trainer output_dir (with metrics.jsonl)")
    parser.add_argument("--eval", nargs="*", default=[], help="evaluate summary.json files of checkpoints")
    args = parser.parse_args(argv)
    for path in plot_run(Path(args.run_dir), [Path(p) for p in args.eval]):
        print(f"[plots] {path}")


if __name__ == "__main__":
    main()
