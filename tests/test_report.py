"""Report tables on synthetic result rows: summary statistics, ordering, labels, rendering."""

from __future__ import annotations

import io
import math

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lsbench.errors import LsbenchError
from lsbench.report import blog_table, format_cell, summarize, sweep_table, to_csv, to_markdown
from lsbench.schema import ARROW_SCHEMA, COLUMN_NAMES, COLUMNS

MODELS = (("tiny-a", 8, 1_000_000_000), ("tiny-b", 12, 2_000_000_000))
DRAFT, DRAFT_PARAMS = "draft-135m", 134_515_008


def _default(typ: pa.DataType):
    if pa.types.is_list(typ):
        return []
    if pa.types.is_string(typ):
        return ""
    if pa.types.is_boolean(typ):
        return False
    if pa.types.is_integer(typ):
        return 0
    return float("nan")


def make_row(**values) -> dict:
    """One schema row with neutral defaults; `values` overrides columns by name."""
    row = {name: _default(typ) for name, typ, _ in COLUMNS}
    unknown = set(values) - set(COLUMN_NAMES) - {"source_file"}
    assert not unknown, unknown
    row.update(values)
    return row


def speedup_of(strategy: str, exit_layer: int, k: int) -> float:
    # Peaks at E=4, k=4 (2.1x); the spec run sits at 1.3x.
    if strategy == "spec":
        return 1.3
    if strategy == "ar":
        return 1.0
    return 2.0 - abs(exit_layer - 4) * 0.2 + (0.1 if k == 4 else 0.0)


def make_results(models=MODELS, exits=(2, 4, 8), ks=(2, 4), examples=3, repeats=2,
                 spec=True, dataset="lee-news", **extra) -> pd.DataFrame:
    """Per model: the ar baseline, layerskip at each (exit layer, k), a spec run; rows per
    example and repeat with a little per-example spread."""
    rows = []
    for model, layers, params in models:
        runs = [("ar", "", 0, 0)] + [("layerskip", "", e, k) for e in exits for k in ks]
        runs += [("spec", DRAFT, 0, 4)] if spec else []
        for strategy, draft, exit_layer, k in runs:
            base = speedup_of(strategy, exit_layer, k)
            for i in range(examples):
                for r in range(repeats):
                    speedup = base * (1 + 0.05 * (i - 1)) if strategy != "ar" else 1.0
                    tps = 100.0 * speedup
                    accepted = [min(k, 1 + exit_layer // 4)] * 5 if k else []
                    rows.append(make_row(
                        run_id=f"{model}-{strategy}-{exit_layer}-{k}", strategy=strategy,
                        is_baseline=strategy == "ar", model=model, model_num_layers=layers,
                        model_params=params, draft_model=draft,
                        draft_params=DRAFT_PARAMS if draft else 0,
                        draft_num_layers=30 if draft else 0, exit_layer=exit_layer,
                        num_speculations=k, dataset=dataset, example_id=f"ex{i}",
                        example_index=i, repeat=r, tokens_per_s=tps, ms_per_token=1000 / tps,
                        speedup=speedup, drafted_per_round=[k] * 5 if k else [],
                        accepted_per_round=accepted,
                        acceptance_rate=sum(accepted) / (5 * k) if k else float("nan"),
                        mean_accepted_len=1 + sum(accepted) / 5 if k else 1.0,
                        flops_prefill=2.0 * params * 100, flops_per_output_token=2.0 * params,
                        prefill_s=0.05, rougeL=0.3, matches_baseline=True, **extra))
    return pd.DataFrame(rows)


def test_summary_median_and_iqr_match_hand_computed_values():
    rows = [make_row(run_id="r", strategy="layerskip", model="m", exit_layer=4,
                     num_speculations=2, dataset="d", speedup=s, tokens_per_s=10.0 * s,
                     ms_per_token=100.0 / s, prefill_s=0.01 * s, flops_prefill=1e9 * s)
            for s in (4.0, 1.0, 3.0, 2.0)]
    summary = summarize(pd.DataFrame(rows))
    assert len(summary) == 1
    row = summary.iloc[0]
    assert row["n"] == 4
    # Linear interpolation on [1, 2, 3, 4]: p25 = 1.75, median = 2.5, p75 = 3.25.
    assert row["speedup_median"] == pytest.approx(2.5)
    assert row["speedup_p25"] == pytest.approx(1.75)
    assert row["speedup_p75"] == pytest.approx(3.25)
    assert row["tokens_per_s_median"] == pytest.approx(25.0)
    assert row["tokens_per_s_p75"] == pytest.approx(32.5)
    # ms per token: [25, 33.3, 50, 100] -> median (33.33 + 50) / 2
    assert row["ms_per_token_median"] == pytest.approx((100 / 3 + 50) / 2)
    assert row["prefill_s"] == pytest.approx(0.025)
    assert row["flops_prefill"] == pytest.approx(2.5e9)


def test_acceptance_is_total_accepted_over_total_drafted():
    rows = [make_row(run_id="r", strategy="layerskip", exit_layer=2, num_speculations=4,
                     drafted_per_round=[4, 4], accepted_per_round=[4, 0], acceptance_rate=0.5),
            make_row(run_id="r", strategy="layerskip", exit_layer=2, num_speculations=4,
                     drafted_per_round=[4], accepted_per_round=[1], acceptance_rate=0.25)]
    df = pd.DataFrame(rows)
    assert summarize(df)["acceptance_rate"].iloc[0] == pytest.approx(5 / 12)
    # Without the raw lists: the mean of the per-row rates.
    lists = ["drafted_per_round", "accepted_per_round"]
    assert summarize(df.drop(columns=lists))["acceptance_rate"].iloc[0] == pytest.approx(0.375)


def test_baseline_acceptance_is_nan_and_match_rate_counts_true_only():
    rows = [make_row(run_id="b", strategy="ar", is_baseline=True, matches_baseline=v)
            for v in (True, False, None, True)]
    row = summarize(pd.DataFrame(rows)).iloc[0]
    assert math.isnan(row["acceptance_rate"])
    assert row["match_rate"] == pytest.approx(0.5)


def test_summary_survives_a_parquet_round_trip():
    df = make_results()
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pandas(df, schema=ARROW_SCHEMA, preserve_index=False), buf)
    back = pq.read_table(io.BytesIO(buf.getvalue())).to_pandas()
    pd.testing.assert_frame_equal(summarize(back), summarize(df), check_dtype=False)


def test_summary_puts_each_baseline_first_then_strategy_draft_exit_k():
    df = make_results().sample(frac=1.0, random_state=0)  # shuffled input
    summary = summarize(df)
    per_model = 1 + 3 * 2 + 1
    assert len(summary) == 2 * per_model
    assert (summary["n"] == 6).all()
    for model, block in summary.groupby("model", sort=False):
        assert block.iloc[0]["is_baseline"] and block.iloc[0]["strategy"] == "ar"
        assert not block.iloc[1:]["is_baseline"].any()
        ls = block[block["strategy"] == "layerskip"]
        assert list(zip(ls["exit_layer"], ls["num_speculations"], strict=True)) == [
            (2, 2), (2, 4), (4, 2), (4, 4), (8, 2), (8, 4)]
        assert block.iloc[-1]["strategy"] == "spec", model
    assert list(summary["model"].unique()) == ["tiny-a", "tiny-b"]


def test_summary_keeps_source_file_as_a_group_key():
    df = pd.concat([make_results(models=MODELS[:1]).assign(source_file="normal.parquet"),
                    make_results(models=MODELS[:1]).assign(source_file="layerskip.parquet")])
    summary = summarize(df)
    assert len(summary) == 2 * 8
    assert list(summary["source_file"].unique()) == ["layerskip.parquet", "normal.parquet"]


def test_empty_or_incomplete_results_are_user_errors():
    with pytest.raises(LsbenchError, match="no rows"):
        summarize(make_results().iloc[:0])
    with pytest.raises(LsbenchError, match="run_id"):
        summarize(make_results().drop(columns="run_id"))


def test_sweep_table_flags_best_speedup_per_model():
    table = sweep_table(make_results())
    best = table[table["best"]]
    assert list(best["model"]) == ["tiny-a", "tiny-b"]
    assert list(best["exit layer"]) == [4, 4] and list(best["k"]) == [4, 4]
    assert best["speedup"].tolist() == pytest.approx([2.1, 2.1])
    assert not table.loc[table["strategy"] == "ar", "best"].any()
    first = table.iloc[0]
    assert first["strategy"] == "ar" and first["speedup"] == pytest.approx(1.0)
    assert {"tokens/s", "speedup", "acceptance", "ROUGE-L"} <= set(table.columns)


def test_blog_table_labels_and_parameter_totals():
    table = blog_table(make_results(models=MODELS[:1]))
    by_draft = table.set_index(["draft", "k"])
    ee = by_draft.loc[("early exit @ layer 8", 4)]
    assert ee["draft size"] == "8 layers"
    assert ee["total params loaded"] == 1_000_000_000  # early exit loads nothing extra
    assert ee["layers"] == 8 and ee["task"] == "lee-news"
    assert ee["GFLOPs/input"] == pytest.approx(200.0)
    assert ee["GFLOPs/output token"] == pytest.approx(2.0)
    spec = by_draft.loc[(DRAFT, 4)]
    assert spec["draft size"] == "135M"
    assert spec["total params loaded"] == 1_000_000_000 + DRAFT_PARAMS
    ar = table.iloc[0]
    assert ar["draft"] == "—" and ar["draft size"] == "—"
    assert ar["total params loaded"] == 1_000_000_000
    # E=8, k=4: 1.3 * [.95, .95, 1, 1, 1.05, 1.05]; p25 at position 1.25 -> 1.3 * .9625,
    # p75 at position 3.75 -> 1.3 * 1.0375.
    assert ee["speedup IQR"] == "1.25\N{EN DASH}1.35"
    assert "FLOPs/Input (G)" not in table.columns  # the blog's mislabelled name


def test_markdown_has_header_separator_and_one_line_per_row():
    table = blog_table(make_results())
    lines = to_markdown(table).splitlines()
    assert len(lines) == 2 + len(table)
    assert all(line.startswith("|") and line.endswith("|") for line in lines)
    assert [c.strip() for c in lines[0].strip("|").split("|")] == list(table.columns)
    assert set(lines[1]) <= set("|-:")
    assert lines[1].count("|") == len(table.columns) + 1
    assert "2.10x" in to_markdown(table)  # speedup with an x
    assert "early exit @ layer 4" in lines[5]
    assert len({len(line) for line in lines}) == 1  # padded to equal width


def test_markdown_escapes_pipes_and_renders_missing_values():
    table = pd.DataFrame({"model": ["a|b"], "acceptance": [float("nan")], "best": [True]})
    text = to_markdown(table)
    assert "a\\|b" in text and "—" in text and "✓" in text


def test_roofline_in_sweep_and_blog_tables():
    df = make_results(models=MODELS[:1], achieved_gbps=5.0, peak_gbps=20.0,
                      roofline_fraction=0.25)
    for table in (sweep_table(df), blog_table(df)):
        assert table["roofline"].tolist() == pytest.approx([0.25] * len(table))
        assert table["weights GB/s"].tolist() == pytest.approx([5.0] * len(table))
    assert "25.0%" in to_markdown(blog_table(df))
    assert summarize(df)["peak_gbps"].tolist() == pytest.approx([20.0] * len(sweep_table(df)))


def test_cell_formats():
    assert format_cell("tokens/s", 123.456) == "123.46"
    assert format_cell("speedup", 1.5) == "1.50x"
    assert format_cell("GFLOPs/input", 12345.6) == "12300"
    assert format_cell("GFLOPs/output token", 2.4681) == "2.47"
    assert format_cell("total params loaded", 1_234_567_890) == "1.23B"
    assert format_cell("ms/output token", 7.0) == "7.00"
    assert format_cell("k", 4) == "4"


def test_csv_parses_back_with_pandas():
    table = sweep_table(make_results())
    back = pd.read_csv(io.StringIO(to_csv(table)))
    assert list(back.columns) == list(table.columns)
    assert len(back) == len(table)
    assert back["speedup"].tolist() == pytest.approx(table["speedup"].tolist())
    assert back["best"].tolist() == table["best"].tolist()
