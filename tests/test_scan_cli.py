"""`lsbench scan` end to end on the tiny model: files, tables, --verify, report, refusals."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from lsbench.reporting import scan_report
from lsbench.results.scan_schema import SCAN_COLUMNS, TRACE_COLUMNS
from lsbench.scenario.replay import replay
from lsbench.scenario.scan import trace_path
from tests.test_cli import assert_refused, invoke
from tests.test_runner import write_jsonl


def scan_args(model: Path, data: Path, out: Path, *extra: object) -> list[object]:
    return ["scan", "--model", model, "--dataset", f"jsonl:{data}", "--limit", 2,
            "--max-new-tokens", 10, "-k", "1:3", "--warmup", 0, "--out", out, *extra]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "articles.jsonl")


@pytest.fixture(scope="module")
def scanned(tiny_model_dir: Path, data_file: Path, tmp_path_factory):
    out = tmp_path_factory.mktemp("scan") / "tiny.scan.parquet"
    return out, invoke(*scan_args(tiny_model_dir, data_file, out, "--verify", 1))


def test_scan_writes_rows_and_traces(scanned) -> None:
    out, result = scanned
    assert result.exit_code == 0, result.output
    rows = pd.read_parquet(out)
    assert list(rows.columns) == [c for c, _, _ in SCAN_COLUMNS]
    layerskip = rows[rows.strategy == "layerskip"]
    # defaults: every exit layer 1..L-1 of the 4-layer model; k = 1..3 as asked; 2 examples
    assert sorted(set(layerskip.exit_layer)) == [1, 2, 3]
    assert sorted(set(layerskip.num_speculations)) == [1, 2, 3]
    assert len(layerskip) == 2 * 3 * 3
    assert set(rows.strategy) == {"layerskip", "layerskip-conf", "pld"}
    pld = rows[rows.strategy == "pld"]  # on by default: one row per k and example
    assert len(pld) == 2 * 3 and (pld.exit_layer == 0).all()
    assert sorted(set(pld.num_speculations)) == [1, 2, 3]
    assert (pld.predicted_speedup > 0).all()
    assert (rows.predicted_speedup > 0).all() and (rows.baseline_ms_per_token > 0).all()
    traces = pd.read_parquet(trace_path(out))
    assert list(traces.columns) == [c for c, _, _ in TRACE_COLUMNS]
    assert len(traces) == 2 * 4  # every exit layer, the full model included
    # The trace alone replays every row (offline, no model).
    for _, row in layerskip.iterrows():
        t = traces[(traces.example_id == row.example_id) & (traces.exit_layer == row.exit_layer)]
        t = t.iloc[0]
        rep = replay(list(t.output_ids), list(t["argmax"]), int(row.num_speculations),
                     int(t.max_new_tokens), list(t.stop_token_ids), exit_layer=int(row.exit_layer),
                     num_layers=4)
        assert [r.accepted for r in rep.rounds] == list(row.predicted_accepted_per_round)
    assert "adaptive policies" in result.output and "per-example oracle" in result.output


def test_scan_verify_times_points_into_the_ordinary_results_file(scanned) -> None:
    out, result = scanned
    measured = pd.read_parquet(out.with_name("tiny.parquet"))
    assert measured.is_baseline.sum() == 2
    assert len(set(measured.run_id)) == 1 + 1 + 2  # baseline, best point, two random ones
    assert "predicted vs measured" in result.output
    assert "2/2" in result.output  # identical rounds on both examples


def test_report_detects_scan_files(scanned) -> None:
    out, _ = scanned
    result = invoke("report", out)
    assert result.exit_code == 0, result.output
    assert "predicted speedup" in result.output and "regret vs oracle" in result.output


def test_policies_regret_is_against_the_per_example_oracle(scanned) -> None:
    out, _ = scanned
    df = scan_report.read_scans([out])
    table = scan_report.policies(df)
    oracle = table[table.policy.str.startswith("per-example oracle")].iloc[0]
    assert oracle["regret vs oracle"] == pytest.approx(0)
    assert (table["regret vs oracle"] >= -1e-12).all()  # no static point beats the oracle


def test_scan_refuses_sampling_in_one_line(tiny_model_dir: Path, data_file: Path,
                                           tmp_path: Path) -> None:
    out = tmp_path / "s.scan.parquet"
    result = invoke(*scan_args(tiny_model_dir, data_file, out, "--sample"))
    assert_refused(result, "scan predicts greedy decoding only")
    assert not out.exists()


def test_scan_never_overwrites_a_file_it_did_not_write(tiny_model_dir: Path, data_file: Path,
                                                       tmp_path: Path) -> None:
    out = tmp_path / "mine.parquet"
    out.write_bytes(b"precious")
    result = invoke(*scan_args(tiny_model_dir, data_file, out))
    assert_refused(result, "is not an lsbench scan file")
    assert out.read_bytes() == b"precious"


def test_sweep_auto_measures_only_the_scans_best_points(tiny_model_dir: Path, data_file: Path,
                                                        tmp_path: Path) -> None:
    out = tmp_path / "auto.parquet"
    result = invoke("sweep", "--model", tiny_model_dir, "--dataset", f"jsonl:{data_file}",
                    "--limit", 1, "--max-new-tokens", 8, "-k", "1:2", "--warmup", 0,
                    "--exit-layers", "auto", "--top", 2, "--out", out)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "auto.scan.parquet").is_file()
    measured = pd.read_parquet(out)
    assert len(set(measured.run_id)) == 3  # the baseline and the two best predicted points
    best = scan_report.top_points(scan_report.read_scans([tmp_path / "auto.scan.parquet"]), 2)
    got = set(zip(measured.exit_layer, measured.num_speculations, strict=True)) - {(0, 0)}
    assert got == set(zip(best.exit_layer, best.num_speculations, strict=True))


def test_sweep_top_without_auto_is_refused(tiny_model_dir: Path, data_file: Path,
                                           tmp_path: Path) -> None:
    result = invoke("sweep", "--model", tiny_model_dir, "--dataset", f"jsonl:{data_file}",
                    "--exit-layers", "1", "--top", 2, "--out", tmp_path / "x.parquet")
    assert_refused(result, "--top needs --exit-layers auto")


def test_plot_scan_files_beside_measured_results(scanned, tmp_path: Path) -> None:
    out, _ = scanned
    result = invoke("plot", out, out.with_name("tiny.parquet"), "--out", tmp_path)
    assert result.exit_code == 0, result.output
    for stem in ("scan_speedup_heatmap", "scan_acceptance_vs_exit_layer"):
        assert (tmp_path / f"{stem}.png").stat().st_size > 0


def test_scan_figures_side_by_side_with_measured_annotations(scanned) -> None:
    from lsbench.reporting.scan_plots import scan_figures

    out, _ = scanned
    one = scan_report.read_scans([out])
    two = pd.concat([one, one.assign(source_file="copy.scan.parquet")])
    figs = scan_figures(two, pd.read_parquet(out.with_name("tiny.parquet")))
    heat = figs["scan_speedup_heatmap"]
    panels = [ax for ax in heat.axes if ax.get_xlabel() == "exit layer E"]
    assert len(panels) == 2
    # every verified layerskip point carries its measured speedup as text
    assert all(any(t.get_text().endswith("x") for t in ax.texts) for ax in panels)
    from tests.test_plots import _text_outside_canvas

    for name, fig in figs.items():
        assert _text_outside_canvas(fig) == [], name


def test_bench_scan_smoke(tiny_model_dir: Path, data_file: Path, capsys) -> None:
    from lsbench.benchmarks import scanbench

    code = scanbench.main(["--model", str(tiny_model_dir), "--dataset", f"jsonl:{data_file}",
                           "--prompts", "1", "--max-new-tokens", "8", "-k", "1:2",
                           "--points", "1:2,3:1"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "layerskip E=1 k=2" in out and "layerskip E=3 k=1" in out
    assert "the scan takes" in out and "median |relative error|" in out
    assert "identical to measured ones on every example: yes" in out


def test_scan_with_a_draft_model(tiny_model_dir: Path, data_file: Path, tmp_path: Path) -> None:
    from tests.test_runner import save_truncated

    draft = save_truncated(tiny_model_dir, tmp_path / "draft", 2)
    out = tmp_path / "d.scan.parquet"
    result = invoke("scan", "--model", tiny_model_dir, "--draft", draft, "--dataset",
                    f"jsonl:{data_file}", "--limit", 1, "--max-new-tokens", 8, "-e", 2,
                    "-k", "1:2", "--thresholds", "0.5", "--warmup", 0, "--no-pld", "--out", out)
    assert result.exit_code == 0, result.output
    rows = pd.read_parquet(out)
    spec = rows[rows.strategy == "spec"]
    assert list(spec.num_speculations) == [1, 2] and set(spec.draft_model) == {str(draft)}
    assert (spec.exit_layer == 0).all() and spec.predicted_speedup.notna().all()
    assert len(rows) == 2 * (1 + 1 + 1)  # layerskip, one threshold, one draft; k = 1, 2
    assert "pld" not in set(rows.strategy)  # --no-pld
    traces = pd.read_parquet(trace_path(out))
    assert list(traces.source) == ["exit"] * 4 + ["draft"]
