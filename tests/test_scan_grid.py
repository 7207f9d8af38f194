"""A scan against a fully measured grid (`scan_report.grid_check`, `make ab`'s scan section),
on hand-built frames whose right answers are known by construction."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from lsbench.reporting.scan_report import grid_check, predicted_vs_measured, surface
from lsbench.training.ab import scan_section

L = 3
DECODE = 10  # tokens decoded per example (new_tokens - 1)
# (E, example) -> predicted ms/token; the scan's own autoregressive baseline is 10 ms/token.
PREDICTED = {(1, "a"): 2.0, (1, "b"): 8.0,  # total 200 / 100 ms: 2.0x (per-example mean 3.1x)
             (2, "a"): 4.0, (2, "b"): 4.0,  # 2.5x: the best predicted below the last layer
             (3, "a"): 1.4, (3, "b"): 1.4}  # 7.14x, but E = L is not self-speculation
# (E, example) -> measured decode seconds over DECODE tokens; the sweep's baseline: 0.1 s.
MEASURED = {(1, "a"): 0.02, (1, "b"): 0.06,  # 80 ms / 20 tokens = 4 ms: 2.5x, the best
            (2, "a"): 0.05, (2, "b"): 0.05,  # 5 ms: 2.0x
            (3, "a"): 0.01, (3, "b"): 0.01}  # 1 ms: 10x
PRED_ACCEPTED = {(2, "b"): [1, 1]}  # measured [1, 0]: rounds differ on one (example, point)
PRED_DRAFTED = {(1, "a"): [2, 1]}  # measured [2, 2]: drafted counts differ on another


def _frames() -> tuple[pd.DataFrame, pd.DataFrame]:
    scan, runs = [], []
    for (e, ex), ms in PREDICTED.items():
        common = {"model": "m", "dataset": "d", "example_id": ex, "exit_layer": e,
                  "draft_model": "", "num_speculations": 2}
        row = {**common, "strategy": "layerskip", "confidence_threshold": math.nan,
               "new_tokens": DECODE + 1, "baseline_ms_per_token": 10.0,
               "predicted_ms_per_token": ms,
               "predicted_drafted_per_round": PRED_DRAFTED.get((e, ex), [2, 2]),
               "predicted_accepted_per_round": PRED_ACCEPTED.get((e, ex), [1, 0]),
               "predicted_rounds": 2, "min_margin": 1.0}
        scan.append(row)
        # A policy the sweep never ran, predicted far faster: must not be picked.
        scan.append({**row, "strategy": "layerskip-conf", "confidence_threshold": 0.5,
                     "predicted_ms_per_token": 0.1})
        runs.append({**common, "strategy": "layerskip", "is_baseline": False,
                     "decode_s": MEASURED[e, ex], "decode_tokens": DECODE,
                     "drafted_per_round": [2, 2], "accepted_per_round": [1, 0]})
    for ex in ("a", "b"):
        runs.append({"model": "m", "dataset": "d", "example_id": ex, "strategy": "ar",
                     "exit_layer": 0, "draft_model": "", "num_speculations": 0,
                     "is_baseline": True, "decode_s": 0.1, "decode_tokens": DECODE,
                     "drafted_per_round": [], "accepted_per_round": []})
    return pd.DataFrame(scan), pd.DataFrame(runs)


def test_grid_check_aggregates_over_tokens_and_picks_best_points_below_the_last_layer():
    scan, results = _frames()
    check = grid_check(scan, results, best_below_exit=L)
    assert (check.points, check.example_points) == (3, 6)
    assert (check.identical_rounds, check.identical_drafted) == (5, 4)
    # Relative errors per point: 2.0/2.5 - 1 = -0.2, 2.5/2.0 - 1 = +0.25, (100/14)/10 - 1.
    errors = [-0.2, 0.25, 100 / 14 / 10 - 1]
    assert check.median_abs_rel_error == pytest.approx(0.25)
    assert check.median_abs_rel_error != pytest.approx(sorted(errors)[1])  # signed: -0.2
    assert check.best_predicted == pytest.approx(
        {"exit_layer": 2, "num_speculations": 2, "predicted_speedup": 2.5,
         "measured_speedup": 2.0})
    assert check.best_measured == pytest.approx(
        {"exit_layer": 1, "num_speculations": 2, "predicted_speedup": 2.0,
         "measured_speedup": 2.5})
    assert check.best_ratio == pytest.approx(2.0 / 2.5)
    # Over every exit, the last layer's point wins on both sides.
    every = grid_check(scan, results)
    assert every.best_predicted["exit_layer"] == every.best_measured["exit_layer"] == 3
    assert every.best_ratio == pytest.approx(1.0)


def test_the_surface_and_the_verify_table_agree_with_the_grid_numbers():
    scan, results = _frames()
    surf = surface(scan[scan["strategy"] == "layerskip"]).set_index("exit_layer")
    assert surf.loc[1, "predicted_speedup"] == pytest.approx(2.0)
    points = surf.reset_index()
    table = predicted_vs_measured(scan, results, points).set_index("point")
    assert table.loc["layerskip E=2 k=2", "identical rounds"] == "1/2"
    assert table.loc["layerskip E=1 k=2", "identical rounds"] == "2/2"
    assert table.loc["layerskip E=1 k=2", "measured speedup"] == pytest.approx(2.5)
    assert table.loc["layerskip E=2 k=2", "rel. error"] == pytest.approx(0.25)


def test_the_ab_scan_section_reports_the_check_and_its_targets():
    scan, results = _frames()
    check = grid_check(scan, results, best_below_exit=L).as_dict()
    lines, targets = scan_section({"layerskip": check})
    text = "\n".join(lines)
    assert "## Scan against the measured grid" in text
    assert "| layerskip | 5/6 (83.3%) | 4/6 (66.7%) | 25.0% over 3 points | E=2 k=2 |" in text
    assert "| 2.50x / 2.00x | E=1 k=2 | 2.50x | 0.800 |" in text
    assert list(targets.values()) == [False, False]  # 25% > 10%; 0.8 < 0.95
    good = {**check, "median_abs_rel_error": 0.1, "best_ratio": 0.95}
    assert list(scan_section({"layerskip": good})[1].values()) == [True, True]
    assert "- [x] scan: on the LayerSkip twin" in "\n".join(scan_section({"layerskip": good})[0])
