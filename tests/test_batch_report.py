"""Batch sizes in reports: `report --table batch`, the crossover, the sweep's closing lines and
the batch-size figures, from hand-made rows whose answers are known by construction."""

from __future__ import annotations

import pandas as pd
import pytest

from lsbench.reporting.plots import sweep_figures
from lsbench.reporting.report import batch_table, crossovers, sweep_table, to_markdown
from lsbench.reporting.terminal import crossover_lines, sweep_renderables
from tests.test_plots import _text_outside_canvas
from tests.test_report import make_row

SIZES = (1, 2, 4)
# speedup on ar of the same batch, per setting and batch size
SPEEDUPS = {("layerskip", 2, 2): {1: 1.5, 2: 1.1, 4: 0.8},  # faster up to batch 2
            ("pld", 0, 2): {1: 0.9, 2: 0.9, 4: 0.9},  # never faster
            ("exit", 2, 0): {1: 3.0, 2: 3.0, 4: 3.0}}  # lossy: no crossover


def batch_rows(sizes=SIZES, examples: int = 4) -> pd.DataFrame:
    rows = []
    runs = [("ar", 0, 0), *list(SPEEDUPS)]
    for b in sizes:
        for strategy, e, k in runs:
            speedup = 1.0 if strategy == "ar" else SPEEDUPS[(strategy, e, k)][b]
            for i in range(examples):
                ms = 10.0 / speedup
                rows.append(make_row(
                    run_id=f"{strategy}-{e}-{k}-B{b}", strategy=strategy, model="m",
                    dataset="d", exit_layer=e, num_speculations=k, is_baseline=strategy == "ar",
                    lossy=strategy == "exit", baseline_strategy="ar", example_id=f"ex{i}",
                    example_index=i, repeat=0, batch_size=b, batch_id=i // b,
                    ms_per_token=ms, tokens_per_s=1000 / ms, speedup=speedup,
                    baseline_ms_per_token=10.0, decode_tokens=10, decode_s=ms / 100,
                    # aggregate throughput grows with the batch: 100 tokens/s per row for ar
                    batch_tokens_per_s=100.0 * b * speedup, model_num_layers=4,
                    matches_baseline=strategy != "exit",
                    lossless_verdict=None if strategy == "exit" else "exact"))
    return pd.DataFrame(rows)


def test_crossover_is_the_largest_batch_size_still_faster() -> None:
    found = {(c["strategy"], c["exit_layer"], c["num_speculations"]): c
             for c in crossovers(batch_rows())}
    assert set(found) == {("layerskip", 2, 2), ("pld", 0, 2)}  # lossy and ar have none
    assert found[("layerskip", 2, 2)]["crossover"] == 2
    assert found[("pld", 0, 2)]["crossover"] is None
    assert found[("layerskip", 2, 2)]["batch_sizes"] == [1, 2, 4]
    # faster again at the largest batch: the crossover is the largest faster one, not the first
    df = batch_rows()
    df.loc[(df.strategy == "pld") & (df.batch_size == 4), "speedup"] = 1.2
    pld = next(c for c in crossovers(df) if c["strategy"] == "pld")
    assert pld["crossover"] == 4
    assert crossovers(batch_rows(sizes=(1,))) == []  # one batch size: nothing to cross


def test_batch_table() -> None:
    table = batch_table(batch_rows())
    assert len(table) == 4 * len(SIZES)
    ar = table[table.strategy == "ar"].set_index("batch")
    assert ar["aggregate tokens/s"].tolist() == [100.0, 200.0, 400.0]
    assert ar["x batch 1"].tolist() == pytest.approx([1.0, 2.0, 4.0])
    ls = table[table.strategy == "layerskip"].set_index("batch")
    assert ls["speedup"].tolist() == pytest.approx([1.5, 1.1, 0.8])
    assert ls["x batch 1"].tolist() == pytest.approx([1.0, 220 / 150, 320 / 150])
    assert set(ls["crossover"]) == {2}
    assert table[table.strategy == "pld"]["crossover"].isna().all()
    text = to_markdown(table)
    assert "x batch 1" in text and "4.00x" in text


def test_sweep_table_and_lines_per_batch_size() -> None:
    df = batch_rows()
    table = sweep_table(df)
    # `best` is chosen per batch size: layerskip at 1 and 2, pld (0.9x) beats 0.8x at 4
    best = table[table.best].set_index("batch")["strategy"].to_dict()
    assert best == {1: "layerskip", 2: "layerskip", 4: "pld"}
    items = sweep_renderables(df)
    titles = [t.title for t in items if not isinstance(t, str)]
    assert len(titles) == 3 and "at batch size 4 (aggregate 400.00 tokens/s)" in titles[2]
    lines = crossover_lines(df)
    assert lines == [line for line in items if str(line).startswith("crossover:")]
    assert lines == [
        "crossover: early exit @ layer 2, k=2 is faster than autoregressive decoding up to "
        "batch size 2 (largest measured faster; measured at 1, 2, 4)",
        "crossover: prompt lookup, k=2 is slower than autoregressive decoding at every "
        "measured batch size (1, 2, 4)"]
    # batch 1 only: the sweep reads as it always has
    one = sweep_renderables(batch_rows(sizes=(1,)))
    assert not any(str(i).startswith("crossover") for i in one)
    assert "batch size" not in one[0].title


def test_batch_figures_one_line_per_setting_inside_the_canvas() -> None:
    figures = sweep_figures(batch_rows())
    speed = figures["speedup_vs_batch_size"]
    ax = speed.axes[0]
    labels = [line.get_label() for line in ax.get_lines()]
    assert labels[0] == "autoregressive (1.0x)" and len(labels) == 4  # 1.0x + 3 settings
    assert [list(line.get_xdata()) for line in ax.get_lines()[1:]] == [[1, 2, 4]] * 3
    throughput = figures["aggregate_tokens_per_s_vs_batch_size"].axes[0]
    ar = next(line for line in throughput.get_lines() if line.get_label() == "autoregressive")
    assert list(ar.get_ydata()) == [100.0, 200.0, 400.0]
    for name, fig in figures.items():
        assert _text_outside_canvas(fig) == [], name
    assert "speedup_vs_batch_size" not in sweep_figures(batch_rows(sizes=(1,)))


def test_html_report_has_a_block_per_batch_size_and_the_batch_table() -> None:
    from lsbench.reporting.html import html_report

    page = html_report(batch_rows(), ["batch.parquet"])
    assert '<a href="#batch">batch</a>' in page and "<h2 id=batch>Batch sizes</h2>" in page
    for b in SIZES:
        assert f"<h3>m on d at batch size {b}</h3>" in page
    assert "crossover: early exit @ layer 2, k=2 is faster" in page
    plain_page = html_report(batch_rows(sizes=(1,)), ["one.parquet"])
    assert "id=batch" not in plain_page and "<h3>m on d</h3>" in plain_page
