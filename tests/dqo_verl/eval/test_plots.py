"""The run's training plots: the per-class diagnostics as one PNG beside the other curves."""

import json

from dqo_verl.eval.plot_metrics import plot_run


def test_the_diagnostics_png_is_drawn_from_metrics_jsonl(tmp_path):
    records = []
    for step in (1, 2, 3):
        r = {"step": step, "policy/loss": 1.0 / step, "value/loss": 0.5}
        for name in ("right", "wrong", "cut"):
            r.update({f"diag/{name}/seq_log_ratio": 0.1 * step, f"diag/{name}/policy_loss_share": 1 / 3})
        records.append(r)
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    written = {p.name for p in plot_run(tmp_path)}
    assert {"losses.png", "diagnostics.png"} <= written
    assert (tmp_path / "plots" / "diagnostics.png").read_bytes()[:4] == b"\x89PNG"
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "policy/loss": 1.0}) + "\n")
    assert "diagnostics.png" not in {p.name for p in plot_run(tmp_path)}  # no per-class metrics: no figure
