"""`lsbench scan`: the whole exit-layer x k surface from one teacher-forced pass per example.

Per example: one timed greedy autoregressive generation x (the measured baseline), then one
teacher-forced forward over prompt + x that keeps, after every decoder layer, the top-1 token
and probability of the model's own final norm + LM head at every output position (never the
full L x T x vocab logits: the head runs in row chunks). Greedy speculative decoding is then
replayed round by round for every (E, k) (`lsbench.scenario.replay`) and priced with unit costs
measured in the same process (`lsbench.scenario.costs`). Never prints: progress goes to a callback.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import math
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from lsbench.backend.early_exit import EarlyExitModel, check_exit_layers
from lsbench.engine.batch import BATCHED_STRATEGIES
from lsbench.engine.generation import DecodingConfig, Generation
from lsbench.errors import LsbenchError
from lsbench.results.scan_schema import (
    SCAN_COLUMNS,
    SCAN_METADATA_KEY,
    SCAN_SCHEMA_VERSION,
    TRACE_COLUMNS,
    arrow_schema,
)
from lsbench.scenario.costs import CostTable, measure_cost_table, with_draft_costs
from lsbench.scenario.data import build_prompts, load_examples
from lsbench.scenario.jobs import (
    BASELINE,
    JobSpec,
    Settings,
    base_job,
    batch_sizes,
    batched,
    parse_int_list,
)
from lsbench.scenario.replay import Replay, replay, replay_pld
from lsbench.scenario.runner import (
    ProgressEvent,
    engine_generate,
    environment,
    load_job_models,
    stop_token_ids,
    validate,
)

DEFAULT_KS = "1:8"
DEFAULT_THRESHOLDS = (0.3, 0.5, 0.7, 0.9)
LOGIT_BUDGET = 1 << 26  # float32 logits held at once by the chunked head: 256 MiB
SAMPLING_REFUSED = ("scan predicts greedy decoding only: under sampling the drafts and "
                    "verdicts are random, so a replay over one output is not exact; "
                    "use --greedy or time sampling with lsbench sweep")


@dataclass(frozen=True)
class TokenTrace:
    """Per output position j of x: the drafter's greedy token after x[j] (true prefix), its
    top-1 probability and its top-1 minus top-2 logit gap."""

    argmax: np.ndarray
    prob: np.ndarray
    margin: np.ndarray


@dataclass(frozen=True)
class ScanSpec:
    job: JobSpec  # model, data, decoding, device; runs = (BASELINE,)
    exit_layers: tuple[int, ...]
    ks: tuple[int, ...]
    drafts: tuple[str, ...] = ()
    thresholds: tuple[float, ...] = DEFAULT_THRESHOLDS
    pld: bool = True  # prompt-lookup rows (exact from x alone: no trace, no draft model)
    batch_sizes: tuple[int, ...] = (1,)  # the batch curve's sizes (`predict_batches`)

    @property
    def points(self) -> int:
        per_k = (len(self.exit_layers) * (1 + len(self.thresholds)) + len(self.drafts)
                 + self.pld)
        return per_k * len(self.ks)


def scan_spec(s: Settings, num_layers: int, *, drafts: Sequence[str] = (),
              thresholds: Sequence[float] = DEFAULT_THRESHOLDS, pld: bool = True) -> ScanSpec:
    """Scan settings: exit layers (default 1..L-1), k (default 1..8), greedy only."""
    default_layers = f"1:{num_layers - 1}" if num_layers > 1 else "1"
    layers = parse_int_list(s.get("sweep", "exit_layers", default_layers), num_layers=num_layers)
    check_exit_layers(layers, num_layers, s.get("", "model"))
    ks = parse_int_list(s.get("sweep", "num_speculations", DEFAULT_KS),
                        what="num_speculations")
    if any(k < 1 for k in ks):
        raise LsbenchError(f"num_speculations must be >= 1, got {ks}")
    if any(not 0 < t <= 1 for t in thresholds):
        raise LsbenchError(f"confidence thresholds must be in (0, 1], got {list(thresholds)}")
    job = base_job(s, [BASELINE], "sweep")
    if job.decoding.do_sample:
        raise LsbenchError(SAMPLING_REFUSED)
    if not s.get("", "name") and not s.source:
        job = dataclasses.replace(job, name="scan")
    return ScanSpec(job, tuple(layers), tuple(ks), tuple(dict.fromkeys(drafts)),
                    tuple(sorted(set(thresholds))), pld, tuple(batch_sizes(s, "sweep")))


# --- the teacher-forced pass ------------------------------------------------------------------

def _top2(model: EarlyExitModel, hidden: torch.Tensor) -> TokenTrace:
    """Top-1 token, probability and top-1/top-2 gap of rows `hidden` [1, n, d], in chunks."""
    n = hidden.shape[1]
    chunk = max(1, LOGIT_BUDGET // max(model.vocab_size, 1))
    tokens, probs, margins = [], [], []
    for lo in range(0, n, chunk):
        logits = model.logits(hidden[:, lo:lo + chunk])[0]
        top = logits.topk(min(2, logits.shape[-1]), dim=-1)
        lse = torch.logsumexp(logits, dim=-1)
        tokens.append(top.indices[:, 0])
        probs.append(torch.exp(top.values[:, 0] - lse))
        gap = top.values[:, 0] - top.values[:, 1] if top.values.shape[1] > 1 else lse * 0
        margins.append(gap)
    cat = (lambda xs: torch.cat(xs).cpu().numpy()) if n else (lambda xs: np.zeros(0))
    return TokenTrace(cat(tokens).astype(np.int64), cat(probs).astype(np.float32),
                      cat(margins).astype(np.float32))


@torch.inference_mode()
def exit_traces(model: EarlyExitModel, prompt_ids: list[int], out: list[int]) -> list[TokenTrace]:
    """One teacher-forced forward over prompt + out; entry E-1 is exit layer E's trace
    (entry L-1 the full model's) at the positions of out."""
    counts = model.counts.copy()
    cache = model.new_cache()
    ids = torch.tensor([[*prompt_ids, *out]], device=model.device)
    hidden = model.embed(ids)
    start = len(prompt_ids)
    traces = []
    for layer in range(model.num_layers):
        hidden = model.run_layers(hidden, cache, layer, layer + 1)
        traces.append(_top2(model, hidden[:, start:]))
    model.counts = counts  # analysis, not decoding work
    return traces


@torch.inference_mode()
def draft_trace(draft: EarlyExitModel, prompt_ids: list[int], out: list[int]) -> TokenTrace:
    """A draft model's greedy token after every out[j], teacher-forced over prompt + out."""
    counts = draft.counts.copy()
    ids = torch.tensor([[*prompt_ids, *out]], device=draft.device)
    hidden = draft.run_layers(draft.embed(ids), draft.new_cache(), 0, draft.num_layers)
    trace = _top2(draft, hidden[:, len(prompt_ids):])
    draft.counts = counts
    return trace


# --- replay and pricing (no model) -----------------------------------------------------------

@dataclass(frozen=True)
class Point:
    strategy: str  # layerskip | layerskip-conf | spec | pld
    k: int
    exit_layer: int = 0
    draft_model: str = ""
    threshold: float = math.nan


def replay_point(point: Point, out: list[int], traces: list[TokenTrace],
                 draft_traces: dict[str, TokenTrace], cfg: DecodingConfig,
                 prompt_ids: Sequence[int] = ()) -> Replay:
    L = len(traces)
    if point.strategy == "pld":
        return replay_pld(prompt_ids, out, point.k, cfg.max_new_tokens, cfg.stop_token_ids)
    if point.strategy == "spec":
        t = draft_traces[point.draft_model]
        return replay(out, t.argmax.tolist(), point.k, cfg.max_new_tokens, cfg.stop_token_ids)
    t = traces[point.exit_layer - 1]
    conf = point.strategy == "layerskip-conf"
    return replay(out, t.argmax.tolist(), point.k, cfg.max_new_tokens, cfg.stop_token_ids,
                  exit_layer=point.exit_layer, num_layers=L,
                  probs=t.prob.tolist() if conf else None,
                  threshold=point.threshold if conf else None)


def min_margin(rep: Replay, drafter: TokenTrace, full: TokenTrace) -> float:
    if not rep.compared:
        return math.nan
    idx = np.asarray(rep.compared)
    return float(min(drafter.margin[idx].min(), full.margin[idx].min()))


def predict_rows(points: Sequence[Point], out: list[int], traces: list[TokenTrace],
                 draft_traces: dict[str, TokenTrace], cfg: DecodingConfig, costs: CostTable,
                 baseline_ms: float, draft_costs: dict[str, CostTable] | None = None,
                 prompt_ids: Sequence[int] = ()) -> list[dict]:
    """Replay and price every point on one example: the prediction columns of its rows
    (spec points with `draft_costs[draft]`, the target's units plus that draft's; pld points
    replay the matcher over `prompt_ids` + out, judged by the full model's trace)."""
    decode_tokens = len(out) - 1
    full = traces[-1]
    mismatches = int(np.sum(full.argmax[:-1] != np.asarray(out[1:]))) if decode_tokens else 0
    ar_ms = 1000 * costs.ar_step()
    rows = []
    for p in points:
        rep = replay_point(p, out, traces, draft_traces, cfg, prompt_ids)
        table = (draft_costs or {}).get(p.draft_model, costs) if p.draft_model else costs
        drafter = (draft_traces[p.draft_model] if p.strategy == "spec" else
                   full if p.strategy == "pld" else traces[p.exit_layer - 1])
        ms = (1000 * table.decode_seconds(rep, p.strategy, p.exit_layer) / decode_tokens
              if decode_tokens else math.nan)
        rows.append({
            "strategy": p.strategy, "exit_layer": p.exit_layer, "draft_model": p.draft_model,
            "num_speculations": p.k, "confidence_threshold": p.threshold,
            "new_tokens": len(out),
            "predicted_acceptance_rate": rep.acceptance_rate,
            "predicted_mean_accepted_len": rep.mean_accepted_len,
            "predicted_rounds": len(rep.rounds), "predicted_accept_hist": rep.accept_hist,
            "predicted_drafted_per_round": [r.drafted for r in rep.rounds],
            "predicted_accepted_per_round": [r.accepted for r in rep.rounds],
            "predicted_deferred_per_round": [r.deferred for r in rep.rounds],
            "predicted_offpath_drafts": rep.offpath,
            "min_margin": min_margin(rep, drafter, full),
            "trace_ar_mismatches": mismatches,
            "baseline_ms_per_token": baseline_ms, "predicted_ar_ms_per_token": ar_ms,
            "predicted_ms_per_token": ms,
            "predicted_speedup": baseline_ms / ms if ms and ms == ms else math.nan,
            "cost_table": json.dumps(dataclasses.asdict(table)),
        })
    return rows


def scan_points(spec: ScanSpec) -> list[Point]:
    points = []
    for k in spec.ks:
        points += [Point("layerskip", k, e) for e in spec.exit_layers]
        points += [Point("layerskip-conf", k, e, threshold=t) for e in spec.exit_layers
                   for t in spec.thresholds]
        points += [Point("spec", k, draft_model=d) for d in spec.drafts]
        points += [Point("pld", k)] if spec.pld else []
    return points


# --- the measured part ------------------------------------------------------------------------

def _ms_per_token(gen: Generation) -> float:
    return 1000 * gen.decode_s / gen.decode_tokens if gen.decode_tokens else math.nan


def fit_step_overhead(costs: CostTable, ar: Generation) -> CostTable:
    """Per-token loop work: what the measured autoregressive decode took beyond its units."""
    if not ar.decode_tokens:
        return costs
    per_step = ar.decode_s / ar.decode_tokens
    return costs.with_overheads(step=max(per_step - costs.ar_step() + costs.step, 0.0))


def fit_round_overhead(costs: CostTable, gen: Generation, rep: Replay,
                       exit_layer: int) -> CostTable:
    """Per-round loop work: what a measured layerskip run took beyond its priced rounds."""
    if not rep.rounds:
        return costs
    base = costs.with_overheads(round=0.0)
    extra = (gen.decode_s - base.decode_seconds(rep, "layerskip", exit_layer)) / len(rep.rounds)
    return costs.with_overheads(round=max(extra, 0.0))


@dataclass(frozen=True)
class ScanResult:
    rows: pd.DataFrame
    traces: pd.DataFrame
    batch: pd.DataFrame | None = None  # `predict_batches`' rows, with --batch-size


# --- the batch curve --------------------------------------------------------------------------

BATCH_POINTS = ("layerskip", "pld")  # priced at batch B: a draft model's units at B are not


def batch_points(spec: ScanSpec) -> list[Point]:
    points = [Point("layerskip", k, e) for k in spec.ks for e in spec.exit_layers]
    return points + ([Point("pld", k) for k in spec.ks] if spec.pld else [])


def _example_traces(trace_rows: pd.DataFrame) -> dict[int, tuple[list[int], list[TokenTrace]]]:
    """Per example index: its output and its exit traces (entry E-1: exit layer E), as the
    scan's trace rows hold them."""
    out = {}
    for i, g in trace_rows[trace_rows["source"] == "exit"].groupby("example_index"):
        g = g.sort_values("exit_layer")
        out[int(i)] = (list(g["output_ids"].iloc[0]), [
            TokenTrace(np.asarray(r["argmax"], dtype=np.int64),
                       np.asarray(r["prob"], dtype=np.float32),
                       np.asarray(r["margin"], dtype=np.float32)) for _, r in g.iterrows()])
    return out


def predict_batches(points: Sequence[Point], examples: dict[int, tuple[list[int], list]],
                    prompts: dict[int, Sequence[int]], tables: dict[int, CostTable],
                    cfg: DecodingConfig, example_ids: dict[int, str] | None = None) -> pd.DataFrame:
    """The batch curve: per batch size B (`tables[B]`: unit costs over B rows), per batch of B
    consecutive examples (the runner's batches), per point, each row's predicted speedup on
    `ar` of the same batch. Under greedy decoding with per-row lengths each row's rounds in a
    batch are exactly its batch-1 rounds, so the replay of each example fixes them; the batch
    prices round i at its costliest row's (`CostTable.batch_decode_seconds`) and runs until its
    slowest row ends. `predicted_batch_speedup` is the batch's: ar's batch time over the
    point's."""
    order = sorted(examples)
    rows = []
    for size, table in sorted(tables.items()):
        for batch_id, start in enumerate(range(0, len(order), size)):
            members = order[start:start + size]
            outs = [examples[i][0] for i in members]
            for p in points:
                reps = [replay_point(p, out, examples[i][1], {}, cfg, prompts[i])
                        for i, out in zip(members, outs, strict=True)]
                ar = table.batch_decode_seconds(reps, "ar")
                mine = table.batch_decode_seconds(reps, p.strategy, p.exit_layer)
                whole = max(ar) / max(mine) if max(mine) > 0 else math.nan
                for i, a, m in zip(members, ar, mine, strict=True):
                    rows.append({"example_index": i,
                                 "example_id": (example_ids or {}).get(i, str(i)),
                                 "batch_size": size, "batch_id": batch_id,
                                 "strategy": p.strategy, "exit_layer": p.exit_layer,
                                 "num_speculations": p.k,
                                 "predicted_speedup": a / m if m > 0 else math.nan,
                                 "predicted_batch_speedup": whole})
    return pd.DataFrame(rows)


def batch_curve(batch: pd.DataFrame) -> pd.DataFrame:
    """Median predicted speedup per (strategy, E, k, B), and per setting the predicted
    crossover: the largest batch size whose median is above 1 (NA when none)."""
    keys = ["strategy", "exit_layer", "num_speculations"]
    curve = (batch.groupby([*keys, "batch_size"], sort=True)["predicted_speedup"].median()
             .reset_index())
    faster = curve[curve["predicted_speedup"] > 1].groupby(keys)["batch_size"].max()
    return curve.assign(predicted_crossover=[
        faster.get(tuple(r), pd.NA) for r in curve[keys].itertuples(index=False, name=None)])


def measure_batch_tables(session: ScanSession, context: list[int], step: float,
                         round_overhead: float) -> dict[int, CostTable]:
    """Unit costs over B rows x 1..K+1 tokens, fitted once per batch size on one context; the
    loop overheads (per token fed, per round) are batch 1's."""
    k = max(session.spec.ks) + 1
    return {b: measure_cost_table(session.model, context, k, batch=b).with_overheads(
        step=step, round=round_overhead) for b in session.spec.batch_sizes}


@dataclass(frozen=True)
class _Measured:
    """One example's measured part: the timed greedy baseline, the traces over its output,
    and unit costs measured at its context (step overhead fitted to that baseline)."""

    ar: Generation
    traces: list[TokenTrace]
    draft_traces: dict[str, TokenTrace]
    context: list[int]
    costs: CostTable


@dataclass
class ScanSession:
    """A scan prepared in one process: data, models loaded once, warmed up. Every unit cost and
    baseline it prices with is measured in this process (`scan_example`)."""

    spec: ScanSpec
    examples: list
    fingerprint: str
    prompts: list
    model: EarlyExitModel
    drafts: dict[str, EarlyExitModel]
    cfg: DecodingConfig
    env: dict
    points: list[Point]
    calib: tuple[int, int]  # (E, k) of the measured layerskip run that fits the round overhead
    round_overhead: float | None = None
    first: _Measured | None = None  # the calibration example's measurement, used once


def validate_scan(spec: ScanSpec) -> None:
    validate(dataclasses.replace(spec.job, runs=(BASELINE, *(
        dataclasses.replace(BASELINE, strategy="spec", draft_model=d) for d in spec.drafts))))


def prepare_scan(spec: ScanSpec, emit: Callable[[ProgressEvent], None] = lambda _e: None
                 ) -> ScanSession:
    """Load the data and the models once and warm up (`job.warmup` short ar and layerskip
    generations on the first prompt)."""
    job = spec.job
    if job.threads:
        torch.set_num_threads(job.threads)
    emit(ProgressEvent("load", 0, 0, f"loading {job.model}"))
    examples, fingerprint = load_examples(job.dataset)
    runs = tuple(dataclasses.replace(BASELINE, strategy="spec", draft_model=d)
                 for d in spec.drafts)
    loaded = load_job_models(dataclasses.replace(job, runs=(BASELINE, *runs)))
    model = loaded.adapter
    prompts = build_prompts(loaded.target.tokenizer, job.dataset, examples,
                            job.max_input_tokens, job.prompt_format, job.n_shot)
    cfg = DecodingConfig(**{**job.decoding.__dict__,
                            "stop_token_ids": stop_token_ids(loaded.target, job.stop_strings)})
    session = ScanSession(
        spec, examples, fingerprint, prompts, model,
        {name: entry[1] for name, entry in loaded.drafts.items()}, cfg,
        environment(model.device, model.dtype), scan_points(spec),
        (spec.exit_layers[len(spec.exit_layers) // 2], min(4, max(spec.ks))))
    warm = DecodingConfig(**{**cfg.__dict__, "max_new_tokens": min(cfg.max_new_tokens, 16)})
    calib_e, calib_k = session.calib
    for _ in range(max(job.warmup, 1)):  # at least once: a compiled engine compiles here
        emit(ProgressEvent("warmup", 0, len(examples), "ar"))
        _generate(session, "ar", prompts[0].ids, warm)
        _generate(session, "layerskip", prompts[0].ids, warm, k=calib_k, exit_layer=calib_e)
    return session


def _generate(session: ScanSession, strategy: str, prompt: list[int], cfg: DecodingConfig,
              **kwargs) -> Generation:
    """A measured generation of the scan, with the engine (compiled or eager) of its job."""
    compiled = session.spec.job.compiled
    return engine_generate(strategy, session.model, prompt, cfg, compiled=compiled,
                           compiles=compiled, **kwargs)


def _measure(session: ScanSession, i: int) -> _Measured:
    model, prompt, cfg = session.model, session.prompts[i], session.cfg
    ar = _generate(session, "ar", prompt.ids, cfg)
    out = ar.tokens
    traces = exit_traces(model, prompt.ids, out)
    d_traces = {name: draft_trace(d, prompt.ids, out) for name, d in session.drafts.items()}
    context = [*prompt.ids, *out[: len(out) // 2]]
    costs = fit_step_overhead(measure_cost_table(model, context, max(session.spec.ks) + 1), ar)
    return _Measured(ar, traces, d_traces, context, costs)


def calibrate_scan(session: ScanSession) -> None:
    """Fit the per-round loop overhead once per process, from one measured layerskip run on the
    first example (whatever example this process scans first, so that every process prices
    with an overhead fitted on the same prompt). The first example's measurement is kept for
    its own rows."""
    if session.round_overhead is not None:
        return
    first = _measure(session, 0)
    calib_e, calib_k = session.calib
    gen = _generate(session, "layerskip", session.prompts[0].ids, session.cfg, k=calib_k,
                    exit_layer=calib_e)
    rep = replay_point(Point("layerskip", calib_k, calib_e), first.ar.tokens, first.traces,
                       first.draft_traces, session.cfg)
    session.round_overhead = fit_round_overhead(first.costs, gen, rep, calib_e).round
    session.first = first


def scan_example(session: ScanSession, i: int) -> tuple[list[dict], list[dict]]:
    """Example i's scan rows and trace rows: its own timed baseline and teacher-forced pass,
    priced with unit costs measured in this process."""
    calibrate_scan(session)
    if i == 0 and session.first is not None:
        measured, session.first = session.first, None
    else:
        measured = _measure(session, i)
    job, cfg, model = session.spec.job, session.cfg, session.model
    ex, prompt, out = session.examples[i], session.prompts[i], measured.ar.tokens
    costs = measured.costs.with_overheads(round=session.round_overhead)
    draft_costs = {name: with_draft_costs(costs, d, measured.context)
                   for name, d in session.drafts.items()}
    identity = {"scan_name": job.name, "model": job.model,
                "model_num_layers": model.num_layers, "dataset": job.dataset.name,
                "dataset_fingerprint": session.fingerprint, "example_id": ex.example_id,
                "example_index": i, "max_new_tokens": cfg.max_new_tokens,
                "prompt_tokens": len(prompt.ids), "compiled": job.compiled}
    stamp = {**session.env, "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(
        timespec="seconds")}
    rows = [{**identity, **row, **stamp} for row in predict_rows(
        session.points, out, measured.traces, measured.draft_traces, cfg, costs,
        _ms_per_token(measured.ar), draft_costs, prompt.ids)]
    common = {**identity, "stop_token_ids": list(cfg.stop_token_ids), "output_ids": out}
    trace_rows = [{**common, "source": "exit", "exit_layer": e, "draft_model": "",
                   **_trace_lists(t)} for e, t in enumerate(measured.traces, start=1)]
    trace_rows += [{**common, "source": "draft", "exit_layer": 0, "draft_model": name,
                    **_trace_lists(t)} for name, t in measured.draft_traces.items()]
    return rows, trace_rows


def scan_result(rows: list[dict], trace_rows: list[dict]) -> ScanResult:
    return ScanResult(_frame(rows, SCAN_COLUMNS), _frame(trace_rows, TRACE_COLUMNS))


def run_scan(spec: ScanSpec, on_progress: Callable[[ProgressEvent], None] | None = None,
             ) -> ScanResult:
    emit = on_progress or (lambda _e: None)
    validate_scan(spec)
    session = prepare_scan(spec, emit)
    rows, trace_rows = [], []
    n = len(session.examples)
    for i in range(n):
        emit(ProgressEvent("measure", i, n, f"example {i + 1}/{n}"))
        r, t = scan_example(session, i)
        rows += r
        trace_rows += t
        emit(ProgressEvent("measure", i + 1, n, f"example {i + 1}/{n}"))
    result = scan_result(rows, trace_rows)
    if spec.batch_sizes == (1,):
        return result
    emit(ProgressEvent("measure", n, n, "unit costs at batch sizes "
                       + ",".join(map(str, spec.batch_sizes))))
    first = json.loads(result.rows["cost_table"].iloc[0])
    out0 = list(result.traces["output_ids"].iloc[0])
    context = [*session.prompts[0].ids, *out0[: len(out0) // 2]]
    tables = measure_batch_tables(session, context, first["step"], first["round"])
    batch = predict_batches(batch_points(spec), _example_traces(result.traces),
                            {i: p.ids for i, p in enumerate(session.prompts)}, tables,
                            session.cfg,
                            {i: ex.example_id for i, ex in enumerate(session.examples)})
    return dataclasses.replace(result, batch=batch)


def _trace_lists(t: TokenTrace) -> dict:
    return {"argmax": t.argmax.tolist(), "prob": t.prob.tolist(), "margin": t.margin.tolist()}


def _frame(rows: list[dict], columns) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=[name for name, _, _ in columns])


# --- files ------------------------------------------------------------------------------------

def trace_path(path: str | Path) -> Path:
    """The sibling trace file of a scan file: x.scan.parquet -> x.scan.trace.parquet."""
    p = Path(path)
    return p.with_name(p.name[: -len(".parquet")] + ".trace.parquet"
                       if p.name.endswith(".parquet") else p.name + ".trace.parquet")


def write_frame(df: pd.DataFrame, columns, path: str | Path) -> None:
    """Atomic: a temp file next to the target, renamed over it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pandas(df, schema=arrow_schema(columns), preserve_index=False)
    meta = {SCAN_METADATA_KEY: json.dumps({"schema_version": SCAN_SCHEMA_VERSION}).encode()}
    table = table.replace_schema_metadata(meta)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_scan(result: ScanResult, path: str | Path) -> tuple[Path, Path]:
    path = Path(path)
    write_frame(result.traces, TRACE_COLUMNS, trace_path(path))
    write_frame(result.rows, SCAN_COLUMNS, path)
    return path, trace_path(path)



def verify_job(spec: ScanSpec, points: pd.DataFrame) -> JobSpec:
    """The ordinary sweep job that times `points` (rows of `scan_report.top_points`): same
    model, examples, decoding and device as the scan, baseline first."""
    from lsbench.scenario.jobs import RunSpec

    runs = [RunSpec(str(p["strategy"]), int(p["exit_layer"]), int(p["num_speculations"]),
                    str(p["draft_model"])) for _, p in points.iterrows()]
    runs = [BASELINE, *dict.fromkeys(runs)]
    # With --batch-size: the points the batched engine decodes at every batch size (each size
    # with its own ar), the others at batch 1.
    sizes = list(spec.batch_sizes)
    ones = [r for r in runs if r.strategy not in BATCHED_STRATEGIES] if sizes != [1] else []
    return dataclasses.replace(spec.job, runs=tuple(
        batched([r for r in runs if r not in ones], sizes) + ones))
