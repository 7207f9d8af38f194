"""Runs a JobSpec: loads models once, warms up, then measures unit by unit. A unit is one
batch (`Batch`: B consecutive examples decoded together; at batch size 1 one example) with
all its runs at that batch size for one repeat, in an order shuffled per unit with the job's
seed (baselines included), so that position effects (cache warmth, thermal drift) favour no
run. Every speedup is taken against a baseline of the same engine at the same batch size
measured in the same process on the same device, row by row on the same batch composition:
`ar` for lsbench's loops, `hf-ar` for transformers' references. A unit's rows are stored
atomically once the unit is measured: a batch is stored whole or not at all. Never prints:
progress goes to a callback.

The interface a launcher builds on: `prepare_job`, `warm_up`, `pending_units`, `measure_unit`;
`run_job` is the single-process entry point built from them."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import math
import platform
import socket
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import transformers

from lsbench import __version__
from lsbench.backend.early_exit import EarlyExitModel
from lsbench.backend.kv_cache import capacity_for
from lsbench.backend.loading import LoadedModel, load_model, locate_model
from lsbench.engine.batch import BATCHED_STRATEGIES, BatchGeneration, generate_batch
from lsbench.engine.generation import DecodingConfig, Generation
from lsbench.engine.hf_reference import generate_hf_batch
from lsbench.engine.strategies import LOSSY, generate
from lsbench.errors import LsbenchError, one_line
from lsbench.results.schema import SCHEMA_VERSION
from lsbench.results.store import ResultStore
from lsbench.scenario.accounting import (
    FlopModel,
    WeightModel,
    batch_costs,
    batch_memory_bytes,
    generation_cost,
    peak_gbps,
    peak_gflops,
    peak_memory_delta,
    start_memory_window,
    weight_bytes,
)
from lsbench.scenario.costs import calibrate
from lsbench.scenario.data import (
    Example,
    Prompt,
    build_prompts,
    check_dataset,
    cut_at_stop,
    load_examples,
    stop_string_ids,
)
from lsbench.scenario.jobs import JobSpec, RunSpec, baseline_of, is_baseline
from lsbench.scenario.latency import latency_columns
from lsbench.scenario.quality import (
    first_mismatch,
    float32_copy_on_cpu,
    logit_gap,
    lossless_verdict,
    quality_columns,
    teacher_forced_logits,
)

WARMUP_TOKENS = 16  # warm-up generations are short: they only need every kernel shape once
# What must be equal for two rows to be compared (beyond the run id: model, data, decoding,
# dtype, device). Resume refuses a file whose rows of this job differ in any of them.
ENV_KEYS = ("threads", "lsbench_version", "git_commit", "torch_version", "transformers_version",
            "device_name", "draft_revision")


@dataclass(frozen=True)
class ProgressEvent:
    phase: str  # "load" | "warmup" | "measure"
    done: int  # generations finished (measured or already stored)
    total: int
    detail: str


@dataclass(frozen=True)
class JobOutcome:
    measured: int
    skipped: int  # already in the results file


def validate(job: JobSpec) -> None:
    """Cheap checks before anything heavy: the dataset and every model reference exist.
    (Exit layers were checked against the layer count when the JobSpec was built.)"""
    check_dataset(job.dataset.name)
    for ref in {job.model, *(r.draft_model for r in job.runs if r.draft_model)}:
        locate_model(ref)


@dataclass
class _Loaded:
    target: LoadedModel
    adapter: EarlyExitModel
    flop_model: FlopModel
    drafts: dict[str, tuple[LoadedModel, EarlyExitModel, FlopModel]]
    weights: dict[str, WeightModel] = field(default_factory=dict)  # "" is the target
    peak_gbps: float = math.nan  # the device's copy bandwidth, measured once per process
    peak_gflops: float = math.nan  # its matmul rate in the weights' dtype, measured likewise


def load_job_models(job: JobSpec, device_map: str | None = None) -> _Loaded:
    """The target and every draft model of `job`, each with its adapter, FLOP and weight
    models, and the device's copy bandwidth: what one process measures with."""
    target = load_model(job.model, dtype=job.dtype, device=job.device, revision=job.revision,
                        device_map=device_map)
    drafts = {}
    # A map file names the target's modules; a draft is then placed by accelerate ("auto").
    draft_map = device_map if device_map in (None, "auto", "balanced") else "auto"
    for name in sorted({r.draft_model for r in job.runs if r.draft_model}):
        draft = load_model(name, dtype=job.dtype, device=job.device, device_map=draft_map)
        if draft.tokenizer.get_vocab() != target.tokenizer.get_vocab():
            raise LsbenchError(f"draft model '{name}' uses another tokenizer than '{job.model}'; "
                               "speculative decoding needs the same vocabulary")
        flops = FlopModel.from_config(draft.model.config)
        # One tokenizer, however many LM-head rows each model pads to.
        drafts[name] = (draft, EarlyExitModel(draft.model, len(draft.tokenizer)), flops)
    adapter = EarlyExitModel(target.model, len(target.tokenizer))
    weights = {"": WeightModel.from_model(adapter),
               **{name: WeightModel.from_model(d[1]) for name, d in drafts.items()}}
    return _Loaded(target, adapter, FlopModel.from_config(target.model.config), drafts, weights,
                   peak_gbps(str(adapter.device)),
                   peak_gflops(str(adapter.device), adapter.dtype))


def stop_token_ids(loaded: LoadedModel, stop_strings: Iterable[str] = ()) -> tuple[int, ...]:
    """EOS ids of the model and its tokenizer, then the stop strings that are one token."""
    ids: list[int] = []
    for value in (getattr(loaded.model.generation_config, "eos_token_id", None),
                  loaded.tokenizer.eos_token_id):
        ids += value if isinstance(value, list) else [value] if value is not None else []
    return tuple(dict.fromkeys([*ids, *stop_string_ids(loaded.tokenizer, list(stop_strings))]))


def environment(device: torch.device, dtype: torch.dtype) -> dict:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = _cpu_name() or platform.processor() or platform.machine()
    return {"lsbench_version": __version__, "git_commit": _git_commit(),
            "torch_version": torch.__version__, "transformers_version": transformers.__version__,
            "device": str(device), "device_name": name, "dtype": str(dtype).replace("torch.", ""),
            "threads": torch.get_num_threads(), "host": socket.gethostname(), "worker": ""}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


# Where torch.compile's failures come from: dynamo (tracing, guards, the backend call, e.g.
# BackendCompilerFailed) and inductor (lowering, its C++/Triton compilers, e.g. CppCompileError).
COMPILE_ERROR_MODULES = ("torch._dynamo", "torch._inductor")


def is_compile_failure(exc: BaseException) -> bool:
    """Whether `exc`, or an exception it was raised from, is torch.compile's."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if type(current).__module__.startswith(COMPILE_ERROR_MODULES):
            return True
        current = current.__cause__ or current.__context__
    return False


def engine_generate(strategy: str, model: EarlyExitModel, prompt: list[int], cfg: DecodingConfig,
                    *, compiled: bool = False, compiles: bool = False, **kwargs) -> Generation:
    """`generate()`; where the run compiles (`compiles`: lsbench's compiled engine, `compiled`
    passed on, or hf-ar-compiled), a compilation failure becomes one line naming --no-compile
    instead of a traceback (rows already stored stay: the runner stores whole units)."""
    if not compiles:
        return generate(strategy, model, prompt, cfg, compiled=compiled, **kwargs)
    try:
        return generate(strategy, model, prompt, cfg, compiled=compiled, **kwargs)
    except Exception as exc:
        if isinstance(exc, LsbenchError) or not is_compile_failure(exc):
            raise
        raise LsbenchError(f"compiling {strategy} failed ({type(exc).__name__}: "
                           f"{one_line(exc, 200)}); rerun with --no-compile to measure the "
                           "eager engine") from None


def _generate(prepared: PreparedJob, run: RunSpec, prompt: list[int], cfg: DecodingConfig
              ) -> Generation:
    job, loaded = prepared.job, prepared.loaded
    draft = loaded.drafts[run.draft_model][1] if run.draft_model else None
    return engine_generate(run.strategy, loaded.adapter, prompt, cfg,
                           compiled=job.engine_compiled(run), compiles=job.compiles(run),
                           k=run.num_speculations or 4, exit_layer=run.exit_layer or None,
                           draft=draft)


def _generate_batch(prepared: PreparedJob, run: RunSpec, prompts: list[list[int]],
                    cfg: DecodingConfig) -> BatchGeneration:
    """One batch of one run. Batch size 1 keeps the batch-1 engine (`generate`), so its rows
    are exactly what they were before batching existed."""
    loaded = prepared.loaded
    if run.batch_size == 1:
        gens = [_generate(prepared, run, p, cfg) for p in prompts]
        return BatchGeneration(gens, sum(g.prefill_s for g in gens),
                               sum(g.decode_s for g in gens))
    if run.strategy == "hf-ar":
        return generate_hf_batch(loaded.adapter, prompts, cfg)
    if run.strategy not in BATCHED_STRATEGIES:  # jobs.batched refuses these earlier
        raise LsbenchError(f"{run.strategy} cannot run at batch size {run.batch_size}: "
                           "transformers' assisted generation is batch 1 only")
    draft = loaded.drafts[run.draft_model][1] if run.draft_model else None
    return generate_batch(run.strategy, loaded.adapter, prompts, cfg,
                          k=run.num_speculations or 4, exit_layer=run.exit_layer or None,
                          draft=draft, compiled=prepared.job.engine_compiled(run))


@dataclass(frozen=True)
class Batch:
    """B consecutive examples of the selection decoded together. Batch ids count per batch
    size from 0; at batch size 1 the batch id is the example index. The last batch of a
    size holds what is left (fewer than B examples when B does not divide the selection)."""

    size: int
    batch_id: int
    examples: tuple[int, ...]  # example indices


def job_batches(job: JobSpec, num_examples: int) -> list[Batch]:
    """Every batch of the job: batch size by batch size (ascending), batch id by batch id."""
    sizes = sorted({r.batch_size for r in job.runs})
    return [Batch(b, j, tuple(range(start, min(start + b, num_examples))))
            for b in sizes for j, start in enumerate(range(0, num_examples, b))]


def _as_batch(unit: Batch | int) -> Batch:
    return unit if isinstance(unit, Batch) else Batch(1, unit, (unit,))


def batch_runs(job: JobSpec, size: int) -> list[RunSpec]:
    return [r for r in job.runs if r.batch_size == size]


# --- the agreed runner interface (one process measures whole units) -------------------------

@dataclass
class PreparedJob:
    """Everything a process needs to measure units of a job."""

    job: JobSpec
    examples: list[Example]
    prompts: list[Prompt]
    fingerprint: str
    cfg: DecodingConfig  # job.decoding + stop tokens
    env: dict  # environment(...) metadata of THIS process
    loaded: _Loaded  # target (+ drafts) loaded once
    # Per compiling run: wall seconds of its first warm-up generation here (see warm_up).
    compile_s: dict[RunSpec, float] = field(default_factory=dict)


def prepare_job(job: JobSpec, *, device_map: str | None = None) -> PreparedJob:
    """Load the data and the models once; with `device_map` the models spread over devices."""
    if job.threads:
        torch.set_num_threads(job.threads)
    examples, fingerprint = load_examples(job.dataset)
    loaded = load_job_models(job, device_map)
    tokenizer = loaded.target.tokenizer
    prompts = build_prompts(tokenizer, job.dataset, examples, job.max_input_tokens,
                            job.prompt_format, job.n_shot)
    cfg = DecodingConfig(**{**job.decoding.__dict__,
                            "stop_token_ids": stop_token_ids(loaded.target, job.stop_strings)})
    env = {**environment(loaded.adapter.device, loaded.adapter.dtype),
           "device_map": device_map or ""}
    return PreparedJob(job, examples, prompts, fingerprint, cfg, env, loaded)


CALIBRATED = ("layerskip", "spec", "pld")  # lsbench's speculative loops


def check_batches_fit(prepared: PreparedJob, runs: Iterable[RunSpec],
                      free_bytes: int | None = None) -> None:
    """Refuse in one line, before anything runs, a batch size whose KV caches and activations
    (`accounting.batch_memory_bytes`, the target's and a draft model's) exceed the device's
    free memory. `free_bytes`: the free memory (default: CUDA's own count; off CUDA nothing
    is checked, host memory being the operating system's to give)."""
    adapter = prepared.loaded.adapter
    if free_bytes is None:
        if adapter.device.type != "cuda":
            return
        free_bytes = torch.cuda.mem_get_info(adapter.device)[0]
    longest = max(len(p.ids) for p in prepared.prompts)
    need: dict[int, int] = {}
    for run in runs:
        k = (run.num_speculations or 4) if run.strategy in CALIBRATED else 0  # as decoded
        capacity = capacity_for(longest, prepared.cfg.max_new_tokens, k)
        models = [adapter]
        if run.strategy == "spec" and run.draft_model in prepared.loaded.drafts:
            models.append(prepared.loaded.drafts[run.draft_model][1])
        size = run.batch_size
        need[size] = max(need.get(size, 0), sum(
            batch_memory_bytes(m, size, capacity, max(longest, k + 1)) for m in models))
    too_big = sorted(b for b, n in need.items() if n > free_bytes)
    if too_big:
        fits = [b for b in need if b not in too_big]
        gb = 1e9
        raise LsbenchError(
            f"batch size {too_big[0]} does not fit on {adapter.device}: its KV cache and "
            f"activations need about {need[too_big[0]] / gb:.1f} GB, {free_bytes / gb:.1f} GB "
            "is free; choose a smaller --batch-size"
            + (f" (the largest that fits here: {max(fits)})" if fits else ""))


@contextlib.contextmanager
def out_of_memory_is_one_line(batch_size: int) -> Iterator[None]:
    """A device out-of-memory error becomes one error line naming the batch size (the
    estimate of `check_batches_fit` let it through); rows already stored stay."""
    try:
        yield
    except torch.OutOfMemoryError as e:
        first = (str(e).strip().splitlines() or [""])[0][:160]
        raise LsbenchError(f"out of memory at batch size {batch_size} ({first}); choose a "
                           "smaller --batch-size") from None


def warm_up(prepared: PreparedJob, runs: Iterable[RunSpec], *,
            on_run: Callable[[RunSpec], None] | None = None) -> None:
    """`job.warmup` short, unmeasured generations of every run before any timing. Off the
    CPU it first calibrates the speculative engine at each k (`costs.calibrate`: the verify
    head's shape and the deferral from measured unit costs); on the CPU the engine keeps its
    default policy (lazy head, E/L deferral), which is what the CPU's costs favour.

    A run that compiles (`JobSpec.compiles`) warms up at least once whatever `job.warmup`
    says, so that compilation and graph capture never fall inside a timed run; the wall time
    of its first warm-up generation is its `compile_s` (compiling, capturing and one short
    generation; little for a run whose graphs an earlier run of the process compiled)."""
    cfg, runs = prepared.cfg, list(runs)
    check_batches_fit(prepared, runs)
    adapter = prepared.loaded.adapter
    if adapter.device.type != "cpu":
        for k in sorted({r.num_speculations or 4 for r in runs if r.strategy in CALIBRATED}):
            calibrate(adapter, k, prepared.prompts[0].ids)
    warm_cfg = DecodingConfig(**{**cfg.__dict__,
                                 "max_new_tokens": min(cfg.max_new_tokens, WARMUP_TOKENS)})
    job = prepared.job
    for run in dict.fromkeys(runs):
        compiles = job.compiles(run)
        # A batched run warms up on a whole batch: its kernels see the batch's shapes.
        prompts = [p.ids for p in prepared.prompts[:run.batch_size]]
        for i in range(max(job.warmup, 1) if compiles else job.warmup):
            if on_run is not None:
                on_run(run)
            t0 = time.perf_counter()
            with out_of_memory_is_one_line(run.batch_size):
                if run.batch_size == 1:
                    _generate(prepared, run, prompts[0], warm_cfg)
                else:
                    _generate_batch(prepared, run, prompts, warm_cfg)
            if compiles and i == 0:
                prepared.compile_s[run] = time.perf_counter() - t0


def pending_units(job: JobSpec, example_ids: list[str], done: set[tuple[str, str, int]]
                  ) -> list[tuple[Batch, int]]:
    """(batch, repeat) of every unit with a row not stored yet: repeat-major, then batch size
    ascending (batch-1 outputs exist before the larger batches compare with them)."""
    units = []
    for rep in range(job.repeats):
        for batch in job_batches(job, len(example_ids)):
            run_ids = [job.run_id(r) for r in batch_runs(job, batch.size)]
            if any((rid, example_ids[i], rep) not in done for rid in run_ids
                   for i in batch.examples):
                units.append((batch, rep))
    return units


def unit_order(job: JobSpec, unit: Batch | int, repeat: int) -> list[RunSpec]:
    """All runs of a unit at its batch size, baselines included, in an order shuffled by a
    generator seeded with (job seed, example index, repeat) at batch size 1, (job seed, batch
    id, repeat, batch size) above: reproducible, and no run always goes first."""
    batch = _as_batch(unit)
    runs = batch_runs(job, batch.size)
    seed = [job.decoding.seed, batch.batch_id, repeat] + [batch.size] * (batch.size != 1)
    rng = np.random.default_rng(seed)
    return [runs[i] for i in rng.permutation(len(runs))]


def measure_unit(prepared: PreparedJob, unit: Batch | int, repeat: int,
                 done: set[tuple[str, str, int]], stored_baselines: dict,
                 on_run: Callable[[RunSpec], None] | None = None) -> Iterator[dict]:
    """Measure every pending run of one (batch, repeat) in the unit's shuffled order, each
    over the whole batch, then yield one row per (run, example). `unit` is a `Batch` or, at
    batch size 1, an example index. Rows are yielded once the whole unit is measured: the
    baselines that speedup and losslessness are taken against must exist first (a kill loses
    at most the unit in flight, never part of a batch). A baseline already stored
    (`stored_baselines`, keyed by (run_id, example_id, repeat)) is used only when it was
    measured in this environment on the same batch composition.

    Rows of a baseline at batch size B > 1 (speedup 1 on themselves) take their losslessness
    columns against the batch-1 baseline of the same example and repeat where one is stored or
    was measured earlier in this process: batching changes kernels and may flip near-ties."""
    job, loaded = prepared.job, prepared.loaded
    batch = _as_batch(unit)
    ids = [prepared.examples[i].example_id for i in batch.examples]
    prompts = [prepared.prompts[i].ids for i in batch.examples]
    order = unit_order(job, batch, repeat)
    measured: dict[RunSpec, tuple[int, BatchGeneration, int | None]] = {}
    for position, run in enumerate(order):
        rid = job.run_id(run)
        if all((rid, ex, repeat) in done for ex in ids):
            continue
        before = start_memory_window(loaded.adapter.device)
        bgen = _generate_batch(prepared, run, prompts, prepared.cfg)
        measured[run] = (position, bgen, peak_memory_delta(loaded.adapter.device, before))
        if on_run is not None:
            on_run(run)

    def baseline(base: RunSpec, row: int) -> dict | None:
        if base in measured:
            gen = measured[base][1].rows[row]
            return {"ms_per_token": _ms_per_token(gen), "output_ids": gen.tokens}
        stored = stored_baselines.get((job.run_id(base), ids[row], repeat))
        same_batch = base.batch_size == 1 or (stored is not None and (
            stored.get("batch_id") == batch.batch_id
            and stored.get("batch_examples") == frozenset(ids)))
        if stored is not None and same_batch and _same_environment(stored, prepared.env):
            return stored
        return None

    for run, (position, bgen, mem_delta) in measured.items():
        rid = job.run_id(run)
        costs = _batch_costs(loaded, run, bgen)
        for j, gen in enumerate(bgen.rows):
            if (rid, ids[j], repeat) in done:
                # Stored from a batch of another composition (a raised --limit grew the last
                # batch): kept as it was, never duplicated.
                continue
            base = baseline(baseline_of(run), j)
            reference = base
            if is_baseline(run) and run.batch_size != 1:
                reference = baseline(dataclasses.replace(run, batch_size=1), j)
            yield _row(prepared, run, batch.examples[j], repeat, position, gen, mem_delta,
                       base, reference=reference, batch=(batch, bgen), cost=costs[j])


def stored_baselines(job: JobSpec, df: pd.DataFrame) -> dict[tuple[str, str, int], dict]:
    """Baseline rows of this job already in the results file (resume), with their environment
    and their batch (id and examples); batch-1 baselines also for jobs that measure only
    larger batches (the losslessness reference of a batched baseline)."""
    runs = [r for r in job.runs if is_baseline(r)]
    ids = {job.run_id(r) for r in runs} | {
        job.run_id(dataclasses.replace(r, batch_size=1)) for r in runs}
    return baseline_entries(df[df.run_id.isin(ids)].to_dict("records"))


def baseline_entries(rows: list[dict]) -> dict[tuple[str, str, int], dict]:
    """What a later unit needs of baseline rows: keyed by (run_id, example_id, repeat)."""
    members: dict[tuple, set] = {}
    for r in rows:
        members.setdefault((r["run_id"], r.get("batch_id"), int(r["repeat"])),
                           set()).add(r["example_id"])
    return {(r["run_id"], r["example_id"], int(r["repeat"])):
            {"ms_per_token": r["ms_per_token"], "output_ids": list(r["output_ids"]),
             "batch_id": r.get("batch_id"),
             "batch_examples": frozenset(members[(r["run_id"], r.get("batch_id"),
                                                  int(r["repeat"]))]),
             **{k: r.get(k) for k in ENV_KEYS}}
            for r in rows if r.get("is_baseline", True)}


def check_resume_environment(job: JobSpec, df: pd.DataFrame, prepared: PreparedJob,
                             path: object) -> None:
    """Refuse, in one line, to add rows to runs stored under another environment."""
    check_stored_environment(df, expected_environments(job, prepared), path)


def expected_environments(job: JobSpec, prepared: PreparedJob) -> dict[str, dict]:
    """Per run id of `job`: the ENV_KEYS values of the rows this process measures."""
    return {job.run_id(r): {**{k: prepared.env[k] for k in ENV_KEYS if k in prepared.env},
                            "draft_revision": _draft_revision(prepared.loaded, r)}
            for r in job.runs}


def check_stored_environment(df: pd.DataFrame, expected: dict[str, dict], path: object) -> None:
    """check_resume_environment against `expected_environments` (of any process)."""
    for row in df[df.run_id.isin(expected)].to_dict("records"):
        for key in ENV_KEYS:
            want = expected[row["run_id"]][key]
            if _norm(row.get(key)) != _norm(want):
                raise LsbenchError(
                    f"results file {path} holds rows of this job measured with {key} "
                    f"{row.get(key)!r}, this process has {want!r}; rows from two "
                    "environments are never compared: rerun with --force to measure them "
                    "again, or choose another --out")


def _norm(value: object) -> object:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return int(value) if isinstance(value, (int, np.integer)) else str(value)


def _same_environment(stored: dict, env: dict) -> bool:
    return all(_norm(stored.get(k)) == _norm(env[k]) for k in ENV_KEYS if k in env)


def _draft_revision(loaded: _Loaded, run: RunSpec) -> str:
    return (loaded.drafts[run.draft_model][0].revision or "") if run.draft_model else ""


def shard_examples(num_examples: int, shard: tuple[int, int] | None) -> list[int]:
    """The example indices of shard (i, n), 1-based: every n-th example, starting at i-1."""
    if shard is None:
        return list(range(num_examples))
    index, count = shard
    return list(range(index - 1, num_examples, count))


def shard_batches(batches: list[Batch], shard: tuple[int, int] | None) -> list[Batch]:
    """The batches of shard (i, n), 1-based: of every batch size, every n-th batch starting at
    i-1; at batch size 1 exactly `shard_examples`. A batch is never split over shards."""
    if shard is None:
        return list(batches)
    index, count = shard
    return [b for b in batches if b.batch_id % count == index - 1]


def check_resumable(store: ResultStore) -> None:
    """Refuse, in one line, to add rows to a file of an older schema version."""
    if store.schema_version < SCHEMA_VERSION:
        raise LsbenchError(f"results file {store.path} was written with schema version "
                           f"{store.schema_version}, this lsbench writes {SCHEMA_VERSION}; "
                           "resuming would mix the two: rerun with --force (rewrites the file "
                           f"as version {SCHEMA_VERSION}) or choose another --out")


def begin_job(job: JobSpec, store: ResultStore, force: bool) -> None:
    """Under the store's lock, before a job measures anything: --force drops the job's runs,
    otherwise a file of an older schema is refused; then the parts of an interrupted job are
    folded into the file (resume)."""
    if force:
        store.drop_runs({job.run_id(r) for r in job.runs})
    else:
        check_resumable(store)
    store.compact()


def run_job(job: JobSpec, store: ResultStore, *, force: bool = False,
            on_progress: Callable[[ProgressEvent], None] | None = None,
            shard: tuple[int, int] | None = None, device_map: str | None = None
            ) -> JobOutcome:
    """Measure every (repeat, example, run) not already in `store`, unit by unit, in this
    process; with `shard` (i, n) only the examples of that shard, with `device_map` the
    models spread over devices. Holds the store's writer lock throughout."""
    emit = on_progress or (lambda _event: None)
    validate(job)
    with store.locked():
        begin_job(job, store, force)
        emit(ProgressEvent("load", 0, 0, f"loading {job.model}"))
        prepared = prepare_job(job, device_map=device_map)
        rows = store.rows()
        if not force:
            check_resume_environment(job, rows, prepared, store.path)

        done_keys = store.completed_keys()
        example_ids = [ex.example_id for ex in prepared.examples]
        selected = shard_batches(job_batches(job, len(example_ids)), shard)
        units = [u for u in pending_units(job, example_ids, done_keys) if u[0] in selected]
        total = job.repeats * sum(len(b.examples) * len(batch_runs(job, b.size))
                                  for b in selected)
        pending = [(rep, example_ids[i], run) for batch, rep in units for i in batch.examples
                   for run in batch_runs(job, batch.size)
                   if (job.run_id(run), example_ids[i], rep) not in done_keys]
        done = total - len(pending)

        # Warm-up: every pending configuration runs a few short generations before any timing.
        warm_up(prepared, [p[2] for p in pending],
                on_run=lambda run: emit(ProgressEvent("warmup", done, total, run.label)))

        baselines = stored_baselines(job, rows)
        for batch, rep in units:
            what = (f"example {batch.batch_id + 1}/{len(example_ids)}" if batch.size == 1 else
                    f"batch {batch.batch_id + 1} of {batch.size} examples") + f", repeat {rep + 1}"

            def measured(run: RunSpec, what: str = what, rows: int = len(batch.examples)
                         ) -> None:
                nonlocal done
                done += rows
                emit(ProgressEvent("measure", done, total, f"{run.label} · {what}"))

            emit(ProgressEvent("measure", done, total, what))
            with out_of_memory_is_one_line(batch.size):
                new = list(measure_unit(prepared, batch, rep, done_keys, baselines,
                                        on_run=measured))
            store.append(new)
            baselines.update(baseline_entries(new))  # batch-1 references of later batches
        store.compact()
    emit(ProgressEvent("done", done, total, "done"))
    return JobOutcome(len(pending), total - len(pending))


def _rounds_without_draft(gen: Generation, decoding: DecodingConfig) -> int:
    """Rounds whose drafter could propose but proposed nothing (pld without a match). A round
    that starts one token short of max_new_tokens has no budget to draft: it can only be the
    last, it emits that one token, and it is not counted."""
    no_budget = bool(gen.drafted) and gen.drafted[-1] == 0 \
        and len(gen.tokens) == decoding.max_new_tokens
    return gen.drafted.count(0) - no_budget


def _ms_per_token(gen: Generation) -> float:
    return 1000 * gen.decode_s / gen.decode_tokens if gen.decode_tokens else math.nan


def _float32_logits(model: torch.nn.Module, prompt: Prompt, base_ids: list[int], pos: int
                    ) -> torch.Tensor:
    """The target's logits at `pos` in float32 (or wider). A narrower target is copied to
    float32 on the CPU for this one forward and freed after it: the device never holds a
    second model, and host memory goes back to what it was after each verdict (the copy is
    redone per mismatched greedy row, outside every timer)."""
    if torch.finfo(next(model.parameters()).dtype).bits >= 32:
        return teacher_forced_logits(model, prompt.ids, base_ids, pos)
    # Nothing keeps the copy: it is freed when the forward returns.
    return teacher_forced_logits(float32_copy_on_cpu(model), prompt.ids, base_ids, pos)


def _losslessness(prepared: PreparedJob, prompt: Prompt, tokens: list[int],
                  base_ids: list[int] | None) -> dict:
    """first_mismatch, mismatch_margin and lossless_verdict against the baseline's output."""
    if base_ids is None:
        return {"first_mismatch": None, "mismatch_margin": math.nan, "lossless_verdict": None}
    pos = first_mismatch(tokens, base_ids)
    margin = math.nan
    verdict = "exact" if pos < 0 else None
    if pos >= 0 and not prepared.job.decoding.do_sample:  # sampled outputs differ by design
        logits = _float32_logits(prepared.loaded.target.model, prompt, base_ids, pos)
        margin, scale = logit_gap(logits, base_ids[pos] if pos < len(base_ids) else None,
                                  tokens[pos] if pos < len(tokens) else None)
        verdict = lossless_verdict(margin, scale, prepared.loaded.adapter.dtype)
    return {"first_mismatch": pos, "mismatch_margin": margin, "lossless_verdict": verdict}


def _cost(loaded: _Loaded, run: RunSpec, gen: Generation) -> dict[str, float]:
    draft = loaded.drafts[run.draft_model] if run.draft_model else None
    draft_cost = (draft[2], loaded.weights[run.draft_model]) if draft else None
    return generation_cost(gen, (loaded.flop_model, loaded.weights[""]), draft_cost,
                           loaded.peak_gbps)


def _batch_costs(loaded: _Loaded, run: RunSpec, bgen: BatchGeneration) -> list[dict]:
    """Each row's cost columns with the batch dimension (`accounting.batch_costs`); a
    batch-1 run's rows are each a batch of their own."""
    costs = [_cost(loaded, run, g) for g in bgen.rows]
    if run.batch_size == 1:
        return [batch_costs([c], [g.decode_tokens], g.decode_s, loaded.peak_gbps,
                            loaded.peak_gflops)[0]
                for c, g in zip(costs, bgen.rows, strict=True)]
    return batch_costs(costs, [g.decode_tokens for g in bgen.rows], bgen.decode_s,
                       loaded.peak_gbps, loaded.peak_gflops)


def _batch_columns(run: RunSpec, batch: Batch, bgen: BatchGeneration, gen: Generation) -> dict:
    """The batch a row was decoded in and the batch's wall times (a batch-1 row's own)."""
    if run.batch_size == 1:  # each example of a batch-1 unit is a batch of its own
        prefill_s, decode_s, tokens = gen.prefill_s, gen.decode_s, len(gen.tokens)
    else:
        prefill_s, decode_s, tokens = bgen.prefill_s, bgen.decode_s, bgen.new_tokens
    return {"batch_size": run.batch_size, "batch_id": batch.batch_id,
            "batch_prefill_s": prefill_s, "batch_decode_s": decode_s,
            "batch_tokens_per_s": tokens / decode_s if decode_s > 0 else math.nan}


def _row(prepared: PreparedJob, run: RunSpec, index: int, repeat: int, position: int,
         gen: Generation, mem_delta: int | None, baseline: dict | None, *,
         reference: dict | None = None, batch: tuple[Batch, BatchGeneration] | None = None,
         cost: dict | None = None) -> dict:
    """One Parquet row: what ran (identity), what it emitted and how long it took, its batch,
    its rounds, its cost (`accounting`), its quality (`quality`, against `reference`: the
    baseline unless given) and the environment."""
    job, loaded = prepared.job, prepared.loaded
    ex, prompt = prepared.examples[index], prepared.prompts[index]
    target = loaded.target
    draft = loaded.drafts[run.draft_model] if run.draft_model else None
    # Stop strings cut the text after the run (README: --stop); ids and timings stay as run.
    text = cut_at_stop(target.tokenizer.decode(gen.tokens, skip_special_tokens=True),
                       job.stop_strings)
    reference = baseline if reference is None and not (
        is_baseline(run) and run.batch_size != 1) else reference
    base_ids = reference["output_ids"] if reference else None
    if batch is None:
        batch = (Batch(1, index, (index,)), BatchGeneration([gen], gen.prefill_s, gen.decode_s))
    return {
        "run_id": job.run_id(run), "sweep_name": job.name, "sweep_file": job.sweep_file,
        "strategy": run.strategy, "is_baseline": is_baseline(run),
        "model": job.model, "model_revision": target.revision or "",
        "model_num_layers": loaded.adapter.num_layers, "model_params": target.num_parameters,
        "draft_model": run.draft_model, "draft_num_layers": draft[1].num_layers if draft else 0,
        "draft_params": draft[0].num_parameters if draft else 0,
        "exit_layer": run.exit_layer, "num_speculations": run.num_speculations,
        "dataset": job.dataset.name, "dataset_split": job.dataset.split,
        "dataset_fingerprint": prepared.fingerprint, "example_id": ex.example_id,
        "example_index": index, "repeat": repeat, "position_in_example": position,
        "do_sample": job.decoding.do_sample, "temperature": job.decoding.temperature,
        "top_k": job.decoding.top_k, "top_p": job.decoding.top_p, "seed": job.decoding.seed,
        "max_new_tokens": job.decoding.max_new_tokens, "prompt_format": prompt.format,
        "n_shot": job.n_shot, "stop_strings": list(job.stop_strings),
        "max_input_tokens": job.max_input_tokens, "prompt_tokens": len(prompt.ids),
        "article_truncated": prompt.truncated, "lossy": run.strategy in LOSSY,
        "compile_s": prepared.compile_s.get(run, math.nan) if job.compiles(run) else 0.0,
        "output_ids": gen.tokens, "output_text": text,
        **_timing_columns(gen, baseline),
        **_batch_columns(run, *batch, gen),
        **_round_columns(gen, run, job.decoding),
        **(cost if cost is not None else _batch_costs(loaded, run, batch[1])[0]),
        "weight_bytes": weight_bytes(target.model) + (weight_bytes(draft[0].model) if draft
                                                      else 0),
        "kv_cache_bytes": gen.kv_cache_bytes,
        "kv_cache_capacity_bytes": gen.kv_cache_capacity_bytes,
        "peak_mem_delta_bytes": mem_delta,
        **quality_columns(text, ex.reference, gen.tokens, base_ids),
        **_losslessness(prepared, prompt, gen.tokens, base_ids),
        "baseline_strategy": baseline_of(run).strategy,
        "draft_revision": _draft_revision(loaded, run),
        **prepared.env,
        "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


def _timing_columns(gen: Generation, baseline: dict | None) -> dict:
    """Tokens and wall times, the rates and latencies derived from them, and the speedup on
    the baseline."""
    total_s = gen.prefill_s + gen.decode_s
    ms_per_token = _ms_per_token(gen)
    base_ms = baseline["ms_per_token"] if baseline else None
    return {
        "new_tokens": len(gen.tokens), "decode_tokens": gen.decode_tokens,
        "prefill_s": gen.prefill_s, "decode_s": gen.decode_s, "total_s": total_s,
        "tokens_per_s": gen.decode_tokens / gen.decode_s if gen.decode_s > 0 else math.nan,
        "e2e_tokens_per_s": len(gen.tokens) / total_s if total_s > 0 else math.nan,
        "ms_per_token": ms_per_token,
        "baseline_ms_per_token": base_ms if base_ms is not None else math.nan,
        "speedup": base_ms / ms_per_token if base_ms and ms_per_token else math.nan,
        **latency_columns(gen.prefill_s, gen.decode_s, gen.decode_tokens, gen.step_end_s,
                          gen.step_tokens),
    }


def _round_columns(gen: Generation, run: RunSpec, decoding: DecodingConfig) -> dict:
    """Verification rounds: how many, what each drafted and accepted, and their summaries."""
    k = run.num_speculations
    hist = [0] * (k + 1) if k and gen.drafted else []
    for a in gen.accepted if hist else ():
        hist[a] += 1
    if gen.drafted:  # lsbench's speculative loops
        rounds = len(gen.drafted)
    elif run.strategy in ("ar", "hf-ar", "hf-ar-compiled", "exit"):
        rounds = gen.decode_tokens
    else:  # generate()'s assisted loop: one target forward through the last layer per round
        rounds = gen.decode_counts.layer_calls[-1]
    drafted, accepted = sum(gen.drafted), sum(gen.accepted)
    hf = run.strategy.startswith("hf-")  # transformers' loop: drafting is not observable
    return {
        "draft_s": math.nan if hf else gen.draft_s, "rounds": rounds,
        "compiled": gen.compiled,
        "eager_head": gen.eager_head,
        "defer_threshold": math.nan if gen.defer_threshold is None else gen.defer_threshold,
        "device_loop": gen.device_loop,
        "drafted_per_round": gen.drafted, "accepted_per_round": gen.accepted,
        "accept_hist": hist,
        "rounds_without_draft": None if hf else _rounds_without_draft(gen, decoding),
        "layer_tokens_prefill": gen.prefill_counts.layer_tokens,
        "layer_tokens_decode": gen.decode_counts.layer_tokens,
        "attn_pairs_prefill": gen.prefill_counts.attn_pairs,
        "attn_pairs_decode": gen.decode_counts.attn_pairs,
        "head_tokens_prefill": gen.prefill_counts.head_tokens,
        "head_tokens_decode": gen.decode_counts.head_tokens,
        "draft_layer_tokens_decode": (gen.draft_decode_counts.layer_tokens
                                      if gen.draft_decode_counts else []),
        "draft_head_tokens_decode": (gen.draft_decode_counts.head_tokens
                                     if gen.draft_decode_counts else 0),
        "acceptance_rate": accepted / drafted if drafted else math.nan,
        "mean_accepted_len": gen.decode_tokens / rounds if rounds else math.nan,
    }
