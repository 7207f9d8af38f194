"""One self-contained HTML page from result rows (and scan files): settings and environment,
the sweep, blog and summary tables, the figures as inline PNG, and the per-row lossless
audit. Nothing is fetched when the page opens: CSS, the sort script and the images are all in
the file. Works on DataFrames only (no torch).

Every table cell carries its raw value in `data-value` (full precision; empty when missing)
beside the text people read, so the sort script and tests read numbers, not formatted text.
"""

from __future__ import annotations

import base64
import html
import io

import pandas as pd
from matplotlib.figure import Figure

from lsbench import __version__
from lsbench.reporting.plots import compare_figures, sweep_figures
from lsbench.reporting.report import (
    batch_table,
    blog_table,
    draft_label,
    format_cell,
    mixed_device_warnings,
    plain,
    run_settings,
    summarize,
    sweep_table,
)
from lsbench.reporting.terminal import sweep_renderables

# The audit's columns: which row, and how it compares with its baseline's output.
AUDIT = ["strategy", "exit_layer", "num_speculations", "example_id", "repeat",
         "matches_baseline", "first_mismatch", "mismatch_margin", "lossless_verdict"]
DPI = 100

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:1.5em auto;
max-width:1600px;padding:0 1em;color:#1a1a1a}
h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.8em}
nav a{margin-right:1em}
.wrap{overflow-x:auto;margin:.6em 0 1.2em}
table{border-collapse:collapse;font-size:12.5px}
th,td{border:1px solid #ddd;padding:.25em .5em;white-space:nowrap}
th{background:#f3f3f3;position:sticky;top:0}
table.sortable th{cursor:pointer}table.sortable th:hover{background:#e4e4e4}
th[data-dir=asc]::after{content:" \\25B2"}th[data-dir=desc]::after{content:" \\25BC"}
td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.best td{background:#e3f6e3;font-weight:600}
tr.lossy td{background:#fff6d6}
tr.mismatch td{background:#fde2e2}
.tag{font-size:11px;border-radius:3px;padding:0 .35em;margin-left:.4em}
.tag.lossy{background:#f2c94c}.tag.best{background:#6fcf97}
figure{display:inline-block;margin:.5em 1em 1em 0;vertical-align:top}
figure img{max-width:100%;border:1px solid #eee}
figcaption{font-size:12px;color:#555}
ul.verdicts{margin:.3em 0}
dl{display:grid;grid-template-columns:max-content auto;gap:.15em 1.2em}
dt{font-weight:600}dd{margin:0;font-family:ui-monospace,monospace;font-size:12.5px}
"""

# Click a header to sort by its column; numbers compare as numbers, missing values go last.
SORT_JS = """
document.querySelectorAll("table.sortable").forEach(function (table) {
  table.querySelectorAll("th").forEach(function (th, i) {
    th.addEventListener("click", function () {
      var dir = th.dataset.dir === "asc" ? "desc" : "asc";
      table.querySelectorAll("th").forEach(function (h) { delete h.dataset.dir; });
      th.dataset.dir = dir;
      var body = table.tBodies[0], rows = Array.prototype.slice.call(body.rows);
      rows.sort(function (a, b) {
        var x = a.cells[i].dataset.value, y = b.cells[i].dataset.value;
        if (x === "" || y === "") { return (x === "") - (y === ""); }
        var nx = Number(x), ny = Number(y);
        var c = isNaN(nx) || isNaN(ny) ? x.localeCompare(y) : nx - ny;
        return dir === "asc" ? c : -c;
      });
      rows.forEach(function (r) { body.appendChild(r); });
    });
  });
});
"""


def _raw(value) -> str:
    """A cell's `data-value`: repr-exact numbers, true/false, text; empty when missing."""
    p = plain(value)
    if p is None:
        return ""
    if isinstance(p, bool):
        return "true" if p else "false"
    if isinstance(p, list):
        return ", ".join(map(str, p))
    return repr(p) if isinstance(p, float) else str(p)


def _cell(column: str, value) -> str:
    text = format_cell(column, value).replace("\\|", "|")
    numeric = isinstance(plain(value), (int, float)) and not isinstance(plain(value), bool)
    return (f'<td{" class=num" if numeric else ""} data-value="{html.escape(_raw(value))}">'
            f"{html.escape(text)}</td>")


def html_table(table: pd.DataFrame, table_id: str,
               row_classes: list[str] | None = None) -> str:
    """A sortable table: headers are the frame's column names, `data-col` holds them too."""
    head = "".join(f'<th data-col="{html.escape(str(c))}">{html.escape(str(c))}</th>'
                   for c in table.columns)
    body = []
    for i, row in enumerate(table.itertuples(index=False, name=None)):
        cls = row_classes[i] if row_classes else ""
        cells = "".join(_cell(str(c), v) for c, v in zip(table.columns, row, strict=True))
        body.append(f'<tr{f" class={cls!r}" if cls else ""}>{cells}</tr>')
    return (f'<div class=wrap><table class=sortable id="{table_id}"><thead><tr>{head}</tr>'
            f"</thead><tbody>{''.join(body)}</tbody></table></div>")


def _definitions(values: dict) -> str:
    items = []
    for key, value in values.items():
        shown = ("—" if value is None or value == [] else
                 ", ".join(map(str, value)) if isinstance(value, list) else str(value))
        items.append(f"<dt>{html.escape(key)}</dt><dd>{html.escape(shown)}</dd>")
    return f"<dl>{''.join(items)}</dl>"


def figure_png(fig: Figure) -> str:
    """A figure as a `data:` URI of its PNG."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _figures(figures: dict[str, Figure]) -> str:
    return "".join(f'<figure><img src="{figure_png(fig)}" alt="{html.escape(stem)}">'
                   f"<figcaption>{html.escape(stem)}</figcaption></figure>"
                   for stem, fig in figures.items())


def audit_table(df: pd.DataFrame) -> pd.DataFrame:
    """Every non-baseline row against its baseline: whether the output matched, the first
    differing position and the logit margin there, the verdict; lossy rows say so instead."""
    rows = df[~df["is_baseline"].astype("boolean").fillna(False)]
    lossy = (rows["lossy"].astype("boolean").fillna(False) if "lossy" in rows
             else pd.Series(False, index=rows.index))
    out = pd.DataFrame({
        **({"file": rows["source_file"]} if "source_file" in rows else {}),
        "model": rows["model"], "dataset": rows["dataset"],
        "draft": [draft_label(s, d or "", e or 0) for s, d, e in
                  zip(rows["strategy"], rows["draft_model"], rows["exit_layer"], strict=True)],
        **{c: rows.get(c, pd.NA) for c in AUDIT},
        "lossy": lossy,
    })
    out["lossless_verdict"] = out["lossless_verdict"].where(~lossy, "lossy (not verified)")
    return out.reset_index(drop=True)


def _sweep_section(df: pd.DataFrame) -> str:
    table = sweep_table(df)
    classes = ["best" if b else "lossy" if lossy else ""
               for b, lossy in zip(table["best"], table["lossy"], strict=True)]
    # A lossy run differs from autoregressive output by design: its verdict reads lossy, as in
    # the terminal's table, not MISMATCH (the JSON keeps the raw verdict).
    table = table.assign(verdict=table["verdict"].where(~table["lossy"].astype(bool), "lossy"))
    # sweep_renderables makes one rich table per block in this order, each followed by its lines
    # (a block per batch size when there are several).
    batched = _batched(table)
    titles = iter(f"{m} on {d}" + (f" at batch size {b}" if batched else "")
                  for (m, d, b), _ in table.groupby(["model", "dataset", "batch"], sort=False))
    blocks: list[tuple[str, list[str]]] = []
    for item in sweep_renderables(df):
        if isinstance(item, str):
            blocks[-1][1].append(item)
        else:
            blocks.append((next(titles), []))
    verdicts = "".join(
        f"<h3>{html.escape(title)}</h3><ul class=verdicts>"
        + "".join(f"<li>{html.escape(line)}</li>" for line in lines) + "</ul>"
        for title, lines in blocks)
    return ("<h2 id=sweep>Sweep</h2><p>Medians over examples; speedup against the same "
            "engine's autoregressive decoding in the same process, with its 95% bootstrap CI "
            "over examples. Green: best lossless run per model; yellow: lossy (early exit "
            "without verification, never in the lossless verdict).</p>"
            + verdicts + html_table(table, "sweep-table", classes))


def _batched(table: pd.DataFrame) -> bool:
    return table["batch"].nunique() > 1 or bool((table["batch"] != 1).any())


def _batch_section(df: pd.DataFrame) -> str:
    """`report --table batch` with its crossover, when several batch sizes were measured."""
    return ("<h2 id=batch>Batch sizes</h2><p>Aggregate throughput (all rows' new tokens / batch "
            "decode time), against the same setting at batch 1, and the speedup on ar of the "
            "same batches; crossover: the largest batch size still faster than ar.</p>"
            + html_table(batch_table(df), "batch-table"))


def html_report(df: pd.DataFrame | None, sources: list[str],
                scan: tuple[pd.DataFrame, pd.DataFrame, dict[str, Figure]] | None = None
                ) -> str:
    """The page. `df`: result rows (None with scan files alone); `scan`: the scan table, the
    policy table and the scan figures."""
    parts = []
    nav = []
    if df is not None:
        info = run_settings(df)
        nav += ["settings", "sweep", "blog", "summary", "plots", "audit"]
        parts.append("<h2 id=settings>Run settings and environment</h2>"
                     "<h3>Settings</h3>" + _definitions(info["settings"])
                     + "<h3>Environment</h3>" + _definitions(info["environment"])
                     + "<h3>Counts</h3>" + _definitions(info["counts"]))
        warnings = mixed_device_warnings(df)
        if warnings:
            parts.append("<ul class=verdicts>" + "".join(
                f"<li><b>warning:</b> {html.escape(w)}</li>" for w in warnings) + "</ul>")
        parts.append(_sweep_section(df))
        if _batched(sweep_table(df)):
            nav.insert(nav.index("sweep") + 1, "batch")
            parts.append(_batch_section(df))
        parts.append("<h2 id=blog>The LayerSkip blog's table</h2><p>FLOPs and seconds in "
                     "separate columns (the blog's \"FLOPs/Input\" columns were times).</p>"
                     + html_table(blog_table(df), "blog-table"))
        parts.append("<h2 id=summary>Summary: every statistic per run</h2>"
                     + html_table(summarize(df), "summary-table"))
        figures = {**sweep_figures(df), **compare_figures(df)}
        parts.append("<h2 id=plots>Plots</h2>"
                     + (_figures(figures) or "<p>No early-exit or draft runs to plot.</p>"))
        audit = audit_table(df)
        classes = ["lossy" if lossy else "mismatch" if v == "MISMATCH" else ""
                   for lossy, v in zip(audit["lossy"], audit["lossless_verdict"], strict=True)]
        parts.append("<h2 id=audit>Lossless audit, per row</h2><p>Each row's output against "
                     "its baseline's on the same example and repeat: first differing "
                     "position (-1: identical) and the float32 logit margin there; lossy "
                     "rows are marked and never verified.</p>"
                     + html_table(audit, "audit-table", classes))
    if scan is not None:
        points, policies, figures = scan
        nav.append("scan")
        parts.append("<h2 id=scan>Scan: the predicted surface</h2><h3>Best predicted "
                     "points</h3>" + html_table(points, "scan-table")
                     + "<h3>Adaptive policies</h3>" + html_table(policies, "policies-table")
                     + _figures(figures))
    title = "lsbench report: " + ", ".join(sources)
    links = "".join(f'<a href="#{n}">{n}</a>' for n in nav)
    return ("<!doctype html>\n<html lang=en><head><meta charset=utf-8>"
            '<meta name=viewport content="width=device-width, initial-scale=1">'
            f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>"
            f"<h1>lsbench report</h1><p>{html.escape(', '.join(sources))} · written by "
            f"lsbench {html.escape(__version__)}</p><nav>{links}</nav>"
            + "".join(parts) + f"<script>{SORT_JS}</script></body></html>\n")
