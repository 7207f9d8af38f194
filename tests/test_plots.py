"""Plots on synthetic result rows: files written, panels per model/file, missing data skipped."""

from __future__ import annotations

import pandas as pd
import pytest

from lsbench.errors import LsbenchError
from lsbench.reporting.plots import compare_figures, plot_compare, plot_sweep, sweep_figures
from tests.test_report import MODELS, make_results

SWEEP_FILES = ["tokens_per_s_vs_exit_layer", "speedup_vs_exit_layer",
               "acceptance_rate_vs_exit_layer"]
MAGIC = {"png": b"\x89PNG", "svg": b"<?xml", "pdf": b"%PDF"}


def _axes(fig):
    # Only the data panels: no colorbars or insets are drawn.
    return [ax for ax in fig.axes if ax.get_visible()]


@pytest.mark.parametrize("fmt", ["png", "svg", "pdf"])
def test_sweep_writes_three_non_empty_files_in_the_format(tmp_path, fmt):
    paths = plot_sweep(make_results(models=MODELS[:1]), tmp_path / "plots", fmt=fmt)
    assert [p.name for p in paths] == [f"{stem}.{fmt}" for stem in SWEEP_FILES]
    for path in paths:
        assert path.read_bytes().startswith(MAGIC[fmt])


def test_one_model_draws_one_panel_with_baseline_and_a_line_per_k():
    figures = sweep_figures(make_results(models=MODELS[:1]))
    assert list(figures) == SWEEP_FILES
    (ax,) = _axes(figures["tokens_per_s_vs_exit_layer"])
    labels = ax.get_legend_handles_labels()[1]
    assert sorted(labels) == ["autoregressive", "k=2", "k=4"]
    assert "tiny-a" in ax.get_title() and "lee-news" in ax.get_title()
    assert ax.get_xlabel() == "exit layer E (of 8)"
    assert all(float(t).is_integer() for t in ax.get_xticks())
    (speed,) = _axes(figures["speedup_vs_exit_layer"])
    assert any(list(line.get_ydata()) == [1.0, 1.0] for line in speed.get_lines())


def test_two_models_are_side_by_side_with_a_shared_y_axis():
    figures = sweep_figures(make_results())
    for fig in figures.values():
        left, right = _axes(fig)
        assert left.get_shared_y_axes().joined(left, right)
        assert "tiny-a" in left.get_title() and "tiny-b" in right.get_title()


def test_two_result_files_of_one_model_are_side_by_side():
    normal = make_results(models=MODELS[:1]).assign(source_file="normal.parquet")
    layerskip = make_results(models=MODELS[:1]).assign(source_file="layerskip.parquet")
    fig = sweep_figures(pd.concat([normal, layerskip]))["speedup_vs_exit_layer"]
    titles = [ax.get_title() for ax in _axes(fig)]
    assert len(titles) == 2
    assert "layerskip.parquet" in titles[0] and "normal.parquet" in titles[1]


def test_without_early_exit_runs_the_sweep_is_skipped_but_compare_works(tmp_path):
    df = make_results(exits=())
    assert plot_sweep(df, tmp_path) == []
    paths = plot_compare(df, tmp_path, fmt="svg")
    assert [p.name for p in paths] == ["speedup_by_draft.svg", "tokens_per_s_vs_params.svg"]
    assert all(p.stat().st_size > 0 for p in paths)


def test_compare_bars_per_draft_option_and_params_scatter(tmp_path):
    figures = compare_figures(make_results(models=MODELS[:1]))
    (bars,) = _axes(figures["speedup_by_draft"])
    ticks = [t.get_text() for t in bars.get_xticklabels()]
    assert ticks[0] == "early exit @ layer 2, k=2" and ticks[-1] == "draft-135m, k=4"
    assert len(bars.patches) == 7  # 6 early-exit options + the draft model, no baseline bar
    (scatter,) = _axes(figures["tokens_per_s_vs_params"])
    notes = [t.get_text() for t in scatter.texts]
    assert notes[0] == "autoregressive" and len(notes) == 8
    paths = plot_compare(make_results(), tmp_path)
    assert all(p.read_bytes().startswith(MAGIC["png"]) for p in paths)


def test_baseline_only_skips_the_speedup_bars():
    figures = compare_figures(make_results(exits=(), spec=False))
    assert list(figures) == ["tokens_per_s_vs_params"]


def test_bad_format_and_empty_input_are_user_errors(tmp_path):
    df = make_results(models=MODELS[:1])
    with pytest.raises(LsbenchError, match="format"):
        plot_sweep(df, tmp_path, fmt="jpg")
    with pytest.raises(LsbenchError, match="no rows to plot"):
        plot_compare(df.iloc[:0], tmp_path)
    with pytest.raises(LsbenchError, match="no rows to plot"):
        plot_sweep(df.iloc[:0], tmp_path)


def test_quality_against_speed_per_exit_layer_for_the_lossy_exit(tmp_path):
    from tests.test_report import _with_exit_and_pld

    df = _with_exit_and_pld(exit_speedup=3.0, rouge=0.2)
    more = df[df.strategy == "exit"].assign(run_id="exit-4", exit_layer=4, speedup=2.0,
                                            rougeL=0.25)
    df = pd.concat([df, more], ignore_index=True)
    figures = sweep_figures(df)
    assert list(figures) == [*SWEEP_FILES, "quality_speed_vs_exit_layer"]
    top, bottom = _axes(figures["quality_speed_vs_exit_layer"])
    labels = top.get_legend_handles_labels()[1]
    assert "exit, unverified (lossy)" in labels and "layerskip k=4 (lossless)" in labels
    assert bottom.get_ylabel() == "ROUGE-L vs reference" and bottom.get_xlabel().startswith("exit")
    exit_line = next(ln for ln in bottom.get_lines() if ln.get_label().startswith("exit"))
    assert list(exit_line.get_xdata()) == [2, 4]
    assert list(exit_line.get_ydata()) == pytest.approx([0.2, 0.25])
    # Without references the quality axis is the agreement with autoregressive output.
    no_refs = sweep_figures(df.assign(rougeL=float("nan")))["quality_speed_vs_exit_layer"]
    assert _axes(no_refs)[1].get_ylabel() == "agreement with autoregressive output"
    # Lossy bars are hatched in the draft-option comparison.
    (bars,) = _axes(compare_figures(df)["speedup_by_draft"])
    hatched = [p.get_hatch() for p in bars.patches]
    assert hatched.count("//") == 2
    names = [t.get_text() for t in bars.get_xticklabels()]
    assert any("unverified (lossy)" in n for n in names) and "prompt lookup, k=4" in names
    assert plot_sweep(df, tmp_path, fmt="png")[-1].name == "quality_speed_vs_exit_layer.png"


def test_no_lossy_runs_no_quality_figure():
    assert "quality_speed_vs_exit_layer" not in sweep_figures(make_results(models=MODELS[:1]))


def _text_outside_canvas(fig) -> list[str]:
    """Texts of a drawn figure whose extent leaves the canvas (a clipped title, say): titles,
    labels, legends and the tick labels actually drawn (matplotlib's tight bbox of each axes
    covers only those), each checked against the figure's bbox."""
    fig.canvas.draw()  # lays the figure out as saving it does
    renderer = fig.canvas.get_renderer()
    canvas = fig.bbox

    def outside(box) -> bool:
        return (box.x0 < canvas.x0 - 0.5 or box.x1 > canvas.x1 + 0.5
                or box.y0 < canvas.y0 - 0.5 or box.y1 > canvas.y1 + 0.5)

    found = [t.get_text() for t in fig.texts if t.get_text().strip()
             and outside(t.get_window_extent(renderer))]
    for ax in fig.axes:
        if ax.get_visible() and outside(ax.get_tightbbox(renderer)):
            found.append(f"axes '{ax.get_title()}'")
    return found


def test_every_plot_keeps_its_text_inside_the_canvas():
    from tests.test_report import _with_exit_and_pld

    one_model = _with_exit_and_pld(exit_speedup=3.0, rouge=0.2)
    figures = {**sweep_figures(one_model), **compare_figures(one_model),
               **{f"{k} (2 models)": v for k, v in sweep_figures(make_results()).items()}}
    assert "quality_speed_vs_exit_layer" in figures
    for name, fig in figures.items():
        assert _text_outside_canvas(fig) == [], name
