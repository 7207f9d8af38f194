"""The blog's figures from result rows: throughput, speedup and acceptance against the exit
layer, quality against speed per exit layer for the lossy early exit, the draft options
compared, and speedup and aggregate throughput against the batch size. Works on DataFrames
only (no torch). Figures against the exit layer or per draft option show the smallest batch
size measured (batch 1 where it was); the batch-size figures show every one.

Figures are built as plain `Figure` objects on the Agg canvas, never through pyplot, so that
plotting touches no global backend state; `sweep_figures`/`compare_figures` return them for
inspection and `plot_sweep`/`plot_compare` save them.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator, NullFormatter

from lsbench.errors import LsbenchError
from lsbench.reporting.report import (
    DRAFT_MODEL,
    EARLY_EXIT,
    LOSSY,
    NONE,
    draft_label,
    human_count,
    loaded_params,
    summarize,
)

FORMATS = ("png", "svg", "pdf")
PANEL_WIDTH, HEIGHT = 5.5, 4.5
# (summary column, y label, file stem) for the three sweep figures
SWEEP = (
    ("tokens_per_s", "decode throughput (tokens/s)", "tokens_per_s_vs_exit_layer"),
    ("speedup", "speedup over autoregressive (x)", "speedup_vs_exit_layer"),
    ("acceptance_rate", "acceptance rate (accepted / drafted)", "acceptance_rate_vs_exit_layer"),
)
SWEEP_TITLES = {
    "tokens_per_s": "Decode throughput vs early-exit layer (median, IQR bars)",
    "speedup": "Speedup vs early-exit layer (median, IQR bars)",
    "acceptance_rate": "Draft acceptance vs early-exit layer",
}


def _check(df: pd.DataFrame, fmt: str) -> None:
    if fmt not in FORMATS:
        raise LsbenchError(f"unknown plot format {fmt!r}; use one of {', '.join(FORMATS)}")
    if df.empty:
        raise LsbenchError("no rows to plot")


def _panel_keys(summary: pd.DataFrame) -> list[str]:
    # One subplot column per results file and model (and dataset): the normal-vs-LayerSkip
    # checkpoint comparison is two files or two models side by side.
    return [k for k in ("source_file", "model", "dataset") if k in summary.columns]


def _panels(summary: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    keys = _panel_keys(summary)
    out = []
    for key, rows in summary.groupby(keys, sort=False):
        out.append((panel_title(dict(zip(keys, key, strict=True))), rows))
    return out


def _short(label: str) -> str:
    """A path's last part (a model directory, a `jsonl:` file): a full path runs past the
    panel's edges, and the table beside the plot keeps the full name."""
    scheme, sep, rest = label.rpartition(":") if label.startswith("jsonl:") else ("", "", label)
    return f"{scheme}{sep}{Path(rest).name}" if "/" in rest else label


def panel_title(parts: dict[str, str]) -> str:
    title = f"{_short(str(parts['model']))} · {_short(str(parts['dataset']))}"
    if "source_file" in parts:
        title = f"{title}\n{_short(str(parts['source_file']))}"
    return title


def _figure(n: int, width: float = PANEL_WIDTH) -> tuple[Figure, list[Axes]]:
    fig = Figure(figsize=(width * n, HEIGHT), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, n, sharey=True, squeeze=False)[0]
    return fig, list(axes)


def _iqr(rows: pd.DataFrame, col: str) -> list[pd.Series]:
    mid = rows[f"{col}_median"]
    return [(mid - rows[f"{col}_p25"]).clip(lower=0), (rows[f"{col}_p75"] - mid).clip(lower=0)]


def _line_label(strategy: str, k: int, sampled: bool, many_strategies: bool,
                many_modes: bool) -> str:
    label = f"k={k}"
    if many_strategies:
        label = f"{strategy} {label}"
    if many_modes:
        label += " sampled" if sampled else " greedy"
    return label


def _draw_baseline(ax: Axes, rows: pd.DataFrame, metric: str) -> None:
    if metric == "speedup":
        ax.axhline(1.0, color="black", ls="--", lw=1, label="autoregressive (1.0x)")
        return
    if metric != "tokens_per_s":
        return  # acceptance has no baseline
    base = rows[rows["is_baseline"]]
    many = base["do_sample"].nunique() > 1
    for _, b in base.iterrows():
        label = "autoregressive" if b["strategy"] == "ar" else f"{b['strategy']} (transformers)"
        label += (" sampled" if b["do_sample"] else " greedy") if many else ""
        ax.axhline(b["tokens_per_s_median"], color="black", ls="--", lw=1, label=label)
        ax.axhspan(b["tokens_per_s_p25"], b["tokens_per_s_p75"], color="black", alpha=0.1, lw=0)


def _draw_sweep_panel(ax: Axes, rows: pd.DataFrame, metric: str, colors: dict) -> None:
    early = rows[rows["strategy"].isin(EARLY_EXIT)]
    many_strategies = early["strategy"].nunique() > 1
    many_modes = early["do_sample"].nunique() > 1
    lines = early.groupby(["strategy", "num_speculations", "do_sample"], sort=True)
    for (strategy, k, sampled), line in lines:
        line = line.sort_values("exit_layer")
        label = _line_label(strategy, k, sampled, many_strategies, many_modes)
        style = dict(marker="o", label=label, color=colors[k],
                     ls="-" if strategy == "layerskip" else ":")
        if metric == "acceptance_rate":
            ax.plot(line["exit_layer"], line["acceptance_rate"], **style)
        else:
            ax.errorbar(line["exit_layer"], line[f"{metric}_median"], yerr=_iqr(line, metric),
                        capsize=3, **style)
    _draw_baseline(ax, rows, metric)
    layers = rows["model_num_layers"].dropna()
    of = f" (of {int(layers.iloc[0])})" if len(layers) else ""
    ax.set_xlabel(f"exit layer E{of}")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")


def _quality_column(rows: pd.DataFrame) -> tuple[str, str]:
    """ROUGE-L where the dataset has references, else agreement with autoregressive output."""
    if rows["rougeL"].notna().any():
        return "rougeL", "ROUGE-L vs reference"
    return "agreement", "agreement with autoregressive output"


def _draw_quality_panel(top: Axes, bottom: Axes, rows: pd.DataFrame) -> None:
    """Speedup (top) and quality (bottom) against E: lossy `exit` beside lossless layerskip."""
    quality, qlabel = _quality_column(rows)
    lines = [(("exit",), "exit, unverified (lossy)", dict(color="C3", ls="--", marker="s"))]
    lines += [(("layerskip", k), f"layerskip k={int(k)} (lossless)",
               dict(color=f"C{i}", ls="-", marker="o"))
              for i, k in enumerate(sorted(rows.loc[rows["strategy"] == "layerskip",
                                                    "num_speculations"].unique()))]
    for key, label, style in lines:
        line = rows[rows["strategy"] == key[0]]
        if len(key) > 1:
            line = line[line["num_speculations"] == key[1]]
        line = line.sort_values("exit_layer")
        top.errorbar(line["exit_layer"], line["speedup_median"], yerr=_iqr(line, "speedup"),
                     capsize=3, label=label, **style)
        bottom.plot(line["exit_layer"], line[quality], label=label, **style)
    top.axhline(1.0, color="black", ls="--", lw=1, label="autoregressive (1.0x)")
    base = rows[rows["is_baseline"]]
    if len(base) and base[quality].notna().any():
        bottom.axhline(float(base[quality].mean()), color="black", ls="--", lw=1,
                       label="autoregressive")
    top.set_ylabel("speedup over autoregressive (x)")
    bottom.set_ylabel(qlabel)
    layers = rows["model_num_layers"].dropna()
    of = f" (of {int(layers.iloc[0])})" if len(layers) else ""
    bottom.set_xlabel(f"exit layer E{of}")
    for ax in (top, bottom):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
    top.legend(fontsize="small")


def quality_speed_figure(summary: pd.DataFrame) -> Figure | None:
    """Quality against speed per exit layer: what exiting early without verification gains
    in speed and loses in quality, next to lossless layerskip; None without `exit` runs."""
    panels = [(t, r) for t, r in _panels(summary) if r["strategy"].isin(LOSSY).any()]
    if not panels:
        return None
    fig = Figure(figsize=(PANEL_WIDTH * len(panels), 2 * HEIGHT), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, len(panels), sharex="col", squeeze=False)
    for i, (title, rows) in enumerate(panels):
        _draw_quality_panel(axes[0][i], axes[1][i], rows)
        axes[0][i].set_title(title, fontsize="medium")
    # Two lines: one panel is narrower than the sentence, and a longer title would be clipped.
    fig.suptitle("Quality vs speed per exit layer:\nearly exit without verification is lossy")
    return fig


def _smallest_batch(summary: pd.DataFrame) -> pd.DataFrame:
    return summary[summary["batch_size"] == summary["batch_size"].min()]


def sweep_figures(df: pd.DataFrame) -> dict[str, Figure]:
    """File stem -> figure; empty when there are no early-exit runs to plot. With several
    batch sizes, the batch-size figures too (`batch_figures`)."""
    full = summarize(df)
    summary = _smallest_batch(full)
    extra_batch = batch_figures(full)
    quality = quality_speed_figure(summary)
    extra = {"quality_speed_vs_exit_layer": quality} if quality is not None else {}
    extra.update(extra_batch)
    panels = [(t, r) for t, r in _panels(summary) if r["strategy"].isin(EARLY_EXIT).any()]
    if not panels:
        return extra
    early = summary[summary["strategy"].isin(EARLY_EXIT)]
    # The same k gets the same color in every panel, so panels compare at a glance.
    colors = {k: f"C{i}" for i, k in enumerate(sorted(early["num_speculations"].unique()))}
    figures = {}
    for metric, ylabel, stem in SWEEP:
        column = metric if metric == "acceptance_rate" else f"{metric}_median"
        if early[column].isna().all():
            continue
        fig, axes = _figure(len(panels))
        for ax, (title, rows) in zip(axes, panels, strict=True):
            _draw_sweep_panel(ax, rows, metric, colors)
            ax.set_title(title, fontsize="medium")
        axes[0].set_ylabel(ylabel)
        if metric == "acceptance_rate":
            axes[0].set_ylim(0, 1.05)
        fig.suptitle(SWEEP_TITLES[metric])
        figures[stem] = fig
    return {**figures, **extra}


def _option_label(row: pd.Series) -> str:
    label = draft_label(row["strategy"], row["draft_model"], row["exit_layer"])
    if label == NONE:
        label = "autoregressive" if row["is_baseline"] else row["strategy"]
    elif row["strategy"].startswith("hf-"):
        label += " (HF)"
    if row["num_speculations"] > 0:
        label += f", k={int(row['num_speculations'])}"
    if row["do_sample"]:
        label += ", sampled"
    return label


def _option_color(strategy: str) -> str:
    if strategy in LOSSY:
        return "C3"
    return "C0" if strategy in EARLY_EXIT else "C1" if strategy in DRAFT_MODEL else "C7"


def _speedup_figure(summary: pd.DataFrame) -> Figure | None:
    panels = []
    for title, rows in _panels(summary):
        options = rows[~rows["is_baseline"] & rows["speedup_median"].notna()]
        if not options.empty:
            panels.append((title, options))
    if not panels:
        return None
    widest = max(len(rows) for _, rows in panels)
    fig, axes = _figure(len(panels), width=max(PANEL_WIDTH, 0.7 * widest + 2))
    for ax, (title, rows) in zip(axes, panels, strict=True):
        x = range(len(rows))
        bars = ax.bar(x, rows["speedup_median"], yerr=_iqr(rows, "speedup"), capsize=3,
                      color=[_option_color(s) for s in rows["strategy"]])
        for bar, lossy in zip(bars, rows["lossy"], strict=True):
            if lossy:  # hatched: not comparable with the lossless bars' verdict
                bar.set_hatch("//")
        ax.axhline(1.0, color="black", ls="--", lw=1, label="autoregressive (1.0x)")
        ax.set_xticks(list(x), [_option_label(r) for _, r in rows.iterrows()], rotation=35,
                      ha="right", fontsize="small")
        ax.set_title(title, fontsize="medium")
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize="small")
    axes[0].set_ylabel("speedup over autoregressive (x)")
    fig.suptitle("Speedup per draft option (median, IQR bars)")
    return fig


def _params_figure(summary: pd.DataFrame) -> Figure | None:
    rows = summary[summary["tokens_per_s_median"].notna()]
    if rows.empty:
        return None
    rows = rows.assign(loaded=loaded_params(rows))
    fig, (ax,) = _figure(1, width=7.5)
    for i, (title, panel) in enumerate(_panels(rows)):
        ax.errorbar(panel["loaded"], panel["tokens_per_s_median"],
                    yerr=_iqr(panel, "tokens_per_s"), fmt="o", capsize=3, color=f"C{i}",
                    label=title.replace("\n", " · "))
        for _, r in panel.iterrows():
            # Options without a draft model share the target's x: label them on the left and
            # draft models on the right, so the two groups do not overwrite each other.
            right = r["strategy"] in DRAFT_MODEL
            ax.annotate(_option_label(r), (r["loaded"], r["tokens_per_s_median"]),
                        xytext=(6 if right else -6, 0), textcoords="offset points",
                        ha="left" if right else "right", va="center", fontsize="x-small")
    if rows["loaded"].max() > 10 * rows["loaded"].min() > 0:
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.margins(x=0.35)  # room for the labels
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: human_count(v)))
    ax.set_xlabel("parameters loaded (target + draft model)")
    ax.set_ylabel("decode throughput (tokens/s)")
    ax.set_title("Throughput vs memory footprint (median, IQR bars)", fontsize="medium")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    return fig


def compare_figures(df: pd.DataFrame) -> dict[str, Figure]:
    """File stem -> figure for the draft-option comparison; a figure without data is left out."""
    summary = _smallest_batch(summarize(df))
    figures = {"speedup_by_draft": _speedup_figure(summary),
               "tokens_per_s_vs_params": _params_figure(summary)}
    return {stem: fig for stem, fig in figures.items() if fig is not None}


def _setting_label(row: pd.Series) -> str:
    label = _option_label(row)
    return "autoregressive" if label == "autoregressive" else label.replace(
        "early exit @ layer ", "E=")


# (summary column, y label, file stem, title) of the two batch-size figures
BATCH = (
    ("speedup_example_median", "speedup over autoregressive at the same batch (x)",
     "speedup_vs_batch_size", "Speedup vs batch size (median over examples)"),
    ("batch_tokens_per_s", "aggregate throughput (new tokens / batch decode s)",
     "aggregate_tokens_per_s_vs_batch_size", "Aggregate throughput vs batch size (median)"),
)


def batch_figures(summary: pd.DataFrame) -> dict[str, Figure]:
    """Speedup and aggregate throughput against the batch size: one line per strategy/E/k
    (autoregressive included in the throughput figure, the 1.0x line marked in the speedup
    figure); none unless several batch sizes were measured."""
    if summary["batch_size"].nunique() < 2:
        return {}
    panels = _panels(summary)
    figures = {}
    for column, ylabel, stem, title in BATCH:
        fig, axes = _figure(len(panels))
        for ax, (panel, rows) in zip(axes, panels, strict=True):
            if column.startswith("speedup"):
                rows = rows[~rows["is_baseline"]]
                ax.axhline(1.0, color="black", ls="--", lw=1, label="autoregressive (1.0x)")
            keys = ["strategy", "draft_model", "exit_layer", "num_speculations", "do_sample"]
            for i, (_, line) in enumerate(rows.groupby(keys, sort=False)):
                line = line.sort_values("batch_size")
                first = line.iloc[0]
                ax.plot(line["batch_size"], line[column], marker="o",
                        color="black" if first["is_baseline"] else f"C{i % 10}",
                        ls="--" if first["lossy"] else "-", label=_setting_label(first))
            ax.set_xscale("log", base=2)
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_xticks(sorted(summary["batch_size"].unique()))
            ax.set_xlabel("batch size (examples decoded together)")
            ax.set_title(panel, fontsize="medium")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize="small")
        axes[0].set_ylabel(ylabel)
        fig.suptitle(title)
        figures[stem] = fig
    return figures


def _save(figures: dict[str, Figure], out_dir: str | Path, fmt: str) -> list[Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for stem, fig in figures.items():
        path = out / f"{stem}.{fmt}"
        fig.savefig(path, format=fmt, dpi=150)
        paths.append(path)
    return paths


def plot_sweep(df: pd.DataFrame, out_dir: str | Path, fmt: str = "png") -> list[Path]:
    """Tokens/s, speedup and acceptance against the exit layer; [] without early-exit runs."""
    _check(df, fmt)
    return _save(sweep_figures(df), out_dir, fmt)


def plot_compare(df: pd.DataFrame, out_dir: str | Path, fmt: str = "png") -> list[Path]:
    """Speedup per draft option, and tokens/s against the parameters each option loads."""
    _check(df, fmt)
    return _save(compare_figures(df), out_dir, fmt)
