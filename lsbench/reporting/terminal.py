"""The sweep table as the terminal shows it: rich tables and the verdict lines under them.
The CLI prints what this returns; nothing here prints."""

from __future__ import annotations

import pandas as pd
from rich.table import Table

from lsbench.reporting.report import crossovers, format_cell, sweep_table


def sweep_renderables(df: pd.DataFrame) -> list[Table | str]:
    """The sweep table per (model, dataset, batch size) as rich tables, each followed by its
    verdict lines (roofline, best lossless, best lossy) as plain strings; with several batch
    sizes, then one crossover line per lossless setting (`crossover_lines`)."""
    table = sweep_table(df)
    items: list[Table | str] = []
    batched = table["batch"].nunique() > 1 or (table["batch"] != 1).any()
    for (model, dataset, size), rows in table.groupby(["model", "dataset", "batch"],
                                                      sort=False):
        at = f" at batch size {size} (aggregate {_aggregate(rows)} tokens/s)" if batched else ""
        t = Table(title=f"{model} on {dataset}{at}: medians over examples, speedup vs the "
                        "same engine's autoregressive decoding in the same process (95% CI "
                        "over examples)", title_justify="left")
        # Columns that only transformers' references (lsbench vs transformers), prompt lookup
        # (rounds without a match) or lossy rows (agreement with autoregressive decoding) fill
        # appear only with such rows.
        cols = ["run", "k", "tokens/s", "speedup"]
        cols += ["vs transformers"] if rows["strategy"].str.startswith("hf-").any() else []
        cols += ["acceptance"]
        cols += ["no-draft rounds"] if rows["strategy"].eq("pld").any() else []
        cols += ["accepted len", "ROUGE-L"]
        cols += ["agreement"] if rows["lossy"].any() else []
        cols += ["roofline", "lossless"]
        for c in cols:
            header = {"speedup": "speedup [95% CI]", "vs transformers": "vs HF"}.get(c, c)
            t.add_column(header, justify="left" if c == "run" else "right")
        for _, row in rows.iterrows():
            label = {"ar": "autoregressive (baseline)",
                     "hf-ar": "autoregressive (transformers baseline)",
                     "hf-ar-compiled": "autoregressive, compiled"}.get(row["strategy"],
                                                                       row["draft"])
            if row["strategy"].startswith("hf-") and row["strategy"] != "hf-ar":
                label = f"{label} (transformers)"
            no_k = ("ar", "hf-ar", "hf-ar-compiled", "exit")
            cells = [label, "—" if row["strategy"] in no_k else str(row["k"])]
            cells += [format_cell(c, row[c]) for c in cols[2:-1]]
            if row["speedup 95% CI"] != "—" and row["strategy"] not in ("ar", "hf-ar"):
                cells[3] += f" [{row['speedup 95% CI']}]"
            match = row["lossless"]
            cells.append("lossy" if row["lossy"] else "—" if match != match else
                         "yes" if match == 1 else f"{match:.0%} ({row['verdict']})")
            style = ("bold green" if row["best"] else "yellow" if row["lossy"]
                     else "cyan" if row["strategy"] == "ar" else None)
            t.add_row(*cells, style=style)
        items.append(t)
        base = rows[rows["strategy"] == "ar"]
        if len(base) and base.iloc[0]["roofline"] == base.iloc[0]["roofline"]:
            b = base.iloc[0]
            items.append(f"roofline: autoregressive decoding reads weights at "
                         f"{format_cell('weights GB/s', b['weights GB/s'])} GB/s, "
                         f"{format_cell('roofline', b['roofline'])} of this device's memory copy "
                         f"bandwidth ({format_cell('peak GB/s', b['peak GB/s'])} GB/s)")
        best = rows[rows["best"]]
        if len(best):
            b = best.iloc[0]
            verdict = ("faster than" if b["speedup"] > 1 else
                       "every lossless setting is slower than")
            k = f", k={b['k']}" if b["k"] else ""
            items.append(f"best lossless: {run_name(b)}{k} at "
                         f"{format_cell('speedup', b['speedup'])}: {verdict} its engine's "
                         "autoregressive decoding")
        lossy = rows[rows["best lossy"]]
        if len(lossy):
            b = lossy.iloc[0]
            quality = (f"ROUGE-L {format_cell('ROUGE-L', b['ROUGE-L'])}"
                       if b["ROUGE-L"] == b["ROUGE-L"] else "no references")
            items.append(f"best lossy: {run_name(b)} at "
                         f"{format_cell('speedup', b['speedup'])} with {quality}, "
                         f"{format_cell('agreement', b['agreement'])} of positions agreeing with "
                         "autoregressive decoding (not lossless, not in the verdict above)")
    return items + crossover_lines(df)


def _aggregate(rows: pd.DataFrame) -> str:
    base = rows[rows["strategy"] == "ar"]
    return format_cell("tokens/s", base["aggregate tokens/s"].iloc[0]) if len(base) else "—"


def crossover_lines(df: pd.DataFrame) -> list[str]:
    """One line per lossless setting measured at several batch sizes: the largest batch size
    at which it is still faster than its baseline (the crossover), or that it never is."""
    lines = []
    for c in crossovers(df):
        name = c["draft"] if c["draft"] != "—" else c["strategy"]
        name = f"{name} (transformers)" if c["strategy"].startswith("hf-") else name
        k = f", k={int(c['num_speculations'])}" if c["num_speculations"] else ""
        sizes = ", ".join(str(b) for b in c["batch_sizes"])
        if c["crossover"] is None:
            lines.append(f"crossover: {name}{k} is slower than autoregressive decoding at "
                         f"every measured batch size ({sizes})")
        else:
            lines.append(f"crossover: {name}{k} is faster than autoregressive decoding up to "
                         f"batch size {c['crossover']} (largest measured faster; measured at "
                         f"{sizes})")
    return lines


def run_name(row) -> str:
    """A sweep-table row as the verdict names it: what drafts, and whose implementation."""
    name = row["draft"] if row["draft"] != "—" else row["strategy"]
    return f"{name} (transformers)" if row["strategy"].startswith("hf-") else name
