"""experiments/stable_token.py: what it reads from two runs' metrics and when it fails the recipe."""

from __future__ import annotations

from experiments.stable_token import summary, verdict


def _metrics(agent: float, forecast: float) -> dict:
    return {
        "modes": {
            "copy_last": {"no_event": {"l1": [0.2, 0.3]}},
            "prediction": {"no_event": {"l1": [0.2 * forecast, 0.25]}},
        },
        "probes": {"encoded": {"x0": agent, "y0": agent - 0.02, "vx0": 0.1, "x1": 0.5, "y1": 0.7}},
        "collapse": {"target": {"target_eff_rank": 20.0}},
    }


def test_summary_reads_the_agent_probe_and_the_one_step_forecast():
    row = summary(_metrics(0.9, 0.6))
    assert abs(row["agent_r2"] - 0.89) < 1e-9 and abs(row["object_r2"] - 0.6) < 1e-9
    assert abs(row["forecast_h1"] - 0.6) < 1e-9 and row["target_eff_rank"] == 20.0


def test_verdict_passes_a_robust_recipe_and_fails_on_either_criterion():
    plain = summary(_metrics(0.9, 0.6))
    assert verdict(plain, summary(_metrics(0.85, 0.7))) == []
    assert "agent R²" in verdict(plain, summary(_metrics(0.7, 0.7)))[0]
    assert "forecast" in verdict(plain, summary(_metrics(0.9, 0.95)))[0]
    assert len(verdict(plain, summary(_metrics(0.1, 1.0)))) == 2
