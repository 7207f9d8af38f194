"""Frozen job specifications: a sweep file plus command-line overrides become a `JobSpec`,
a list of runs measured on the same examples. Nothing here loads a model."""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from lsbench.backend.early_exit import check_exit_layers
from lsbench.backend.loading import resolve_device, resolve_dtype
from lsbench.engine.generation import DecodingConfig
from lsbench.errors import LsbenchError
from lsbench.scenario.data import DatasetSpec, check_prompt_format

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@dataclass(frozen=True)
class RunSpec:
    """One configuration measured on every example: a strategy and its knobs."""

    strategy: str
    exit_layer: int = 0
    num_speculations: int = 0
    draft_model: str = ""
    batch_size: int = 1  # examples decoded together (static batching)

    @property
    def label(self) -> str:
        return self._label + (f" B={self.batch_size}" if self.batch_size != 1 else "")

    @property
    def _label(self) -> str:
        if self.strategy in ("ar", "hf-ar", "hf-ar-compiled"):
            return self.strategy
        if self.strategy in LOOKUP:
            return f"{self.strategy} k={self.num_speculations}"
        if self.strategy == "exit":
            return f"exit E={self.exit_layer} (lossy)"
        if self.draft_model:
            return f"{self.strategy} draft={self.draft_model} k={self.num_speculations}"
        return f"{self.strategy} E={self.exit_layer} k={self.num_speculations}"


BASELINE = RunSpec("ar")
HF_BASELINE = RunSpec("hf-ar")  # transformers' generate(): the baseline of every hf-* run
BASELINES = (BASELINE, HF_BASELINE)


def baseline_of(run: RunSpec) -> RunSpec:
    """The baseline a run's speedup is taken against: the same engine's autoregressive
    decoding at the same batch size, so that an engine gap never passes for an algorithm's
    gain (and batching's own gain never for speculation's)."""
    base = HF_BASELINE if run.strategy.startswith("hf-") else BASELINE
    return replace(base, batch_size=run.batch_size)


def is_baseline(run: RunSpec) -> bool:
    return replace(run, batch_size=1) in BASELINES


def with_baselines(runs: list[RunSpec]) -> list[RunSpec]:
    """`ar` first, then `hf-ar` whenever a transformers reference is measured."""
    needed = [BASELINE] + [HF_BASELINE] * any(baseline_of(r) == HF_BASELINE for r in runs)
    return needed + [r for r in runs if r not in needed]


# transformers' assisted generation (assistant model, assistant_early_exit, prompt lookup) is
# batch 1 only; lsbench's loops and generate()'s plain decoding (hf-ar) take batches.
BATCH_ONE_ONLY = ("hf-assisted", "hf-early-exit", "hf-pld", "hf-ar-compiled")


def batch_sizes(s: Settings, section: str) -> list[int]:
    """`[<section>] batch_sizes` (--batch-size): a list like 1,4,16; default 1."""
    sizes = parse_int_list(s.get(section, "batch_sizes", [1]), what="batch sizes")
    if any(b < 1 for b in sizes):
        raise LsbenchError(f"batch sizes must be >= 1, got {sizes}")
    return sizes


def batched(runs: list[RunSpec], sizes: list[int]) -> list[RunSpec]:
    """Every run (baselines included) at every batch size, batch size by batch size; one line
    of refusal for transformers' assisted strategies at a batch size above 1."""
    if any(b > 1 for b in sizes):
        refused = sorted({r.strategy for r in runs if r.strategy in BATCH_ONE_ONLY})
        if refused:
            raise LsbenchError(f"{', '.join(refused)} cannot run at batch size "
                               f"{max(sizes)}: transformers' assisted generation is batch 1 "
                               "only (and hf-ar-compiled's static cache one row); use "
                               "lsbench's own loops (layerskip, spec, pld), --no-compile or "
                               "--batch-size 1")
    return [replace(r, batch_size=b) for b in sizes for r in runs]
LOOKUP = ("pld", "hf-pld")  # prompt lookup: swept over k, no model and no exit layer
# Strategies `lsbench sweep` accepts: early exit verified (swept over E and k), prompt lookup
# (over k) and early exit without verification (over E; lossy).
SWEEP_STRATEGIES = ("layerskip", "hf-early-exit", "pld", "hf-pld", "exit")
PLD_DRAFT = "pld"  # `compare --draft pld`: prompt lookup, a pseudo-draft that loads no model
# transformers' generate() with its static cache and torch.compile: the compiled peer of `ar`,
# measured by `compare --hf-reference` when the job runs the compiled engine.
HF_COMPILED = RunSpec("hf-ar-compiled")
# The compile default off CUDA (on CUDA the compiled engine is the default). `make
# bench-engine` decides it: its "compiled ar vs eager ar" line on this project's CPU; until the
# compiled engine beats eager decoding there, the CPU runs eager.
COMPILE_ON_CPU = False


@dataclass(frozen=True)
class JobSpec:
    """Everything that defines a measurement job; `runs[0]` is the autoregressive baseline,
    followed by `hf-ar` when the job has transformers references (see `with_baselines`)."""

    name: str
    model: str
    dataset: DatasetSpec
    decoding: DecodingConfig
    runs: tuple[RunSpec, ...]
    revision: str | None = None
    max_input_tokens: int = 512
    repeats: int = 1
    warmup: int = 1
    dtype: str = "auto"
    device: str = "auto"
    sweep_file: str = ""
    threads: int | None = None  # torch intra-op threads; None keeps torch's default
    prompt_format: str = ""  # data.PROMPT_FORMATS; "" picks by the tokenizer (build_prompt)
    n_shot: int = 0  # examples with their references before the evaluated article
    stop_strings: tuple[str, ...] = ()  # generation ends at these texts (README: --stop)
    compiled: bool = False  # lsbench's loops run the compiled engine (--compile)

    def engine_compiled(self, run: RunSpec) -> bool:
        """Whether `run` goes through lsbench's compiled engine: transformers' references
        (hf-*) run transformers' own code and never do."""
        return self.compiled and not run.strategy.startswith("hf-")

    def compiles(self, run: RunSpec) -> bool:
        """Whether `run` compiles in warm-up: lsbench's compiled engine or hf-ar-compiled."""
        return self.engine_compiled(run) or run == HF_COMPILED

    def run_id(self, run: RunSpec) -> str:
        """Stable hash of what makes a measurement comparable (resume key)."""
        # The limit is left out: selections are prefix-stable and rows are keyed by example id,
        # so raising --limit measures only the new examples.
        dataset = {k: v for k, v in asdict(self.dataset).items() if k != "limit"}
        spec = asdict(run)
        if spec["batch_size"] == 1:  # batch 1 keeps the ids it had before batching existed
            del spec["batch_size"]
        key = {"model": self.model, "revision": self.revision, "dataset": dataset,
               "decoding": asdict(self.decoding), "max_input_tokens": self.max_input_tokens,
               "dtype": self.dtype, "device": self.device, "run": spec,
               # compiled and eager rows of one run are two measurements, never resumed as one
               "compiled": self.engine_compiled(run)}
        # The prompt settings join the key only when set, so default jobs keep their run ids.
        prompt = {"prompt_format": self.prompt_format, "n_shot": self.n_shot,
                  "stop_strings": list(self.stop_strings)}
        key.update({k: v for k, v in prompt.items() if v})
        blob = json.dumps(key, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def parse_int_list(text: str | int | list, *, num_layers: int | None = None,
                   what: str = "exit layers") -> list[int]:
    """'4,8,12', '4:28:4' (stop included), 'all' (1..num_layers) or a TOML list."""
    if isinstance(text, bool):
        raise LsbenchError(f"{what} must be integers, got {text!r}")
    if isinstance(text, int):
        return [text]
    if isinstance(text, list):
        if not all(isinstance(x, int) and not isinstance(x, bool) for x in text):
            raise LsbenchError(f"{what} must be a list of integers, got {text!r}")
        return list(dict.fromkeys(text))
    values: list[int] = []
    for part in str(text).replace(" ", "").split(","):
        if not part:
            continue
        try:
            if part == "all":
                if num_layers is None:
                    raise LsbenchError(f"'all' {what} needs the model's layer count")
                values += list(range(1, num_layers + 1))
            elif ":" in part:
                bits = [int(b) for b in part.split(":")]
                if len(bits) not in (2, 3) or (len(bits) == 3 and bits[2] < 1):
                    raise ValueError
                start, stop, step = bits[0], bits[1], bits[2] if len(bits) == 3 else 1
                values += list(range(start, stop + 1, step))
            else:
                values.append(int(part))
        except ValueError:
            raise LsbenchError(f"cannot parse {what} '{text}': use a list like 4,8,12, a range "
                               "start:stop:step (stop included) or 'all'") from None
    if not values:
        raise LsbenchError(f"no {what} given")
    return sorted(set(values), key=values.index)


def load_sweep_file(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise LsbenchError(f"sweep file not found: {path}")
    try:
        return tomllib.loads(p.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise LsbenchError(f"sweep file {path} is not valid TOML: {exc}") from None


_SECTIONS = {
    "": {"name", "model", "revision", "dtype", "device", "threads", "data", "decoding", "sweep",
         "compare"},
    "data": {"dataset", "split", "revision", "limit", "seed", "max_input_tokens", "data_files",
             "prompt_format", "n_shot"},
    "decoding": {"max_new_tokens", "sample", "temperature", "top_k", "top_p", "seed", "stop"},
    "sweep": {"exit_layers", "num_speculations", "strategies", "repeats", "warmup", "compile",
              "batch_sizes"},
    "compare": {"drafts", "early_exit", "num_speculations", "repeats", "warmup", "hf_reference",
                "compile", "batch_sizes"},
}


# [sweep.<strategy>] tables override the sweep's exit layers or k for one strategy.
_PER_STRATEGY = {"exit_layers", "num_speculations"}


def _check_keys(raw: dict, source: str) -> None:
    for name in SWEEP_STRATEGIES:
        table = raw.get("sweep", {}).get(name, {}) if isinstance(raw.get("sweep"), dict) else {}
        if not isinstance(table, dict):
            raise LsbenchError(f"{source}: [sweep.{name}] must be a table")
        unknown = sorted(set(table) - _PER_STRATEGY)
        if unknown:
            raise LsbenchError(f"{source}: unknown key(s) {', '.join(unknown)} in [sweep.{name}]; "
                               f"allowed: {', '.join(sorted(_PER_STRATEGY))}")
    for section, allowed in _SECTIONS.items():
        table = raw if not section else raw.get(section, {})
        if not isinstance(table, dict):
            raise LsbenchError(f"{source}: [{section}] must be a table")
        if section == "sweep":
            allowed = allowed | set(SWEEP_STRATEGIES)
        unknown = set(table) - allowed
        if unknown:
            where = f"[{section}]" if section else "top level"
            raise LsbenchError(f"{source}: unknown key(s) {', '.join(sorted(unknown))} in {where}; "
                               f"allowed: {', '.join(sorted(allowed))}")


@dataclass
class Settings:
    """Merged sweep-file values and command-line overrides, before layer counts are known."""

    raw: dict[str, Any] = field(default_factory=dict)
    source: str = ""

    @classmethod
    def from_file(cls, path: str | Path | None) -> Settings:
        if path is None:
            return cls({}, "")
        raw = load_sweep_file(path)
        _check_keys(raw, str(path))
        return cls(raw, str(path))

    def get(self, section: str, key: str, default: Any = None) -> Any:
        table = self.raw if not section else self.raw.get(section, {})
        return table.get(key, default)

    def typed(self, section: str, key: str, kind: type, default: Any = None) -> Any:
        """A value of the expected TOML type, else one clear error naming the key."""
        value = self.get(section, key, default)
        if value is None:
            return None
        ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value, ok = float(value), True
        if kind is list and isinstance(value, str):
            value, ok = [value], True  # a single name where a list is expected
        if not ok:
            where = f"[{section}] {key}" if section else key
            raise LsbenchError(f"{self.source or 'options'}: {where} must be of type "
                               f"{kind.__name__}, got {value!r}")
        return value

    def override(self, section: str, key: str, value: Any) -> None:
        if value is None:
            return
        table = self.raw if not section else self.raw.setdefault(section, {})
        table[key] = value


def dataset_spec(s: Settings) -> DatasetSpec:
    spec = DatasetSpec(name=s.typed("data", "dataset", str, "lee-news"),
                       split=s.typed("data", "split", str, "test"),
                       revision=s.typed("data", "revision", str),
                       limit=s.typed("data", "limit", int, 8), seed=s.typed("data", "seed", int, 0),
                       data_files=s.typed("data", "data_files", str))
    if spec.limit < 1:
        raise LsbenchError(f"limit must be >= 1, got {spec.limit}")
    return spec


def decoding_config(s: Settings) -> DecodingConfig:
    cfg = DecodingConfig(
        max_new_tokens=s.typed("decoding", "max_new_tokens", int, 64),
        do_sample=s.typed("decoding", "sample", bool, False),
        temperature=s.typed("decoding", "temperature", float, 1.0),
        top_k=s.typed("decoding", "top_k", int, 0), top_p=s.typed("decoding", "top_p", float, 1.0),
        seed=s.typed("decoding", "seed", int, 0),
    )
    if cfg.max_new_tokens < 1:
        raise LsbenchError("max_new_tokens must be >= 1")
    if cfg.do_sample and cfg.temperature <= 0:
        raise LsbenchError("temperature must be > 0 when sampling")
    if not 0 < cfg.top_p <= 1:
        raise LsbenchError("top_p must be in (0, 1]")
    if cfg.top_k < 0:
        raise LsbenchError("top_k must be >= 0 (0 turns it off)")
    return cfg


def base_job(s: Settings, runs: list[RunSpec], section: str) -> JobSpec:
    model = s.typed("", "model", str)
    if not model:
        raise LsbenchError("no model given: pass --model or set model in the sweep file")
    repeats, warmup = s.typed(section, "repeats", int, 1), s.typed(section, "warmup", int, 1)
    if repeats < 1 or warmup < 0:
        raise LsbenchError("repeats must be >= 1 and warmup >= 0")
    max_input_tokens = s.typed("data", "max_input_tokens", int, 512)
    if max_input_tokens < 1:
        raise LsbenchError(f"max_input_tokens must be >= 1, got {max_input_tokens}")
    # Resolve "auto" now: the run id must name the device and dtype actually measured.
    device = resolve_device(s.typed("", "device", str, "auto"))
    dtype = str(resolve_dtype(s.typed("", "dtype", str, "auto"), device)).replace("torch.", "")
    threads = s.typed("", "threads", int)
    if threads is not None and threads < 1:
        raise LsbenchError(f"threads must be >= 1, got {threads}")
    name = s.typed("", "name", str) or (Path(s.source).stem if s.source else "sweep")
    fmt, n_shot = s.typed("data", "prompt_format", str, ""), s.typed("data", "n_shot", int, 0)
    check_prompt_format(fmt, n_shot)
    stops = s.typed("decoding", "stop", list, [])
    if not all(isinstance(t, str) and t for t in stops):
        raise LsbenchError(f"stop strings must be non-empty texts, got {stops!r}")
    compiled = s.typed(section, "compile", bool)
    if compiled is None:
        compiled = torch.device(device).type == "cuda" or COMPILE_ON_CPU
    return JobSpec(name=name, model=model, dataset=dataset_spec(s), decoding=decoding_config(s),
                   runs=tuple(runs), revision=s.typed("", "revision", str),
                   max_input_tokens=max_input_tokens, repeats=repeats, warmup=warmup,
                   dtype=dtype, device=device, sweep_file=s.source, threads=threads,
                   prompt_format=fmt, n_shot=n_shot, stop_strings=tuple(dict.fromkeys(stops)),
                   compiled=compiled)


def _speculations(s: Settings, section: str, default: list[int],
                  strategy: str | None = None) -> list[int]:
    value = s.get(section, "num_speculations", default)
    if strategy is not None:  # a [sweep.<strategy>] table may override it
        value = (s.get(section, strategy) or {}).get("num_speculations", value)
    ks = parse_int_list(value, what="num_speculations")
    if any(k < 1 for k in ks):
        raise LsbenchError(f"num_speculations must be >= 1, got {ks}")
    return ks


def _exit_layers(s: Settings, num_layers: int, strategy: str | None) -> list[int]:
    """The sweep's exit layers, or those of the strategy's [sweep.<strategy>] table."""
    value = s.get("sweep", "exit_layers", "all")
    if strategy is not None:
        value = (s.get("sweep", strategy) or {}).get("exit_layers", value)
    layers = parse_int_list(value, num_layers=num_layers)
    check_exit_layers(layers, num_layers, s.get("", "model"))
    return layers


def sweep_job(s: Settings, num_layers: int) -> JobSpec:
    """The exit-layer sweep: baseline + every (strategy, exit layer, k); prompt lookup only
    over k, the lossy exit only over exit layers. A [sweep.<strategy>] table overrides
    exit_layers or num_speculations for that strategy."""
    _exit_layers(s, num_layers, None)  # the shared list is checked even where overridden
    strategies = s.typed("sweep", "strategies", list, ["layerskip"])
    for name in strategies:
        if name not in SWEEP_STRATEGIES:
            raise LsbenchError(f"unknown sweep strategy '{name}'; choose from "
                               f"{', '.join(SWEEP_STRATEGIES)}")
    runs: list[RunSpec] = []
    for name in dict.fromkeys(strategies):
        layers = _exit_layers(s, num_layers, name)
        ks = _speculations(s, "sweep", [4], name)
        if name == "exit":
            runs += [RunSpec(name, e, 0) for e in layers]
        elif name in LOOKUP:
            runs += [RunSpec(name, 0, k) for k in ks]
        else:
            runs += [RunSpec(name, e, k) for e in layers for k in ks]
    return base_job(s, batched(with_baselines(runs), batch_sizes(s, "sweep")), "sweep")


def compare_job(s: Settings, num_layers: int) -> JobSpec:
    """Draft models against early exit: baseline + spec per draft (pld for the pseudo-draft
    `pld`) + layerskip per layer, and transformers' counterparts with hf_reference (with the
    compiled engine also hf-ar-compiled, compiled ar's counterpart)."""
    drafts = s.typed("compare", "drafts", list, [])
    if not all(isinstance(d, str) and d for d in drafts):
        raise LsbenchError(f"drafts must be model names, got {drafts!r}")
    layers = parse_int_list(s.get("compare", "early_exit", []) or [], num_layers=num_layers) \
        if s.get("compare", "early_exit") else []
    check_exit_layers(layers, num_layers, s.get("", "model"))
    if not drafts and not layers:
        raise LsbenchError("nothing to compare: give --draft and/or --early-exit")
    ks = _speculations(s, "compare", [4])
    hf = s.typed("compare", "hf_reference", bool, False)
    lookup = PLD_DRAFT in drafts
    drafts = [d for d in drafts if d != PLD_DRAFT]
    runs: list[RunSpec] = []
    for k in ks:
        runs += [RunSpec("spec", 0, k, d) for d in drafts]
        runs += [RunSpec("pld", 0, k)] if lookup else []
        runs += [RunSpec("layerskip", e, k) for e in layers]
        if hf:
            runs += [RunSpec("hf-assisted", 0, k, d) for d in drafts]
            runs += [RunSpec("hf-pld", 0, k)] if lookup else []
            runs += [RunSpec("hf-early-exit", e, k) for e in layers]
    job = base_job(s, with_baselines(runs), "compare")
    if hf and job.compiled:  # compiled ar's peer: transformers' own compiled generate()
        job = replace(job, runs=(*job.runs[:2], HF_COMPILED, *job.runs[2:]))
    return replace(job, runs=tuple(batched(list(job.runs), batch_sizes(s, "compare"))))



