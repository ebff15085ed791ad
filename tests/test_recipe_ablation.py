"""experiments/recipe_ablation.py: the rows are valid config overrides and the table reads the right figures."""

from __future__ import annotations

import pytest

from experiments.recipe_ablation import ROWS, row_figures
from worldmodel.run.config import load_config


@pytest.mark.parametrize("row", sorted(ROWS))
def test_every_row_is_a_valid_override_of_the_demo_config(row):
    cfg = load_config("configs/demo.yaml", ["model.latent=none", *ROWS[row]])
    assert cfg.model.latent == "none"


def test_row_figures_reads_the_forecast_ratios_and_the_position_probes():
    metrics = {
        "modes": {
            "copy_last": {"no_event": {"l1": [0.2] * 8}},
            "prediction": {"no_event": {"l1": [0.1, 0.1, 0.1, 0.15, 0.2, 0.2, 0.2, 0.3]}},
        },
        "probes": {"encoded": {"x0": 0.9, "y0": 0.7, "x1": 0.2}},
        "collapse": {"target": {"target_eff_rank": 12.5}},
    }
    row = row_figures(metrics)
    assert row["h1"] == pytest.approx(0.5) and row["h4"] == pytest.approx(0.75) and row["h8"] == pytest.approx(1.5)
    assert row["r2_0"] == pytest.approx(0.8) and row["r2_1"] is None and row["rank"] == 12.5
