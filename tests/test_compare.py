"""`make compare`'s table and chart from crafted runs."""

import pandas as pd

from dqo_verl.compare import plot_bars, slug, table


def test_the_table_gives_mean_and_sample_std_over_seeds(tmp_path):
    runs = pd.DataFrame(
        [
            {"method": "base", "seed": None, "synthetic greedy": 0.5, "synthetic sample": 0.4},
            {"method": "DQO", "seed": 0, "synthetic greedy": 0.60, "synthetic sample": 0.50},
            {"method": "DQO", "seed": 1, "synthetic greedy": 0.62, "synthetic sample": 0.47},
            {"method": "DQO", "seed": 2, "synthetic greedy": 0.58, "synthetic sample": 0.53},
            {"method": "DQO, lambda 0.95", "seed": 0, "synthetic greedy": 0.55, "synthetic sample": 0.45},
        ]
    )
    out = table(runs, ["synthetic greedy", "synthetic sample"])
    assert list(out.index) == ["base", "DQO", "DQO, lambda 0.95"]
    assert out.loc["DQO", "synthetic greedy"] == "60.0 ± 2.0" and out.loc["DQO", "synthetic sample"] == "50.0 ± 3.0"
    assert out.loc["base", "synthetic greedy"] == "50.0" and out.loc["DQO", "seeds"] == 3
    assert plot_bars(runs, ["synthetic greedy"], tmp_path / "bars.png").read_bytes()[:4] == b"\x89PNG"
    assert slug("DQO + PS") == "dqo_ps" and slug("DQO, no IS on the value loss") == "dqo_no_is_on_the_value_loss"
