"""Report tables on synthetic result rows: summary statistics, ordering, labels, rendering."""

from __future__ import annotations

import io
import math

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lsbench.errors import LsbenchError
from lsbench.reporting.report import (
    blog_table,
    format_cell,
    summarize,
    sweep_table,
    to_csv,
    to_markdown,
)
from lsbench.results.schema import ARROW_SCHEMA, COLUMN_NAMES, COLUMNS

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


def test_csv_values_are_the_parquet_rows():
    """Each CSV line against the raw rows of its run, read back from Parquet: per-run values
    equal, medians of speedup and tokens/s over its rows, and one count per example."""
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pandas(make_results(), schema=ARROW_SCHEMA,
                                        preserve_index=False), buf)
    rows = pq.read_table(io.BytesIO(buf.getvalue())).to_pandas()
    table = sweep_table(rows)
    back = pd.read_csv(io.StringIO(to_csv(table)))
    assert list(back.columns) == list(table.columns)
    runs = rows.groupby(["model", "strategy", "exit_layer", "num_speculations"])
    assert len(back) == len(runs)
    for line in back.to_dict("records"):
        run = runs.get_group((line["model"], line["strategy"], line["exit layer"], line["k"]))
        assert line["dataset"] == run["dataset"].iloc[0]
        assert line["n"] == run["example_id"].nunique()
        assert line["speedup"] == pytest.approx(run["speedup"].median())
        assert line["tokens/s"] == pytest.approx(run["tokens_per_s"].median())
        acceptance = run["acceptance_rate"].iloc[0]
        assert (math.isnan(line["acceptance"]) if math.isnan(acceptance)
                else line["acceptance"] == pytest.approx(acceptance))
    best = back[back["best"]]
    assert len(best) == rows["model"].nunique()  # one best run per model: its fastest
    for line in best.to_dict("records"):
        fastest = rows[rows["model"] == line["model"]].groupby("run_id")["speedup"].median()
        assert line["speedup"] == pytest.approx(fastest.max())


# --- spread, confidence and the two engines (issue 9) ----------------------------------------

def _run_rows(strategy: str, speedups: list[float], *, exit_layer: int = 0, k: int = 0,
              base: str = "ar", tokens: int = 10, base_ms: float = 10.0, repeat: int = 0,
              **extra) -> list[dict]:
    return [make_row(run_id=f"{strategy}-{exit_layer}-{k}", strategy=strategy,
                     is_baseline=strategy in ("ar", "hf-ar"), model="m", dataset="d",
                     exit_layer=exit_layer, num_speculations=k, example_id=f"ex{i}",
                     example_index=i, repeat=repeat, speedup=s, baseline_strategy=base,
                     baseline_ms_per_token=base_ms, ms_per_token=base_ms / s,
                     decode_tokens=tokens, decode_s=base_ms / s * tokens / 1000, **extra)
            for i, s in enumerate(speedups)]


def test_speedup_estimators_median_ci_time_ratio_and_n():
    speedups = [1.0, 1.2, 1.5, 2.0, 3.0]
    rows = _run_rows("ar", [1.0] * 5) + _run_rows("layerskip", speedups, exit_layer=2, k=3)
    # a second repeat of the same examples: per-example speedup is the median over repeats
    rows += _run_rows("layerskip", [s * 1.1 for s in speedups], exit_layer=2, k=3, repeat=1)
    s = summarize(pd.DataFrame(rows)).set_index("strategy")
    ls = s.loc["layerskip"]
    assert ls.n_examples == 5 and ls.n == 10
    assert ls.speedup_example_median == pytest.approx(1.5 * 1.05)
    assert ls.speedup_ci_low < ls.speedup_example_median < ls.speedup_ci_high
    assert ls.speedup_ci_low >= 1.0 * 1.05 and ls.speedup_ci_high <= 3.0 * 1.05
    base_time = 10 * 10.0 * 10
    run_time = sum(10.0 / x * 10 + 10.0 / (x * 1.1) * 10 for x in speedups)
    assert ls.time_ratio == pytest.approx(base_time / run_time)
    assert (s.loc["ar", ["speedup_ci_low", "speedup_ci_high", "time_ratio"]] == 1.0).all()
    again = summarize(pd.DataFrame(rows)).set_index("strategy").loc["layerskip"]
    assert (again.speedup_ci_low, again.speedup_ci_high) == (ls.speedup_ci_low,
                                                             ls.speedup_ci_high)  # seeded
    table = blog_table(pd.DataFrame(rows))
    assert {"speedup 95% CI", "time ratio", "n", "baseline", "vs transformers"} <= set(table)
    assert "\N{EN DASH}" in table.set_index("strategy").loc["layerskip", "speedup 95% CI"]


def test_cross_engine_column_pairs_each_strategy_with_its_transformers_counterpart():
    rows = (_run_rows("ar", [1.0] * 3, base_ms=10.0)
            + _run_rows("hf-ar", [1.0] * 3, base="hf-ar", base_ms=11.0)
            + _run_rows("layerskip", [10 / 6] * 3, exit_layer=2, k=3)
            + _run_rows("hf-early-exit", [11 / 9] * 3, exit_layer=2, k=3, base="hf-ar",
                        base_ms=11.0)
            + _run_rows("layerskip", [2.0] * 3, exit_layer=3, k=3))  # no counterpart
    s = summarize(pd.DataFrame(rows))
    vs = {(r.strategy, r.exit_layer): r.vs_transformers for r in s.itertuples()}
    assert vs[("ar", 0)] == vs[("hf-ar", 0)] == pytest.approx(10 / 11)
    assert vs[("layerskip", 2)] == vs[("hf-early-exit", 2)] == pytest.approx(6 / 9)
    assert math.isnan(vs[("layerskip", 3)])
    table = sweep_table(pd.DataFrame(rows)).set_index(["strategy", "exit layer"])
    assert table.loc[("hf-early-exit", 2), "baseline"] == "hf-ar"
    assert table.loc[("layerskip", 2), "baseline"] == "ar"
    assert table.loc[("hf-early-exit", 2), "speedup"] == pytest.approx(11 / 9)
    assert not table.loc[("hf-ar", 0), "best"]


def test_compiled_ar_pairs_with_transformers_compiled_generate():
    rows = (_run_rows("ar", [1.0] * 3, base_ms=10.0, compiled=True)
            + _run_rows("hf-ar", [1.0] * 3, base="hf-ar", base_ms=11.0, compiled=False)
            + _run_rows("hf-ar-compiled", [11 / 8] * 3, base="hf-ar", base_ms=11.0,
                        compiled=True))
    vs = {r.strategy: r.vs_transformers for r in summarize(pd.DataFrame(rows)).itertuples()}
    assert vs["ar"] == vs["hf-ar-compiled"] == pytest.approx(10 / 8)
    assert math.isnan(vs["hf-ar"])
    eager = [{**r, "compiled": False} for r in rows if r["strategy"] != "hf-ar-compiled"]
    vs = {r.strategy: r.vs_transformers for r in summarize(pd.DataFrame(eager)).itertuples()}
    assert vs["ar"] == vs["hf-ar"] == pytest.approx(10 / 11)
    # files written before the compiled column pair as eager
    old = [{k: v for k, v in r.items() if k != "compiled"} for r in eager]
    assert summarize(pd.DataFrame(old)).vs_transformers.iloc[0] == pytest.approx(10 / 11)


def test_lossless_verdict_is_the_worst_of_the_rows():
    rows = (_run_rows("ar", [1.0] * 3, lossless_verdict="exact")
            + _run_rows("layerskip", [1.0] * 3, exit_layer=2, k=3, lossless_verdict="near-tie")
            + _run_rows("layerskip", [1.0] * 3, exit_layer=3, k=3, lossless_verdict="MISMATCH"))
    rows[-1]["lossless_verdict"] = "exact"
    s = summarize(pd.DataFrame(rows)).set_index("exit_layer")
    assert s.loc[0, "verdict"] == "exact" and s.loc[2, "verdict"] == "near-tie"
    assert s.loc[2, "near_ties"] == 3 and s.loc[3, "verdict"] == "MISMATCH"
    assert s.loc[3, "mismatches"] == 2


# --- lossy rows and prompt lookup ---------------------------------------------------------------

def _with_exit_and_pld(exit_speedup: float, rouge: float = 0.2) -> pd.DataFrame:
    """One model's results plus a fast lossy `exit` run and a `pld` run with empty rounds."""
    df = make_results(models=MODELS[:1], exits=(2, 4), ks=(4,), spec=False)
    extra = []
    for i in range(3):
        common = dict(model="tiny-a", model_num_layers=8, model_params=MODELS[0][2],
                      dataset="lee-news", example_id=f"ex{i}", example_index=i)
        extra.append(make_row(run_id="exit-2", strategy="exit", exit_layer=2, lossy=True,
                              speedup=exit_speedup, tokens_per_s=100 * exit_speedup,
                              ms_per_token=10 / exit_speedup, rougeL=rouge, agreement=0.25,
                              matches_baseline=False, **common))
        extra.append(make_row(run_id="pld-4", strategy="pld", num_speculations=4, speedup=1.2,
                              tokens_per_s=120.0, ms_per_token=1000 / 120, rounds=10,
                              rounds_without_draft=4, drafted_per_round=[0] * 4 + [4] * 6,
                              accepted_per_round=[0] * 4 + [2] * 6, rougeL=0.3, agreement=1.0,
                              matches_baseline=True, **common))
    return pd.concat([df, pd.DataFrame(extra)], ignore_index=True)


def test_lossy_rows_never_win_the_lossless_verdict():
    table = sweep_table(_with_exit_and_pld(exit_speedup=5.0))
    best, lossy = table[table["best"]], table[table["best lossy"]]
    assert len(best) == 1 and best.iloc[0]["strategy"] == "layerskip"
    assert best.iloc[0]["exit layer"] == 4 and not best.iloc[0]["lossy"]
    assert len(lossy) == 1 and lossy.iloc[0]["strategy"] == "exit" and lossy.iloc[0]["lossy"]
    assert lossy.iloc[0]["draft"] == "early exit @ layer 2, unverified (lossy)"
    assert lossy.iloc[0]["ROUGE-L"] == pytest.approx(0.2)
    assert lossy.iloc[0]["agreement"] == pytest.approx(0.25)
    assert table["lossy"].sum() == 1
    # Without lossy rows there is no lossy best.
    plain = sweep_table(make_results(models=MODELS[:1], spec=False))
    assert not plain["best lossy"].any() and plain["best"].sum() == 1


def test_pld_acceptance_is_over_drafting_rounds_with_the_share_without_a_match():
    s = summarize(_with_exit_and_pld(exit_speedup=0.5))
    pld = s[s["strategy"] == "pld"].iloc[0]
    assert pld["acceptance_rate"] == pytest.approx(12 / 24)  # empty rounds draft nothing
    assert (pld["rounds"], pld["rounds_without_draft"]) == (30, 12)
    table = sweep_table(_with_exit_and_pld(exit_speedup=0.5))
    row = table[table["strategy"] == "pld"].iloc[0]
    assert row["draft"] == "prompt lookup" and row["no-draft rounds"] == pytest.approx(0.4)
    assert math.isnan(table[table["strategy"] == "ar"].iloc[0]["no-draft rounds"])
    assert format_cell("no-draft rounds", 0.4) == "40%"
    # A slow lossy run is still the best lossy one, and still not the lossless verdict.
    assert table[table["best lossy"]].iloc[0]["strategy"] == "exit"
    assert table[table["best"]].iloc[0]["strategy"] == "layerskip"


def test_runs_measured_on_different_devices_are_flagged():
    from lsbench.reporting.report import mixed_device_warnings

    rows = [make_row(run_id="r1", strategy="layerskip", exit_layer=4, num_speculations=2,
                     example_id=f"e{i}", device_name=name)
            for i, name in enumerate(["NVIDIA A100", "NVIDIA H100", "NVIDIA A100"])]
    rows += [make_row(run_id="r0", strategy="ar", example_id=f"e{i}", device_name="NVIDIA A100")
             for i in range(3)]
    lines = mixed_device_warnings(pd.DataFrame(rows))
    assert lines == ["run r1 (early exit @ layer 4, k=2) has rows from different devices: "
                     "NVIDIA A100, NVIDIA H100"]
    assert mixed_device_warnings(pd.DataFrame(rows[3:])) == []
