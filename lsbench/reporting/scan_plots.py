"""Figures from `lsbench scan` files (no torch): the predicted speedup over (E, k) as a
heatmap with the best point marked and verified points annotated with their measured
speedup, and predicted acceptance against E for several k; one panel per file/model/dataset,
so two or more files sit side by side."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from lsbench.errors import LsbenchError
from lsbench.reporting.plots import FORMATS, HEIGHT, PANEL_WIDTH, panel_title
from lsbench.reporting.scan_report import surface

KEYS = ["source_file", "model", "dataset"]


def _panels(surf: pd.DataFrame) -> list[tuple[str, tuple, pd.DataFrame]]:
    keys = [k for k in KEYS if k in surf.columns]
    out = []
    for key, rows in surf.groupby(keys, sort=False):
        parts = dict(zip(keys, key if isinstance(key, tuple) else (key,), strict=True))
        out.append((panel_title(parts), (parts["model"], parts["dataset"]), rows))
    return out


def _measured_speedups(results: pd.DataFrame | None) -> dict[tuple, float]:
    """(model, dataset, E, k) -> measured speedup (total baseline / total run decode time)."""
    if results is None or results.empty:
        return {}
    found = {}
    for (model, dataset), block in results.groupby(["model", "dataset"], sort=False):
        base = block[block["is_baseline"]]
        if base.empty:
            continue
        base_ms = base["decode_s"].sum() / base["decode_tokens"].sum()
        runs = block[block["strategy"] == "layerskip"]
        for (e, k), g in runs.groupby(["exit_layer", "num_speculations"]):
            found[(model, dataset, int(e), int(k))] = base_ms / (
                g["decode_s"].sum() / g["decode_tokens"].sum())
    return found


def scan_figures(scans: pd.DataFrame, results: pd.DataFrame | None = None) -> dict[str, Figure]:
    surf = surface(scans)
    surf = surf[surf["strategy"] == "layerskip"]
    if surf.empty:
        return {}
    panels = _panels(surf)
    measured = _measured_speedups(results)
    heat = Figure(figsize=(PANEL_WIDTH * len(panels), HEIGHT), layout="constrained")
    FigureCanvasAgg(heat)
    acc = Figure(figsize=(PANEL_WIDTH * len(panels), HEIGHT), layout="constrained")
    FigureCanvasAgg(acc)
    heat_axes = heat.subplots(1, len(panels), squeeze=False)[0]
    acc_axes = acc.subplots(1, len(panels), sharey=True, squeeze=False)[0]
    for ax, ax2, (title, (model, dataset), rows) in zip(heat_axes, acc_axes, panels,
                                                       strict=True):
        grid = rows.pivot_table(index="num_speculations", columns="exit_layer",
                                values="predicted_speedup")
        es, ks = list(grid.columns), list(grid.index)
        image = ax.imshow(grid.to_numpy(), origin="lower", aspect="auto", cmap="viridis")
        ax.set_xticks(range(len(es)), [str(e) for e in es])
        ax.set_yticks(range(len(ks)), [str(k) for k in ks])
        if len(es) > 16:
            for i, label in enumerate(ax.get_xticklabels()):
                label.set_visible(i % 2 == 0)
        best = rows.iloc[0]
        bx, by = es.index(best["exit_layer"]), ks.index(best["num_speculations"])
        ax.plot(bx, by, marker="*", color="red", markerfacecolor="none", markersize=18,
                linestyle="none",
                label=f"best predicted: E={int(best['exit_layer'])} k="
                      f"{int(best['num_speculations'])} ({best['predicted_speedup']:.2f}x)")
        for (m, d, e, k), speedup in measured.items():
            if (m, d) == (model, dataset) and e in es and k in ks:
                ax.annotate(f"{speedup:.2f}x", (es.index(e), ks.index(k)), color="white",
                            ha="center", va="center", fontsize=7, fontweight="bold")
        heat.colorbar(image, ax=ax, label="predicted speedup (x)")
        ax.set_xlabel("exit layer E")
        ax.set_ylabel("draft tokens per round k")
        ax.set_title(title, fontsize=9)
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.15), fontsize=7)
        for k in ks[:: max(1, len(ks) // 4)]:
            line = rows[rows["num_speculations"] == k].sort_values("exit_layer")
            ax2.plot(line["exit_layer"], line["predicted_acceptance_rate"], marker="o",
                     markersize=3, label=f"k={k}")
        ax2.set_xlabel("exit layer E")
        ax2.set_ylabel("predicted acceptance rate")
        ax2.set_ylim(0, 1.02)
        ax2.set_title(title, fontsize=9)
        ax2.legend(fontsize=7)
    heat.suptitle("Predicted speedup over (E, k) (numbers: measured speedup of verified "
                  "points)", fontsize=10)
    acc.suptitle("Predicted acceptance vs exit layer (exact for greedy decoding)", fontsize=10)
    return {"scan_speedup_heatmap": heat, "scan_acceptance_vs_exit_layer": acc}


def plot_scan(scans: pd.DataFrame, out_dir: str | Path, fmt: str = "png",
              results: pd.DataFrame | None = None) -> list[Path]:
    if fmt not in FORMATS:
        raise LsbenchError(f"unknown plot format {fmt!r}; use one of {', '.join(FORMATS)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for stem, fig in scan_figures(scans, results).items():
        path = out / f"{stem}.{fmt}"
        fig.savefig(path, format=fmt, dpi=150)
        paths.append(path)
    return paths



