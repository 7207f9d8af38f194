"""Tables from result rows: a per-run summary, the end-of-sweep table, and the LayerSkip blog's
comparison table with honest labels. Works on DataFrames only (no torch).

Tables keep raw numbers so that CSV stays machine-readable; `to_markdown` formats them for
people, choosing the format from the column name.
"""

from __future__ import annotations

import json
import math
from numbers import Integral, Real

import numpy as np
import pandas as pd

from lsbench.errors import LsbenchError
from lsbench.scenario.latency import ITL_PERCENTILES, token_gaps

EARLY_EXIT = ("layerskip", "hf-early-exit")
DRAFT_MODEL = ("spec", "hf-assisted")
PROMPT_LOOKUP = ("pld", "hf-pld")
# Lossy by design (for rows written before the `lossy` column; the column decides otherwise).
LOSSY = ("exit",)
GROUP_KEYS = ["model", "strategy", "draft_model", "exit_layer", "num_speculations", "dataset",
              "do_sample", "run_id"]
# Constant within a run; carried into the summary so that tables need not go back to the rows.
CARRIED = ["is_baseline", "model_num_layers", "model_params", "draft_num_layers", "draft_params",
           "compiled"]
SPREAD = ["tokens_per_s", "ms_per_token", "speedup"]  # median with p25/p75
MEDIANS = ["flops_prefill", "flops_per_output_token", "prefill_s", "draft_s", "achieved_gbps",
           "peak_gbps", "roofline_fraction", "batch_tokens_per_s"]
NONE = "—"
BOOTSTRAP_RESAMPLES = 2000  # paired bootstrap over examples, seeded: CIs are reproducible
BOOTSTRAP_SEED = 0
# lsbench's strategy -> transformers' counterpart, for the cross-engine column; compiled `ar`
# pairs with transformers' compiled generate() (its assisted loops cannot be compiled)
COUNTERPART = {"ar": "hf-ar", "layerskip": "hf-early-exit", "spec": "hf-assisted",
               "pld": "hf-pld"}
COMPILED_COUNTERPART = {"ar": "hf-ar-compiled"}


def counterpart(strategy: str, compiled: object) -> str | None:
    """transformers' run an lsbench run is compared with (`compiled`: the row's engine)."""
    if not pd.isna(compiled) and bool(compiled) and strategy in COMPILED_COUNTERPART:
        return COMPILED_COUNTERPART[strategy]
    return COUNTERPART.get(strategy)


def _group_keys(df: pd.DataFrame) -> list[str]:
    return (["source_file"] if "source_file" in df.columns else []) + GROUP_KEYS


def _numeric(g: pd.DataFrame, col: str) -> pd.Series:
    if col not in g.columns:
        return pd.Series(float("nan"), index=g.index)
    return pd.to_numeric(g[col], errors="coerce").astype(float)


def _list_total(value) -> int:
    # Missing lists come back from Parquet/pandas as None, NaN or pd.NA.
    if value is None or value is pd.NA or isinstance(value, float):
        return 0
    return int(sum(value))


def _acceptance(g: pd.DataFrame) -> float:
    """Accepted / drafted over all rounds of the run (mean of totals, so long generations weigh
    more); the mean of per-row rates when the raw lists are absent."""
    if {"accepted_per_round", "drafted_per_round"} <= set(g.columns):
        drafted = sum(_list_total(v) for v in g["drafted_per_round"])
        if drafted > 0:
            return sum(_list_total(v) for v in g["accepted_per_round"]) / drafted
    return float(_numeric(g, "acceptance_rate").mean())


def _match_rate(g: pd.DataFrame) -> float:
    if "matches_baseline" not in g.columns:
        return float("nan")
    return float(g["matches_baseline"].astype("boolean").fillna(False).mean())


def bootstrap_median_ci(values: np.ndarray, *, resamples: int = BOOTSTRAP_RESAMPLES,
                        seed: int = BOOTSTRAP_SEED) -> tuple[float, float]:
    """95% percentile-bootstrap CI of the median, resampling examples with replacement. Each
    value is already a paired ratio (baseline and run on the same example), so resampling
    examples keeps the pairs together."""
    values = values[~np.isnan(values)]
    if len(values) == 0:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    medians = np.median(values[rng.integers(0, len(values), (resamples, len(values)))], axis=1)
    low, high = np.percentile(medians, [2.5, 97.5])
    return float(low), float(high)


def _speedup_estimates(g: pd.DataFrame) -> dict[str, float]:
    """Per-example speedups (median over repeats), their median and bootstrap CI; the ratio of
    total times; the number of examples."""
    speedup = _numeric(g, "speedup")
    per_example = speedup.groupby(g["example_id"]).median().to_numpy(dtype=float)
    low, high = bootstrap_median_ci(per_example)
    base_time = (_numeric(g, "baseline_ms_per_token") * _numeric(g, "decode_tokens")).sum()
    run_time = 1000 * _numeric(g, "decode_s")[speedup.notna()].sum()
    return {"speedup_example_median": (float(np.nanmedian(per_example))
                                       if (~np.isnan(per_example)).any() else math.nan),
            "speedup_ci_low": low, "speedup_ci_high": high,
            "time_ratio": base_time / run_time if run_time > 0 else math.nan,
            "n_examples": int(g["example_id"].nunique())}


def _verdicts(g: pd.DataFrame) -> dict:
    if "lossless_verdict" not in g.columns or g["lossless_verdict"].isna().all():
        return {"verdict": None, "near_ties": 0, "mismatches": 0}
    v = g["lossless_verdict"].dropna()
    near, bad = int((v == "near-tie").sum()), int((v == "MISMATCH").sum())
    return {"verdict": "MISMATCH" if bad else "near-tie" if near else "exact",
            "near_ties": near, "mismatches": bad}


def _cross_engine(summary: pd.DataFrame) -> pd.Series:
    """lsbench's ms/token ÷ transformers' for the same (E, k) or draft, on both rows of a pair."""
    out = pd.Series(math.nan, index=summary.index)
    blocks = [k for k in ("source_file", "model", "dataset", "do_sample") if k in summary]
    for _, g in summary.groupby(blocks, sort=False, dropna=False):
        for i, row in g.iterrows():
            other = counterpart(row["strategy"], row.get("compiled", pd.NA))
            if other is None:
                continue
            match = g[(g["strategy"] == other) & (g["exit_layer"] == row["exit_layer"])
                      & (g["num_speculations"] == row["num_speculations"])
                      & (g["draft_model"] == row["draft_model"])]
            if len(match):
                ratio = row["ms_per_token_median"] / match["ms_per_token_median"].iloc[0]
                out[i] = out[match.index[0]] = ratio
    return out


def _lossy(g: pd.DataFrame, strategy: str) -> bool:
    if "lossy" in g.columns and g["lossy"].notna().any():
        return bool(g["lossy"].astype("boolean").fillna(False).any())
    return strategy in LOSSY


def _rounds_total(g: pd.DataFrame, col: str) -> float:
    """Sum over the run's rows; NaN where no row knows it (transformers' loops)."""
    s = _numeric(g, col)
    return float(s.sum()) if s.notna().any() else math.nan


def _latency_ms(g: pd.DataFrame) -> dict[str, float]:
    """ttft_ms and tpot_ms (medians over the rows) and itl_p<q>_ms, percentiles of the inter-
    token latencies of all the run's tokens pooled (as serving benchmarks report them), from
    the raw steps; the median of the rows' itl_p<q>_s where the raw lists are absent."""
    out = {"ttft_ms": 1000 * _numeric(g, "ttft_s").median(),
           "tpot_ms": 1000 * _numeric(g, "tpot_s").median()}
    gaps: list[float] = []
    raw = {"step_end_s", "step_tokens"} <= set(g.columns)
    for ends, counts in zip(g["step_end_s"], g["step_tokens"], strict=True) if raw else ():
        if not (ends is None or ends is pd.NA or isinstance(ends, float)):  # null: old files
            gaps += token_gaps(list(ends), list(counts))
    for q in ITL_PERCENTILES:
        out[f"itl_p{q}_ms"] = (1000 * float(np.percentile(gaps, q)) if gaps
                               else 1000 * _numeric(g, f"itl_p{q}_s").median())
    return out


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    """One row per run. Columns: the group keys, CARRIED, lossy, n, `<m>_median/_p25/_p75` for
    tokens_per_s, ms_per_token and speedup, acceptance_rate (sum accepted / sum drafted, so
    rounds that drafted nothing do not count), rounds and rounds_without_draft (sums),
    mean_accepted_len, rougeL, agreement and match_rate (means), the latencies in ms
    (`_latency_ms`: ttft_ms, tpot_ms, itl_p50/p90/p99_ms), flops_prefill,
    flops_per_output_token, prefill_s, draft_s, achieved_gbps, peak_gbps and
    roofline_fraction and batch_tokens_per_s (medians); batch_size; the speedup estimators
    (`_speedup_estimates`): speedup_example_median with speedup_ci_low/high, time_ratio,
    n_examples; baseline_strategy; the losslessness verdict (worst of the rows) with near_ties
    and mismatches; and vs_transformers, lsbench's ms/token over transformers' for the same
    configuration. Each model/dataset block, batch size by batch size, starts with its
    baselines."""
    if df.empty:
        raise LsbenchError("no rows to summarize")
    keys = _group_keys(df)
    missing = [k for k in [*keys, "is_baseline"] if k not in df.columns]
    if missing:
        raise LsbenchError(f"results lack columns: {', '.join(missing)}")
    rows = df.assign(draft_model=df["draft_model"].fillna(""))
    # Files of schema version 1 compared every run with ar.
    base = rows["baseline_strategy"] if "baseline_strategy" in rows else pd.Series(None,
                                                                                  index=rows.index)
    rows = rows.assign(baseline_strategy=base.fillna("ar"))
    # Files of schema version 3 and older decoded one example at a time (no batch size: 1).
    sizes = rows["batch_size"] if "batch_size" in rows else pd.Series(1, index=rows.index)
    sizes = pd.to_numeric(sizes).fillna(1).astype("int64")
    rows = rows.assign(batch_size=sizes.where(sizes >= 1, 1))
    out = []
    for key, g in rows.groupby(keys, sort=False, dropna=False):
        rec = dict(zip(keys, key, strict=True))
        for col in CARRIED:
            rec[col] = g[col].iloc[0] if col in g.columns else pd.NA
        rec["is_baseline"] = bool(g["is_baseline"].astype("boolean").fillna(False).any())
        rec["batch_size"] = int(g["batch_size"].iloc[0])
        rec["lossy"] = _lossy(g, rec["strategy"])
        rec["n"] = len(g)
        for col in SPREAD:
            s = _numeric(g, col)
            rec[f"{col}_median"] = s.median()
            rec[f"{col}_p25"] = s.quantile(0.25)
            rec[f"{col}_p75"] = s.quantile(0.75)
        rec["acceptance_rate"] = _acceptance(g)
        rec["rounds"] = _rounds_total(g, "rounds")
        rec["rounds_without_draft"] = _rounds_total(g, "rounds_without_draft")
        rec["mean_accepted_len"] = _numeric(g, "mean_accepted_len").mean()
        rec["rougeL"] = _numeric(g, "rougeL").mean()
        rec["agreement"] = _numeric(g, "agreement").mean()
        rec["match_rate"] = _match_rate(g)
        for col in MEDIANS:
            rec[col] = _numeric(g, col).median()
        rec.update(_latency_ms(g))
        rec.update(_speedup_estimates(g))
        rec["baseline_strategy"] = g["baseline_strategy"].iloc[0]
        rec.update(_verdicts(g))
        out.append(rec)
    summary = pd.DataFrame(out)
    summary["vs_transformers"] = _cross_engine(summary)
    order = [k for k in ("source_file", "model", "dataset") if k in keys]
    order += ["batch_size", "_later", "strategy", "draft_model", "exit_layer",
              "num_speculations", "do_sample"]
    summary["_later"] = ~summary["is_baseline"]
    summary = summary.sort_values(order, kind="stable").drop(columns="_later")
    return summary.reset_index(drop=True)


def mixed_device_warnings(df: pd.DataFrame) -> list[str]:
    """One line per run whose rows were measured on devices with different names (a sharded
    job on mixed hardware): its medians mix machines and are not one device's numbers."""
    lines = []
    for run_id, g in df.groupby("run_id", sort=False):
        names = sorted(g["device_name"].dropna().unique())
        if len(names) > 1:
            strategy, k = g["strategy"].iloc[0], int(g["num_speculations"].iloc[0] or 0)
            label = draft_label(strategy, g["draft_model"].iloc[0] or "",
                                int(g["exit_layer"].iloc[0] or 0))
            label = f"{strategy if label == NONE else label}{f', k={k}' if k else ''}"
            lines.append(f"run {run_id} ({label}) has rows from different devices: "
                         f"{', '.join(names)}")
    return lines


def draft_label(strategy: str, draft_model: str, exit_layer: int) -> str:
    """What drafts the tokens: the model's own early exit, a separate model, prompt lookup, or
    nothing; the lossy early exit (nothing verified) says so."""
    if strategy in EARLY_EXIT:
        return f"early exit @ layer {int(exit_layer)}"
    if strategy in LOSSY:
        return f"early exit @ layer {int(exit_layer)}, unverified (lossy)"
    if strategy in PROMPT_LOOKUP:
        return "prompt lookup"
    if strategy in DRAFT_MODEL:
        return draft_model or NONE
    return NONE


def _draft_labels(summary: pd.DataFrame) -> list[str]:
    cols = (summary["strategy"], summary["draft_model"], summary["exit_layer"])
    return [draft_label(*r) for r in zip(*cols, strict=True)]


def loaded_params(summary: pd.DataFrame) -> pd.Series:
    """Parameters held in memory: an early exit reuses the target's layers, a draft adds its own."""
    extra = summary["draft_params"].fillna(0).where(summary["strategy"].isin(DRAFT_MODEL), 0)
    return (summary["model_params"].fillna(0) + extra).astype("int64")


def human_count(n: float) -> str:
    """135M, 1.24B: parameter counts as people write them."""
    if n is None or (isinstance(n, float) and math.isnan(n)):
        return NONE
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= scale:
            value = n / scale
            return f"{value:.3g}{suffix}" if value < 100 else f"{value:.0f}{suffix}"
    return str(int(n))


def _file_column(summary: pd.DataFrame) -> dict[str, pd.Series]:
    return {"file": summary["source_file"]} if "source_file" in summary.columns else {}


def no_draft_share(summary: pd.DataFrame) -> pd.Series:
    """Share of rounds that proposed nothing (prompt lookup without a match); NaN for
    strategies that never draft or whose drafting lsbench cannot see."""
    share = summary["rounds_without_draft"] / summary["rounds"].where(summary["rounds"] > 0)
    return share.where(summary["strategy"].isin(("spec", "layerskip", "pld")))


def sweep_table(df: pd.DataFrame) -> pd.DataFrame:
    """The end-of-sweep table: every run per model and batch size (baseline first, then each
    exit layer and k), with `best` on the highest median speedup among the lossless
    non-baseline runs of each model at each batch size, and `best lossy` on the fastest lossy
    one (its quality is in ROUGE-L/agreement): a lossy row never wins the lossless verdict."""
    s = summarize(df)
    table = pd.DataFrame({
        **_file_column(s),
        "model": s["model"],
        "dataset": s["dataset"],
        "strategy": s["strategy"],
        "draft": _draft_labels(s),
        "exit layer": s["exit_layer"],
        "k": s["num_speculations"],
        "batch": s["batch_size"],
        "tokens/s": s["tokens_per_s_median"],
        "aggregate tokens/s": s["batch_tokens_per_s"],
        "baseline": s["baseline_strategy"],
        "speedup": s["speedup_example_median"],
        "speedup 95% CI": _ci_labels(s),
        "time ratio": s["time_ratio"],
        "n": s["n_examples"],
        "vs transformers": s["vs_transformers"],
        "acceptance": s["acceptance_rate"],
        "no-draft rounds": no_draft_share(s),
        "accepted len": s["mean_accepted_len"],
        "ROUGE-L": s["rougeL"],
        "agreement": s["agreement"],
        "lossless": s["match_rate"],
        "verdict": s["verdict"],
        "lossy": s["lossy"],
        "weights GB/s": s["achieved_gbps"],
        "peak GB/s": s["peak_gbps"],
        "roofline": s["roofline_fraction"],
    })
    table["best"] = False
    table["best lossy"] = False
    blocks = [k for k in ("source_file", "model", "dataset", "batch_size") if k in s.columns]
    candidates = s[~s["is_baseline"] & s["speedup_example_median"].notna()]
    for lossy, column in ((False, "best"), (True, "best lossy")):
        for _, g in candidates[candidates["lossy"] == lossy].groupby(blocks, sort=False):
            table.loc[g["speedup_example_median"].idxmax(), column] = True
    return table


def _ci_labels(s: pd.DataFrame) -> list[str]:
    return [NONE if math.isnan(lo) else f"{lo:.2f}\N{EN DASH}{hi:.2f}"
            for lo, hi in zip(s["speedup_ci_low"], s["speedup_ci_high"], strict=True)]


def blog_table(df: pd.DataFrame) -> pd.DataFrame:
    """The LayerSkip blog's comparison table, labelled for what is measured: the blog's
    "FLOPs/Input (G)" columns were times, here FLOPs and seconds are separate columns."""
    s = summarize(df)
    size = [
        f"{int(e)} layers" if strategy in EARLY_EXIT or strategy in LOSSY
        else human_count(p) if strategy in DRAFT_MODEL else NONE
        for strategy, e, p in zip(s["strategy"], s["exit_layer"], s["draft_params"], strict=True)
    ]
    iqr = [
        NONE if math.isnan(lo) else f"{lo:.2f}\N{EN DASH}{hi:.2f}"
        for lo, hi in zip(s["speedup_p25"], s["speedup_p75"], strict=True)
    ]
    return pd.DataFrame({
        **_file_column(s),
        "target": s["model"],
        # Not in the blog, but layerskip and hf-early-exit at the same E are different rows.
        "strategy": s["strategy"],
        "layers": s["model_num_layers"],
        "draft": _draft_labels(s),
        "draft size": size,
        # Not in the blog either, but runs differ by the draft tokens per round.
        "k": s["num_speculations"],
        "task": s["dataset"],
        "total params loaded": loaded_params(s),
        "GFLOPs/input": s["flops_prefill"] / 1e9,
        "s/input": s["prefill_s"],
        "GFLOPs/output token": s["flops_per_output_token"] / 1e9,
        "ms/output token": s["ms_per_token_median"],
        "acceptance rate": s["acceptance_rate"],
        "mean accepted length": s["mean_accepted_len"],
        "ROUGE-L": s["rougeL"],
        "baseline": s["baseline_strategy"],
        "speedup": s["speedup_example_median"],
        "speedup 95% CI": _ci_labels(s),
        "speedup IQR": iqr,
        "time ratio": s["time_ratio"],
        "n": s["n_examples"],
        "vs transformers": s["vs_transformers"],
        "lossless": s["verdict"],
        # Not in the blog: weight bytes read per second against the device's copy bandwidth.
        "weights GB/s": s["achieved_gbps"],
        "roofline": s["roofline_fraction"],
    })


# --- batch sizes ------------------------------------------------------------------------------

SETTING = ["model", "dataset", "strategy", "draft_model", "exit_layer", "num_speculations",
           "do_sample"]  # a configuration across batch sizes


def _setting_keys(s: pd.DataFrame) -> list[str]:
    return (["source_file"] if "source_file" in s.columns else []) + SETTING


def batch_table(df: pd.DataFrame) -> pd.DataFrame:
    """`report --table batch`: every setting at every batch size: aggregate throughput (all
    rows' new tokens / batch decode time, median over the batches' rows), that throughput
    against the same setting at batch 1 ("x batch 1"), the per-row median speedup on ar of the
    same batches, and the lossless verdict; `crossover` names on each lossless setting's rows
    the largest batch size at which it is still faster than its baseline (`crossovers`)."""
    s = summarize(df)
    keys = _setting_keys(s)
    one = s[s["batch_size"] == 1].set_index(keys)["batch_tokens_per_s"]
    at_one = [one.get(tuple(r), math.nan) if not one.index.has_duplicates else math.nan
              for r in s[keys].itertuples(index=False, name=None)]
    cross = {tuple(c[k] for k in keys): c["crossover"] for c in crossovers(df)}
    return pd.DataFrame({
        **_file_column(s),
        "model": s["model"],
        "dataset": s["dataset"],
        "strategy": s["strategy"],
        "draft": _draft_labels(s),
        "exit layer": s["exit_layer"],
        "k": s["num_speculations"],
        "batch": s["batch_size"],
        "aggregate tokens/s": s["batch_tokens_per_s"],
        "x batch 1": s["batch_tokens_per_s"] / pd.Series(at_one, index=s.index),
        "tokens/s": s["tokens_per_s_median"],
        "baseline": s["baseline_strategy"],
        "speedup": s["speedup_example_median"],
        "speedup 95% CI": _ci_labels(s),
        "n": s["n_examples"],
        "lossless": s["verdict"],
        "crossover": [cross.get(tuple(r), pd.NA)
                      for r in s[keys].itertuples(index=False, name=None)],
    })


def crossovers(df: pd.DataFrame) -> list[dict]:
    """Per lossless, non-baseline setting measured at more than one batch size: the largest
    measured batch size at which its median speedup on its baseline is still above 1
    (`crossover`, None when it is faster at none), and the batch sizes it was measured at."""
    s = summarize(df)
    s = s[~s["is_baseline"] & ~s["lossy"]]
    out = []
    for key, g in s.groupby(_setting_keys(s), sort=False, dropna=False):
        if g["batch_size"].nunique() < 2:
            continue
        faster = g[g["speedup_example_median"] > 1]["batch_size"]
        out.append({**dict(zip(_setting_keys(s), key, strict=True)),
                    "draft": draft_label(g["strategy"].iloc[0], g["draft_model"].iloc[0],
                                         g["exit_layer"].iloc[0]),
                    "crossover": int(faster.max()) if len(faster) else None,
                    "batch_sizes": sorted(int(b) for b in g["batch_size"])})
    return out


# --- rendering ------------------------------------------------------------------------------


def _sig(value: float, digits: int = 3) -> str:
    """`digits` significant digits without switching to exponent notation for large values."""
    if value == 0 or not math.isfinite(value):
        return f"{value:g}"
    decimals = digits - 1 - math.floor(math.log10(abs(value)))
    return f"{value:.{max(decimals, 0)}f}" if decimals > 0 else f"{round(value, decimals):.0f}"


def format_cell(column: str, value) -> str:
    """A cell for people; the column name says what the number is."""
    name = column.lower()
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return NONE
    if isinstance(value, bool) or type(value).__name__ == "bool_":
        return "✓" if value else ""
    if not isinstance(value, Real):
        return str(value).replace("|", "\\|")
    if "params" in name:
        return human_count(value)
    if isinstance(value, Integral):
        return str(value)
    if ("speedup" in name or "ratio" in name or "vs transformers" in name
            or name.startswith("x ")):
        return f"{value:.2f}x"
    if "roofline" in name:
        return f"{value:.1%}"
    if "gb/s" in name or "gbps" in name:
        return _sig(value)
    if "gflops" in name:
        return _sig(value)
    if "flops" in name:
        return f"{value:.3g}"
    if name.startswith("ms") or name.endswith("_ms") or "tokens/s" in name \
            or "tokens_per_s" in name:
        return f"{value:.2f}"
    if "s/input" in name or "prefill_s" in name:
        return _sig(value)
    if "accepted_len" in name or "accepted len" in name:
        return f"{value:.2f}"
    if "no-draft" in name or name == "agreement":
        return f"{value:.0%}"
    if any(w in name for w in ("acceptance", "rouge", "match")):
        return f"{value:.3f}"
    return _sig(value, 4)


def to_markdown(table: pd.DataFrame) -> str:
    """A GitHub pipe table, padded for terminals; numeric columns right-aligned."""
    headers = [str(c) for c in table.columns]
    cells = [[format_cell(c, v) for c, v in zip(headers, row, strict=True)]
             for row in table.itertuples(index=False, name=None)]
    right = [pd.api.types.is_numeric_dtype(table[c]) and not pd.api.types.is_bool_dtype(table[c])
             for c in table.columns]
    widths = [max([3, len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]

    def line(values: list[str]) -> str:
        cols = zip(values, widths, right, strict=True)
        padded = [v.rjust(w) if r else v.ljust(w) for v, w, r in cols]
        return "| " + " | ".join(padded) + " |"

    sep = "|" + "|".join("-" * (w + 1) + ":" if r else "-" * (w + 2)
                         for w, r in zip(widths, right, strict=True)) + "|"
    return "\n".join([line(headers), sep] + [line(r) for r in cells]) + "\n"


def to_csv(table: pd.DataFrame) -> str:
    """Raw values, full precision: for spreadsheets and scripts, not for reading."""
    return table.to_csv(index=False, lineterminator="\n")


# --- settings and JSON ----------------------------------------------------------------------

JSON_SCHEMA = "lsbench-report/1"
# What the rows say the job ran with, and what it ran on: one value when every row agrees,
# else the sorted distinct values. Per-run choices (strategy, E, k) are the tables' columns.
SETTING_COLUMNS = ["sweep_name", "sweep_file", "dataset", "dataset_split", "dataset_fingerprint",
                   "max_new_tokens", "max_input_tokens", "do_sample", "temperature", "top_k",
                   "top_p", "seed", "prompt_format", "n_shot", "stop_strings", "compiled"]
ENVIRONMENT = ["lsbench_version", "git_commit", "torch_version", "transformers_version",
               "device", "device_name", "dtype", "threads", "host", "device_map"]


def plain(value):
    """A cell as JSON has it: Python numbers, strings, bools and lists; None for missing and
    non-finite numbers (JSON has no NaN)."""
    if value is None or value is pd.NA or value is pd.NaT:
        return None
    if isinstance(value, (list, tuple, np.ndarray)):
        return [plain(v) for v in value]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, Integral):
        return int(value)
    if isinstance(value, Real):
        return float(value) if math.isfinite(value) else None
    return str(value)


def _distinct(series: pd.Series):
    seen: dict[str, object] = {}
    for v in series:
        p = plain(v)
        if p is not None and p != "":
            seen.setdefault(repr(p), p)
    values = sorted(seen.values(), key=str)
    return None if not values else values[0] if len(values) == 1 else values


def run_settings(df: pd.DataFrame) -> dict[str, dict]:
    """`settings` (SETTING_COLUMNS), `environment` (ENVIRONMENT) and `counts` (rows, runs,
    examples, repeats, the first and last measurement's UTC time) of result rows."""
    if df.empty:
        raise LsbenchError("no rows to report")
    pick = {c: _distinct(df[c]) if c in df.columns else None for c in SETTING_COLUMNS}
    env = {c: _distinct(df[c]) if c in df.columns else None for c in ENVIRONMENT}
    stamps = sorted(t for t in df.get("timestamp", pd.Series(dtype=str)).dropna() if t)
    counts = {"rows": len(df), "runs": int(df["run_id"].nunique()),
              "examples": int(df["example_id"].nunique()) if "example_id" in df else None,
              "repeats": int(df["repeat"].max()) + 1 if "repeat" in df else None,
              "first_measured": stamps[0] if stamps else None,
              "last_measured": stamps[-1] if stamps else None}
    return {"settings": pick, "environment": env, "counts": counts}


def records(table: pd.DataFrame) -> list[dict]:
    """Table rows as JSON objects, the column names as keys, in column order."""
    cols = [str(c) for c in table.columns]
    return [dict(zip(cols, map(plain, row), strict=True))
            for row in table.itertuples(index=False, name=None)]


def to_json(df: pd.DataFrame | None, sources: list[str], scan: pd.DataFrame | None = None,
            policies: pd.DataFrame | None = None) -> str:
    """The `lsbench-report/1` document (README, "HTML and JSON reports"): settings, summary
    and sweep tables of result rows (None: scan files alone), and the scan tables where scan
    files were given."""
    from lsbench import __version__

    doc = {"schema": JSON_SCHEMA, "lsbench_version": __version__, "sources": list(sources),
           **({"settings": None, "environment": None, "counts": None} if df is None
              else run_settings(df)),
           "warnings": [] if df is None else mixed_device_warnings(df),
           "summary": None if df is None else records(summarize(df)),
           "sweep": None if df is None else records(sweep_table(df)),
           "scan": None if scan is None else records(scan),
           "policies": None if policies is None else records(policies)}
    return json.dumps(doc, indent=1, allow_nan=False, ensure_ascii=False) + "\n"
