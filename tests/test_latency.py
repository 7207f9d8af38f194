"""Latency columns (issue 21, item 4): TTFT, TPOT and inter-token latency percentiles from the
raw per-step record, per row and in the summary table."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lsbench.reporting.report import summarize, to_markdown
from lsbench.results.store import ResultStore
from lsbench.scenario.jobs import compare_job
from lsbench.scenario.latency import itl_percentiles, latency_columns, token_gaps
from lsbench.scenario.runner import run_job
from tests.test_report import make_row
from tests.test_runner import job_settings, write_jsonl


def test_a_round_of_four_is_one_gap_then_three_zeros():
    assert token_gaps([0.5], [4]) == [0.5, 0.0, 0.0, 0.0]
    # Three rounds of 4 ending 2 s apart: each round's gap is measured from the previous end.
    assert token_gaps([2.0, 4.0, 6.0], [4, 4, 4]) == [2.0, 0, 0, 0] * 3


def test_first_gap_counts_from_the_first_token_and_empty_steps_fold_into_the_next():
    assert token_gaps([0.25, 0.5, 1.5], [1, 1, 1]) == [0.25, 0.25, 1.0]
    assert token_gaps([1.0, 2.0, 3.0], [1, 0, 2]) == [1.0, 2.0, 0.0]
    with pytest.raises(ValueError):
        token_gaps([1.0], [1, 1])


def test_percentiles_of_rounds_of_four():
    # 10 rounds of 4: 30 zero gaps then 10 gaps of g; the 75% zeros decide p50 only.
    g = 0.04
    gaps = token_gaps([g * (i + 1) for i in range(10)], [4] * 10)
    assert len(gaps) == 40 and sum(x == 0 for x in gaps) == 30
    p = itl_percentiles(gaps)
    assert p["itl_p50_s"] == 0.0
    assert p["itl_p90_s"] == pytest.approx(g) and p["itl_p99_s"] == pytest.approx(g)


def test_percentiles_of_autoregressive_steps():
    # 100 one-token steps whose gaps are 1..100 ms: the order statistics are the gaps themselves.
    ends = np.cumsum(np.arange(1, 101) / 1000).tolist()
    p = itl_percentiles(token_gaps(ends, [1] * 100))
    assert p["itl_p50_s"] == pytest.approx(0.0505)
    assert p["itl_p90_s"] == pytest.approx(0.0901)
    assert p["itl_p99_s"] == pytest.approx(0.09901)


def test_latency_columns_of_a_generation():
    cols = latency_columns(0.3, 1.2, 6, [0.6, 1.2], [3, 3])
    assert cols["ttft_s"] == 0.3 and cols["tpot_s"] == pytest.approx(0.2)
    assert cols["itl_p50_s"] == 0.0 and cols["step_tokens"] == [3, 3]
    one_token = latency_columns(0.3, 0.0, 0, [], [])
    assert math.isnan(one_token["tpot_s"]) and math.isnan(one_token["itl_p99_s"])


@pytest.fixture(scope="module")
def rows(tiny_model_dir: Path, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("latency")
    data = write_jsonl(tmp / "articles.jsonl")
    job = compare_job(job_settings(tiny_model_dir, data, data__limit=1,
                                   compare__early_exit="2", compare__num_speculations="3",
                                   compare__hf_reference=True, decoding__max_new_tokens=12), 4)
    store = ResultStore(tmp / "c.parquet")
    run_job(job, store)
    return store.path, ResultStore(store.path).rows()


def test_runner_rows_keep_steps_that_reconstruct_decode(rows):
    rows = rows[1]
    assert {"ar", "layerskip", "hf-ar", "hf-early-exit"} <= set(rows.strategy)
    for r in rows.to_dict("records"):
        ends, counts = list(r["step_end_s"]), list(r["step_tokens"])
        assert sum(counts) == r["decode_tokens"] > 0, r["strategy"]
        gaps = token_gaps(ends, counts)
        assert len(gaps) == r["decode_tokens"]
        assert sum(gaps) == pytest.approx(ends[-1])
        # The last step ends at most at decode_s (the loop's final sync follows it).
        assert 0 < ends[-1] <= r["decode_s"] and ends == sorted(ends)
        assert r["ttft_s"] == r["prefill_s"]
        assert r["tpot_s"] == pytest.approx(r["decode_s"] / r["decode_tokens"])
        assert r["itl_p50_s"] <= r["itl_p90_s"] <= r["itl_p99_s"] <= max(gaps)
        if r["strategy"] == "layerskip":  # rounds of several tokens share one gap
            assert len(ends) == r["rounds"] < r["decode_tokens"]


def test_summary_pools_the_run_tokens_and_shows_milliseconds():
    a = make_row(strategy="layerskip", model="m", run_id="r", exit_layer=2, num_speculations=3,
                 ttft_s=0.010, tpot_s=0.002, step_end_s=[0.004, 0.008], step_tokens=[2, 2])
    b = {**a, "example_id": "e2", "ttft_s": 0.030, "tpot_s": 0.004,
         "step_end_s": [0.1], "step_tokens": [1]}
    s = summarize(pd.DataFrame([a, b]))
    # Pooled gaps, sorted: 0, 0, 4, 4, 100 ms (not the median of each row's percentiles).
    # p99 sits 0.96 of the way from the 4th (4 ms) to the 5th (100 ms): 96.16 ms.
    assert s.loc[0, "ttft_ms"] == pytest.approx(20) and s.loc[0, "tpot_ms"] == pytest.approx(3)
    assert s.loc[0, "itl_p50_ms"] == pytest.approx(4)
    assert s.loc[0, "itl_p99_ms"] == pytest.approx(96.16)
    header, _, line = to_markdown(s).splitlines()
    cells = dict(zip(header.split("|"), line.split("|"), strict=True))
    cells = {k.strip(): v.strip() for k, v in cells.items()}
    assert (cells["ttft_ms"], cells["tpot_ms"], cells["itl_p99_ms"]) == ("20.00", "3.00",
                                                                         "96.16")


def test_report_summary_shows_latency(rows):
    from typer.testing import CliRunner

    from lsbench.cli import app

    result = CliRunner().invoke(app, ["report", str(rows[0]), "--table", "summary"])
    assert result.exit_code == 0, result.output
    header = result.output.splitlines()[0]
    for col in ("ttft_ms", "tpot_ms", "itl_p50_ms", "itl_p90_ms", "itl_p99_ms"):
        assert f" {col} " in header
