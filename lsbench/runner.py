"""Runs a JobSpec: loads models once, warms up, then measures every run on every example,
baseline first for each example so that drift hits all strategies alike. Each measured
generation becomes one row, stored atomically as soon as it exists. Never prints: progress
goes to a callback."""

from __future__ import annotations

import datetime as dt
import math
import platform
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers

from lsbench import __version__
from lsbench.data import Example, Prompt, build_prompt, check_dataset, load_examples
from lsbench.errors import LsbenchError
from lsbench.generation import DecodingConfig, Generation
from lsbench.jobs import JobSpec, RunSpec
from lsbench.metrics import (
    FlopModel,
    WeightModel,
    agreement,
    count_flops,
    count_weight_bytes,
    first_mismatch,
    peak_gbps,
    peak_memory,
    reset_peak_memory,
    roofline,
    rouge_scores,
)
from lsbench.models import (
    EarlyExitModel,
    LoadedModel,
    load_model,
    locate_model,
)
from lsbench.store import ResultStore
from lsbench.strategies import generate

WARMUP_TOKENS = 16  # warm-up generations are short: they only need every kernel shape once


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


def _load(job: JobSpec) -> _Loaded:
    target = load_model(job.model, dtype=job.dtype, device=job.device, revision=job.revision)
    drafts = {}
    for name in sorted({r.draft_model for r in job.runs if r.draft_model}):
        draft = load_model(name, dtype=job.dtype, device=job.device)
        if draft.tokenizer.get_vocab() != target.tokenizer.get_vocab():
            raise LsbenchError(f"draft model '{name}' uses another tokenizer than '{job.model}'; "
                               "speculative decoding needs the same vocabulary")
        flops = FlopModel.from_config(draft.model.config)
        drafts[name] = (draft, EarlyExitModel(draft.model), flops)
    adapter = EarlyExitModel(target.model)
    weights = {"": WeightModel.from_model(adapter),
               **{name: WeightModel.from_model(d[1]) for name, d in drafts.items()}}
    return _Loaded(target, adapter, FlopModel.from_config(target.model.config), drafts, weights,
                   peak_gbps(str(adapter.device)))


def stop_token_ids(loaded: LoadedModel) -> tuple[int, ...]:
    ids: list[int] = []
    for value in (getattr(loaded.model.generation_config, "eos_token_id", None),
                  loaded.tokenizer.eos_token_id):
        ids += value if isinstance(value, list) else [value] if value is not None else []
    return tuple(dict.fromkeys(ids))


def environment(device: torch.device, dtype: torch.dtype) -> dict:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = _cpu_name() or platform.processor() or platform.machine()
    return {"lsbench_version": __version__, "git_commit": _git_commit(),
            "torch_version": torch.__version__, "transformers_version": transformers.__version__,
            "device": str(device), "device_name": name, "dtype": str(dtype).replace("torch.", ""),
            "threads": torch.get_num_threads()}


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


def _generate(loaded: _Loaded, run: RunSpec, prompt: list[int], cfg: DecodingConfig) -> Generation:
    draft = loaded.drafts[run.draft_model][1] if run.draft_model else None
    return generate(run.strategy, loaded.adapter, prompt, cfg, k=run.num_speculations or 4,
                    exit_layer=run.exit_layer or None, draft=draft)


def run_job(job: JobSpec, store: ResultStore, *, force: bool = False,
            on_progress: Callable[[ProgressEvent], None] | None = None) -> JobOutcome:
    """Measure every (repeat, example, run) not already in `store`."""
    emit = on_progress or (lambda _event: None)
    validate(job)
    if job.threads:
        torch.set_num_threads(job.threads)
    run_ids = [job.run_id(r) for r in job.runs]
    if force:
        store.drop_runs(set(run_ids))
    emit(ProgressEvent("load", 0, 0, f"loading {job.model}"))
    examples, fingerprint = load_examples(job.dataset)
    loaded = _load(job)
    tokenizer = loaded.target.tokenizer
    prompts = [build_prompt(tokenizer, ex.article, job.max_input_tokens) for ex in examples]
    stops = stop_token_ids(loaded.target)
    cfg = DecodingConfig(**{**job.decoding.__dict__, "stop_token_ids": stops})
    env = environment(loaded.adapter.device, loaded.adapter.dtype)

    done_keys = store.completed_keys()
    plan = [(rep, i, run) for rep in range(job.repeats) for i in range(len(examples))
            for run in job.runs]
    pending = [p for p in plan
               if (job.run_id(p[2]), examples[p[1]].example_id, p[0]) not in done_keys]
    total, done = len(plan), len(plan) - len(pending)

    # Warm-up: every pending configuration runs a few short generations before any timing.
    warm_cfg = DecodingConfig(**{**cfg.__dict__, "max_new_tokens": min(cfg.max_new_tokens,
                                                                         WARMUP_TOKENS)})
    for run in dict.fromkeys(p[2] for p in pending):
        for _ in range(job.warmup):
            emit(ProgressEvent("warmup", done, total, run.label))
            _generate(loaded, run, prompts[0].ids, warm_cfg)

    baselines = _stored_baselines(store, run_ids[0])
    for rep, i, run in pending:
        ex, prompt = examples[i], prompts[i]
        what = f"{run.label} · example {i + 1}/{len(examples)}"
        emit(ProgressEvent("measure", done, total, what))
        reset_peak_memory(loaded.adapter.device)
        gen = _generate(loaded, run, prompt.ids, cfg)
        memory = peak_memory(loaded.adapter.device)
        row = _row(job, run, job.run_id(run), ex, i, rep, prompt, gen, loaded, fingerprint, env,
                   memory, baselines.get((ex.example_id, rep)))
        if run == job.runs[0]:
            baselines[(ex.example_id, rep)] = row
        store.append([row])
        done += 1
        emit(ProgressEvent("measure", done, total, what))
    emit(ProgressEvent("done", done, total, "done"))
    return JobOutcome(len(pending), total - len(pending))


def _stored_baselines(store: ResultStore, baseline_id: str) -> dict[tuple[str, int], dict]:
    """Baseline rows measured by an earlier, interrupted invocation (resume)."""
    df = store.rows()
    df = df[df.run_id == baseline_id]
    return {(r["example_id"], int(r["repeat"])): {"ms_per_token": r["ms_per_token"],
                                                   "output_ids": list(r["output_ids"])}
            for r in df.to_dict("records")}


def _row(job: JobSpec, run: RunSpec, run_id: str, ex: Example, index: int, repeat: int,
         prompt: Prompt, gen: Generation, loaded: _Loaded, fingerprint: str, env: dict,
         memory: tuple[int, int], baseline: dict | None) -> dict:
    target = loaded.target
    draft = loaded.drafts[run.draft_model] if run.draft_model else None
    text = target.tokenizer.decode(gen.tokens, skip_special_tokens=True)
    k = run.num_speculations
    hist = [0] * (k + 1) if k and gen.drafted else []
    for a in gen.accepted:
        if hist:
            hist[a] += 1
    if gen.drafted:  # lsbench's speculative loops
        rounds = len(gen.drafted)
    elif run.strategy in ("ar", "hf-ar"):
        rounds = gen.decode_tokens
    else:  # generate()'s assisted loop: one target forward through the last layer per round
        rounds = gen.decode_counts.layer_calls[-1]
    drafted, accepted = sum(gen.drafted), sum(gen.accepted)
    flops_prefill = count_flops(loaded.flop_model, gen.prefill_counts)
    flops_decode = count_flops(loaded.flop_model, gen.decode_counts)
    if draft is not None and gen.draft_decode_counts is not None:
        flops_prefill += count_flops(draft[2], gen.draft_prefill_counts)
        flops_decode += count_flops(draft[2], gen.draft_decode_counts)
    weight_bytes = count_weight_bytes(loaded.weights[""], gen.decode_counts)
    if run.draft_model and gen.draft_decode_counts is not None:
        weight_bytes += count_weight_bytes(loaded.weights[run.draft_model],
                                           gen.draft_decode_counts)
    achieved_gbps, roofline_fraction = roofline(weight_bytes, gen.decode_s, loaded.peak_gbps)
    ms_per_token = 1000 * gen.decode_s / gen.decode_tokens if gen.decode_tokens else math.nan
    base_ms = baseline["ms_per_token"] if baseline else ms_per_token if run == job.runs[0] else None
    base_ids = baseline["output_ids"] if baseline else gen.tokens if run == job.runs[0] else None
    total_s = gen.prefill_s + gen.decode_s
    return {
        "run_id": run_id, "sweep_name": job.name, "sweep_file": job.sweep_file,
        "strategy": run.strategy, "is_baseline": run == job.runs[0],
        "model": job.model, "model_revision": target.revision or "",
        "model_num_layers": loaded.adapter.num_layers, "model_params": target.num_parameters,
        "draft_model": run.draft_model, "draft_num_layers": draft[1].num_layers if draft else 0,
        "draft_params": draft[0].num_parameters if draft else 0,
        "exit_layer": run.exit_layer, "num_speculations": k,
        "dataset": job.dataset.name, "dataset_split": job.dataset.split,
        "dataset_fingerprint": fingerprint, "example_id": ex.example_id,
        "example_index": index, "repeat": repeat,
        "do_sample": job.decoding.do_sample, "temperature": job.decoding.temperature,
        "top_k": job.decoding.top_k, "top_p": job.decoding.top_p, "seed": job.decoding.seed,
        "max_new_tokens": job.decoding.max_new_tokens, "prompt_format": prompt.format,
        "max_input_tokens": job.max_input_tokens, "prompt_tokens": len(prompt.ids),
        "article_truncated": prompt.truncated,
        "output_ids": gen.tokens, "output_text": text, "new_tokens": len(gen.tokens),
        "decode_tokens": gen.decode_tokens, "prefill_s": gen.prefill_s, "decode_s": gen.decode_s,
        "total_s": total_s, "rounds": rounds,
        "drafted_per_round": gen.drafted, "accepted_per_round": gen.accepted, "accept_hist": hist,
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
        "tokens_per_s": gen.decode_tokens / gen.decode_s if gen.decode_s > 0 else math.nan,
        "e2e_tokens_per_s": len(gen.tokens) / total_s if total_s > 0 else math.nan,
        "ms_per_token": ms_per_token,
        "acceptance_rate": accepted / drafted if drafted else math.nan,
        "mean_accepted_len": gen.decode_tokens / rounds if rounds else math.nan,
        "flops_prefill": flops_prefill, "flops_decode": flops_decode,
        "flops_per_output_token": (flops_decode / gen.decode_tokens if gen.decode_tokens
                                   else math.nan),
        "weight_bytes_read": weight_bytes, "achieved_gbps": achieved_gbps,
        "peak_gbps": loaded.peak_gbps, "roofline_fraction": roofline_fraction,
        "peak_mem_bytes": memory[0], "peak_mem_reserved_bytes": memory[1],
        **rouge_scores(text, ex.reference),
        "baseline_ms_per_token": base_ms if base_ms is not None else math.nan,
        "speedup": base_ms / ms_per_token if base_ms and ms_per_token else math.nan,
        "matches_baseline": gen.tokens == base_ids if base_ids is not None else None,
        "first_mismatch": first_mismatch(gen.tokens, base_ids) if base_ids is not None else None,
        "agreement": agreement(gen.tokens, base_ids) if base_ids is not None else math.nan,
        **env, "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
