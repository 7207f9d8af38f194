"""Tables from `lsbench scan` files (no torch): the predicted surface, the adaptive-policy
report (best static point, per-example oracle and the static best's regret against it, the
confidence-stopped drafter), and predicted against measured points after `--verify`.

Aggregates over examples weigh every generated token alike: speedup is total baseline decode
time over total predicted decode time, acceptance is total accepted over total drafted.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from lsbench.errors import LsbenchError
from lsbench.results.scan_schema import SCAN_COLUMNS, SCAN_METADATA_KEY

POINT_KEYS = ["strategy", "exit_layer", "draft_model", "num_speculations",
              "confidence_threshold"]
BLOCK_KEYS = ["model", "dataset"]


def is_scan_file(path: str | Path) -> bool:
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError, ValueError):
        return False
    meta = pf.metadata.metadata or {}
    return SCAN_METADATA_KEY in meta and "predicted_speedup" in pf.schema_arrow.names


def check_scan_target(path: str | Path) -> None:
    """A scan may replace an older scan file, never anything else."""
    p = Path(path)
    if p.is_dir():
        raise LsbenchError(f"{p} is a directory, not a scan file")
    if p.exists():
        try:
            meta = pq.ParquetFile(p).metadata.metadata or {}
        except (pa.ArrowException, OSError, ValueError):
            meta = {}
        if SCAN_METADATA_KEY not in meta:
            raise LsbenchError(f"{p} exists and is not an lsbench scan file; refusing to "
                               "overwrite it (choose another --out)")


def read_scans(paths: list[str | Path]) -> pd.DataFrame:
    frames = []
    for p in paths:
        if not is_scan_file(p):
            raise LsbenchError(f"{p} is not an lsbench scan file")
        present = set(pq.ParquetFile(p).schema_arrow.names)  # older scans lack host, worker
        names = [name for name, _, _ in SCAN_COLUMNS]
        df = pd.read_parquet(p, columns=[n for n in names if n in present]).reindex(
            columns=names)
        df["source_file"] = Path(p).name
        frames.append(df)
    if not frames:
        raise LsbenchError("no scan files given")
    return pd.concat(frames, ignore_index=True)


def _blocks(df: pd.DataFrame) -> list[str]:
    return (["source_file"] if "source_file" in df.columns else []) + BLOCK_KEYS


def _with_times(df: pd.DataFrame) -> pd.DataFrame:
    df = df.copy()
    decode = (df["new_tokens"] - 1).clip(lower=0)
    df["_base_ms"] = df["baseline_ms_per_token"] * decode
    df["_pred_ms"] = df["predicted_ms_per_token"] * decode
    df["_drafted"] = df["predicted_drafted_per_round"].map(lambda v: int(sum(v)))
    df["_accepted"] = df["predicted_accepted_per_round"].map(lambda v: int(sum(v)))
    df["_decode"] = decode
    df["confidence_threshold"] = df["confidence_threshold"].fillna(-1.0)  # groupable
    return df


def surface(df: pd.DataFrame) -> pd.DataFrame:
    """One row per point over all examples, best first within each (file, model, dataset)."""
    d = _with_times(df)
    g = d.groupby(_blocks(d) + POINT_KEYS, sort=False, dropna=False)
    out = g.agg(examples=("example_id", "nunique"), base=("_base_ms", "sum"),
                pred=("_pred_ms", "sum"), drafted=("_drafted", "sum"),
                accepted=("_accepted", "sum"), decode=("_decode", "sum"),
                rounds=("predicted_rounds", "sum"),
                near_tie=("min_margin", "min")).reset_index()
    out["predicted_speedup"] = out["base"] / out["pred"]
    out["predicted_acceptance_rate"] = out["accepted"] / out["drafted"].where(out["drafted"] > 0)
    out["predicted_mean_accepted_len"] = out["decode"] / out["rounds"].where(out["rounds"] > 0)
    out["predicted_ms_per_token"] = out["pred"] / out["decode"]
    out["baseline_ms_per_token"] = out["base"] / out["decode"]
    out["confidence_threshold"] = out["confidence_threshold"].where(
        out["confidence_threshold"] >= 0)
    out = out.sort_values([*_blocks(out), "predicted_speedup"],
                          ascending=[True] * len(_blocks(out)) + [False], kind="stable")
    return out.drop(columns=["base", "pred", "drafted", "accepted", "decode"]).reset_index(
        drop=True)


def point_label(row) -> str:
    s = row["strategy"]
    if s == "spec":
        return f"spec draft={row['draft_model']} k={int(row['num_speculations'])}"
    if s == "pld":
        return f"pld k={int(row['num_speculations'])}"
    label = f"{s} E={int(row['exit_layer'])} k={int(row['num_speculations'])}"
    t = row["confidence_threshold"]
    return label + (f" tau={t:g}" if s == "layerskip-conf" and t == t else "")


def policies(df: pd.DataFrame) -> pd.DataFrame:
    """Per (file, model, dataset): the best static point per strategy (and per threshold of
    the confidence-stopped drafter), the per-example oracle over every point, and each
    policy's regret against the oracle (1 - speedup / oracle speedup)."""
    d = _with_times(df)
    surf = surface(df)
    rows = []
    for key, block in d.groupby(_blocks(d), sort=False):
        key = key if isinstance(key, tuple) else (key,)
        ident = dict(zip(_blocks(d), key, strict=True))
        s_block = surf
        for c, v in ident.items():
            s_block = s_block[s_block[c] == v]
        best_idx = block.groupby("example_id")["_pred_ms"].idxmin()
        oracle = block.loc[best_idx]
        oracle_speedup = oracle["_base_ms"].sum() / oracle["_pred_ms"].sum()
        choices = oracle.apply(point_label, axis=1).value_counts()
        entries = []
        for strategy, g in s_block.groupby(["strategy", "confidence_threshold"], sort=False,
                                           dropna=False):
            top = g.iloc[0]
            what = {"layerskip": "best static (E, k)", "spec": "best static draft k",
                    "layerskip-conf": "best static (E, k), confidence-stopped",
                    "pld": "best static prompt-lookup k"}[strategy[0]]
            entries.append((what, point_label(top), top["predicted_speedup"],
                            top["predicted_acceptance_rate"]))
        entries.append(("per-example oracle (E, k)",
                        f"{len(choices)} distinct points, most often {choices.index[0]}",
                        oracle_speedup, math.nan))
        for what, label, speedup, acc in entries:
            rows.append({**ident, "policy": what, "point": label, "predicted speedup": speedup,
                         "predicted acceptance": acc,
                         "regret vs oracle": 1 - speedup / oracle_speedup})
    table = pd.DataFrame(rows)
    return table.sort_values([*_blocks(table), "predicted speedup"],
                             ascending=[True] * len(_blocks(table)) + [False],
                             kind="stable").reset_index(drop=True)


def top_points(df: pd.DataFrame, n: int, *, random_extra: int = 0, seed: int = 0,
               strategies: tuple[str, ...] = ("layerskip", "spec", "pld")) -> pd.DataFrame:
    """The n best predicted points the engine can run, plus `random_extra` others at random."""
    surf = surface(df)
    surf = surf[surf["strategy"].isin(strategies)]
    best = surf.head(n)
    rest = surf.iloc[n:]
    extra = rest.sample(min(random_extra, len(rest)), random_state=seed) if len(rest) else rest
    return pd.concat([best, extra]).reset_index(drop=True)


def scan_table(df: pd.DataFrame, n: int = 10) -> pd.DataFrame:
    """`lsbench report`'s scan table: the n best predicted points per block."""
    surf = surface(df)
    surf = surf.groupby(_blocks(surf), sort=False).head(n)
    return pd.DataFrame({
        **({"file": surf["source_file"]} if "source_file" in surf.columns else {}),
        "model": surf["model"], "dataset": surf["dataset"],
        "point": surf.apply(point_label, axis=1), "examples": surf["examples"],
        "predicted acceptance": surf["predicted_acceptance_rate"],
        "predicted accepted len": surf["predicted_mean_accepted_len"],
        "predicted ms/token": surf["predicted_ms_per_token"],
        "baseline ms/token": surf["baseline_ms_per_token"],
        "predicted speedup": surf["predicted_speedup"],
        "min margin": surf["near_tie"],
    }).reset_index(drop=True)


def compare_points(scan: pd.DataFrame, results: pd.DataFrame,
                   points: pd.DataFrame) -> pd.DataFrame:
    """Per point of `points` that `results` measured: predicted and measured acceptance,
    ms/token and speedup over the examples both files hold, as numbers. The measured speedup
    uses the sweep's own baseline: its total decode time per token over the point's, and the
    predicted one the scan's (`surface`); rel_error = predicted / measured speedup - 1.
    identical_rounds: examples whose every measured run accepted per round exactly what the
    scan predicted (so rounds, histogram and accepted length agree too); identical_drafted:
    those whose drafted counts per round agree as well (so the acceptance rate does)."""
    rows = []
    base = results[results["is_baseline"]]
    for _, p in points.iterrows():
        m = results[(results["strategy"] == p["strategy"])
                    & (results["exit_layer"] == p["exit_layer"])
                    & (results["draft_model"] == p["draft_model"])
                    & (results["num_speculations"] == p["num_speculations"])]
        ids = set(m["example_id"]) & set(scan["example_id"])
        if not ids:
            continue
        m, b = m[m["example_id"].isin(ids)], base[base["example_id"].isin(ids)]
        s = scan[(scan["strategy"] == p["strategy"]) & (scan["exit_layer"] == p["exit_layer"])
                 & (scan["draft_model"] == p["draft_model"])
                 & (scan["num_speculations"] == p["num_speculations"])
                 & scan["example_id"].isin(ids)]
        pred = surface(s).iloc[0]
        drafted = sum(int(sum(v)) for v in m["drafted_per_round"])
        accepted = sum(int(sum(v)) for v in m["accepted_per_round"])
        measured_ms = m["decode_s"].sum() * 1000 / m["decode_tokens"].sum()
        base_ms = b["decode_s"].sum() * 1000 / b["decode_tokens"].sum()
        same_accepted = same_drafted = 0
        for ex, runs in m.groupby("example_id"):
            row = s[s["example_id"] == ex].iloc[0]
            acc = all(list(v) == list(row["predicted_accepted_per_round"])
                      for v in runs["accepted_per_round"])
            same_accepted += acc
            same_drafted += acc and all(list(v) == list(row["predicted_drafted_per_round"])
                                        for v in runs["drafted_per_round"])
        measured_speedup = base_ms / measured_ms
        rows.append({
            **{key: p[key] for key in ("strategy", "exit_layer", "draft_model",
                                       "num_speculations")},
            "confidence_threshold": p.get("confidence_threshold", math.nan),
            "examples": len(ids), "identical_rounds": same_accepted,
            "identical_drafted": same_drafted,
            "predicted_acceptance": pred["predicted_acceptance_rate"],
            "measured_acceptance": accepted / drafted if drafted else math.nan,
            "predicted_ms_per_token": pred["predicted_ms_per_token"],
            "measured_ms_per_token": measured_ms,
            "predicted_speedup": pred["predicted_speedup"],
            "measured_speedup": measured_speedup,
            "rel_error": pred["predicted_speedup"] / measured_speedup - 1,
        })
    return pd.DataFrame(rows)


def predicted_vs_measured(scan: pd.DataFrame, results: pd.DataFrame,
                          points: pd.DataFrame) -> pd.DataFrame:
    """Per verified point: predicted and measured acceptance, ms/token and speedup, over the
    examples both files hold (the measured speedup uses the sweep's own baseline)."""
    c = compare_points(scan, results, points)
    if c.empty:
        return pd.DataFrame()
    return pd.DataFrame({
        "point": c.apply(point_label, axis=1), "examples": c["examples"],
        "predicted acceptance": c["predicted_acceptance"],
        "measured acceptance": c["measured_acceptance"],
        "identical rounds": [f"{a}/{n}" for a, n in zip(c["identical_rounds"], c["examples"],
                                                        strict=True)],
        "predicted ms/token": c["predicted_ms_per_token"],
        "measured ms/token": c["measured_ms_per_token"],
        "predicted speedup": c["predicted_speedup"],
        "measured speedup": c["measured_speedup"],
        "rel. error": c["rel_error"],
    })


@dataclass(frozen=True)
class GridCheck:
    """A scan against a fully measured grid of one strategy (`grid_check`)."""

    points: int  # grid points compared
    example_points: int  # (example, point) pairs compared
    identical_rounds: int  # of those, with the predicted accepted count in every round
    identical_drafted: int  # ... and the predicted drafted count in every round too
    median_abs_rel_error: float  # median over points of |predicted / measured speedup - 1|
    best_predicted: dict  # exit_layer, num_speculations, predicted and measured speedup
    best_measured: dict  # the same for the point with the highest measured speedup
    best_ratio: float  # measured speedup of best_predicted / that of best_measured

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def grid_check(scan: pd.DataFrame, results: pd.DataFrame, strategy: str = "layerskip",
               best_below_exit: int | None = None) -> GridCheck:
    """Every point of `strategy` in `results` (a sweep of the scanned model and examples)
    against the scan (`compare_points`); the best points are chosen among exits below
    `best_below_exit` (None: all), by predicted and by measured speedup."""
    runs = results[~results["is_baseline"] & (results["strategy"] == strategy)]
    keys = ["strategy", "exit_layer", "draft_model", "num_speculations"]
    table = compare_points(scan, results, runs[keys].drop_duplicates())
    if table.empty:
        raise LsbenchError(f"the scan and the results share no measured {strategy} point")
    pool = table if best_below_exit is None else table[table["exit_layer"] < best_below_exit]
    if pool.empty:
        raise LsbenchError(f"no measured {strategy} point below exit layer {best_below_exit}")

    def point(row) -> dict:
        return {"exit_layer": int(row["exit_layer"]), "num_speculations":
                int(row["num_speculations"]), "predicted_speedup":
                float(row["predicted_speedup"]), "measured_speedup":
                float(row["measured_speedup"])}

    chosen = pool.loc[pool["predicted_speedup"].idxmax()]
    best = pool.loc[pool["measured_speedup"].idxmax()]
    return GridCheck(
        points=len(table), example_points=int(table["examples"].sum()),
        identical_rounds=int(table["identical_rounds"].sum()),
        identical_drafted=int(table["identical_drafted"].sum()),
        median_abs_rel_error=float(table["rel_error"].abs().median()),
        best_predicted=point(chosen), best_measured=point(best),
        best_ratio=float(chosen["measured_speedup"] / best["measured_speedup"]))
