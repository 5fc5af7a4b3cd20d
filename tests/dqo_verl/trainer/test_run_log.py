"""What a run prints: a short metrics line every `trainer.log_every` updates, not verl's whole metrics dict."""

import json

import numpy as np
import pandas as pd
from omegaconf import OmegaConf

from dqo_verl.trainer.base import RunLog


def test_a_short_line_every_n_updates_and_every_metric_in_metrics_jsonl(tmp_path, capsys):
    cfg = OmegaConf.create(
        {
            "algorithm": {"name": "dqo"},
            "trainer": {"logger": ["console"], "log_every": 2, "project_name": "p", "experiment_name": "e"},
        }
    )
    log = RunLog(cfg, tmp_path, step=0, total_steps=3)
    rows = pd.DataFrame({"response_ids": [[1, 2, 3], [4]]})
    for step in (1, 2, 3):
        metrics = {"policy/loss": 0.5 / step, "value/loss": 0.25, "dqo/is_weight_max": 2.0, "other/x": 7.0}
        log.update(step, 0, step - 1, np.arange(2), rows, metrics, elapsed=0.5)
    log.close(tmp_path / "ckpt", {})
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("[DQO]")]
    assert lines == [
        "[DQO] step 2/3 epoch 1: policy/loss 0.25 value/loss 0.25 (0.5 s/update)",
        "[DQO] step 3/3 epoch 1: policy/loss 0.1667 value/loss 0.25 (0.5 s/update)",
    ]
    assert "other/x" not in out  # the whole dict goes to the files, not the console
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert records[0]["other/x"] == 7.0 and records[0]["perf/response_tokens_per_s"] == 8.0
