"""The value model as a verifier: metrics of how well V tells right from wrong (docs/design.md, "Using V").

    python -m dqo_verl.eval.verifier VALUE_MODEL --corpus DATA/corpus_ps.parquet [--threshold 0.5] [--out DIR]

reads responses with process labels (the `process` stage's output; for held-out prompts, point a recipe's
`paths.data` at another folder and run its prompts, corpus, score and process stages there), and writes
`DIR/verifier.md` (a table), `verifier.json` and `verifier.png` (final values of right and wrong answers; F1
against the threshold).

- outcome verifier: V at the state before a response's final token (its eos; the last state for a cut
  response) scores the response; `auroc` of those scores against the final answer's correctness;
- step verifier (ProcessBench, Zheng et al. 2024): responses split into blank-line steps with the process-score
  stage's labels (a failed response's first wrong step is its `correct_prefix`; a correct response has none,
  -1). The predicted first wrong step is the first step after which V falls below a threshold
  (`first_below`); `processbench_f1` is the harmonic mean of the accuracy on erroneous and on correct
  responses; `step_drop_auroc` scores each step by V's drop across it (V before - V after) against "this is
  the first wrong step" over the steps up to and including it.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from transformers import AutoModelForTokenClassification

from dqo_verl.data.io import write_json_atomic
from dqo_verl.workers.values import final_value, forward_values


def auroc(scores: Sequence[float], labels: Sequence[bool]) -> float:
    """P(score of a random positive > score of a random negative), ties counting 1/2 (Mann-Whitney U)."""
    s, y = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"auroc needs both classes ({n_pos} positive, {n_neg} negative)")
    ranks = pd.Series(s).rank(method="average").to_numpy()  # tied scores share their mean rank
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def first_below(step_values: Sequence[float], threshold: float) -> int:
    """Index of the first step whose value (V after it) is below `threshold`; -1 when none is."""
    below = np.flatnonzero(np.asarray(step_values, dtype=np.float64) < threshold)
    return int(below[0]) if len(below) else -1


def processbench_f1(predicted: Sequence[int], truth: Sequence[int]) -> dict:
    """ProcessBench's scores of first-error-step predictions (-1 = no error): accuracy on the erroneous
    responses (the exact step), on the correct ones (no step flagged), and their harmonic mean."""
    p, t = np.asarray(predicted), np.asarray(truth)
    erroneous, correct = t >= 0, t < 0
    acc_err = float((p[erroneous] == t[erroneous]).mean()) if erroneous.any() else float("nan")
    acc_cor = float((p[correct] == -1).mean()) if correct.any() else float("nan")
    f1 = 2 * acc_err * acc_cor / (acc_err + acc_cor) if acc_err + acc_cor > 0 else 0.0
    return {"erroneous_accuracy": acc_err, "correct_accuracy": acc_cor, "f1": f1}


def step_drop_auroc(start_values: Sequence[float], step_values: Sequence[Sequence[float]], truth: Sequence[int]):
    """AUROC of V's drop across a step (the value before it - the value after it) for "first wrong step" against
    the correct steps before it (every step of a correct response).

    `start_values[i]`: V after the prompt of response i; `step_values[i][k]`: V after its step k."""
    drops, labels = [], []
    for v0, values, first_wrong in zip(start_values, step_values, truth):
        before = np.concatenate([[v0], np.asarray(values[:-1], dtype=np.float64)])
        drop = before - np.asarray(values, dtype=np.float64)
        last = len(values) if first_wrong < 0 else first_wrong + 1
        drops.extend(drop[:last])
        labels.extend(k == first_wrong for k in range(last))
    return auroc(drops, labels)


def step_values(values: np.ndarray, segment_ends: Sequence[int], response_ids: Sequence[int], eos: int) -> list:
    """V after each step: at the state after its last token; the last step's is the response's final value."""
    return [float(values[e + 1]) for e in segment_ends[:-1]] + [final_value(values, list(response_ids), eos)]


def verify(corpus: pd.DataFrame, state_values: list[np.ndarray], eos: int, threshold: float) -> dict:
    """Outcome AUROC, ProcessBench F1 at `threshold` (and the best threshold's), and the step-drop AUROC."""
    truth = [-1 if s == 1 else int(c) for s, c in zip(corpus["score"], corpus["correct_prefix"])]
    steps = [step_values(v, e, r, eos) for v, e, r in zip(state_values, corpus["segment_ends"], corpus["response_ids"])]
    finals = [s[-1] for s in steps]
    f1 = processbench_f1([first_below(s, threshold) for s in steps], truth)
    every = [x for s in steps for x in s]
    grid = np.linspace(min(every), max(every), 101) if every else []
    sweep = {round(float(t), 4): processbench_f1([first_below(s, t) for s in steps], truth)["f1"] for t in grid}
    best = max(sweep, key=sweep.get) if sweep else threshold
    correct = corpus["score"].to_numpy() == 1
    try:
        drop_auroc = step_drop_auroc([float(v[0]) for v in state_values], steps, truth)
    except ValueError:  # no wrong step, or no correct one, to compare
        drop_auroc = float("nan")
    return {
        "responses": len(corpus),
        "correct": int(correct.sum()),
        "outcome_auroc": auroc(finals, correct) if 0 < correct.sum() < len(corpus) else float("nan"),
        "threshold": threshold,
        **f1,
        "best_threshold": best,
        "best_f1": sweep.get(best, f1["f1"]),
        "step_drop_auroc": drop_auroc,
        "f1_by_threshold": sweep,
        "final_values": finals,
    }


def plot(result: dict, correct: np.ndarray, path: Path) -> None:
    """Final values of right and wrong answers; ProcessBench F1 against the threshold."""
    fig = Figure(figsize=(10, 4))
    left, right = fig.subplots(1, 2)
    finals = np.asarray(result["final_values"])
    left.hist([finals[correct], finals[~correct]], bins=20, label=["right answer", "wrong answer"])
    left.set(xlabel="final V", ylabel="responses", title=f"outcome AUROC {result['outcome_auroc']:.2f}")
    left.legend(fontsize=8)
    sweep = result["f1_by_threshold"]
    right.plot(list(sweep), list(sweep.values()))
    right.axvline(result["threshold"], color="gray", linestyle="--")
    right.set(xlabel="threshold on V", ylabel="ProcessBench F1", title="first wrong step: V below the threshold")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("value_model", help="HF folder of a value model (e.g. a run's export/value)")
    parser.add_argument("--corpus", required=True, help="a process-scored corpus (corpus_ps.parquet)")
    parser.add_argument("--threshold", type=float, default=0.5)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--out", default="verifier")
    args = parser.parse_args(argv)

    corpus = pd.read_parquet(args.corpus)
    missing = {"prompt_ids", "response_ids", "score", "segment_ends", "correct_prefix"} - set(corpus.columns)
    if missing:
        raise SystemExit(f"error: {args.corpus} has no column {sorted(missing)[0]!r} (run the process stage on it)")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float32 if device == "cpu" else torch.bfloat16  # as the value workers load it
    model = AutoModelForTokenClassification.from_pretrained(args.value_model, dtype=dtype).to(device).eval()
    pad = 0 if model.config.pad_token_id is None else model.config.pad_token_id
    eos = model.config.eos_token_id
    eos = eos[0] if isinstance(eos, list) else eos
    state = []
    for i in range(0, len(corpus), args.batch_size):
        rows = corpus.iloc[i : i + args.batch_size]
        state += forward_values(
            model, rows["prompt_ids"].map(list).tolist(), rows["response_ids"].map(list).tolist(), pad
        )
    result = verify(corpus, state, eos, args.threshold)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = pd.DataFrame(
        [
            ("responses (right answers)", f"{result['responses']} ({result['correct']})"),
            ("outcome verifier: AUROC of the final V", f"{result['outcome_auroc']:.3f}"),
            (f"first wrong step, V < {args.threshold}: ProcessBench F1", f"{result['f1']:.3f}"),
            ("  exact step on erroneous responses", f"{result['erroneous_accuracy']:.3f}"),
            ("  no step flagged on correct responses", f"{result['correct_accuracy']:.3f}"),
            (f"  best threshold ({result['best_threshold']}): F1", f"{result['best_f1']:.3f}"),
            ("step verifier: AUROC of V's drop at the first wrong step", f"{result['step_drop_auroc']:.3f}"),
        ],
        columns=["metric", "value"],
    )
    (out / "verifier.md").write_text(table.to_markdown(index=False) + "\n")
    write_json_atomic(out / "verifier.json", {k: v for k, v in result.items() if k != "final_values"})
    plot(result, corpus["score"].to_numpy() == 1, out / "verifier.png")
    print(table.to_markdown(index=False))
    print(f"[verifier] -> {out} (verifier.md, verifier.json, verifier.png)")
    return result


if __name__ == "__main__":
    main()
