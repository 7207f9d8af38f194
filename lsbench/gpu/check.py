"""`make gpu-check`: the whole GPU check as one prepared command, for the few minutes a GPU is
lent. Every step gets a share of the wall-clock budget, writes into OUT, and is skipped with
its reason written down when its time has run out or its prerequisite is missing.

    python -m lsbench.gpu.check --out results/gpu [--budget 480] [--device cuda] [--tiny]

Steps: (1) environment and the device's copy bandwidth, (2) the CUDA-marked tests and the
layerskip = ar exactness tests on the device in fp32 and bf16, (3) `make bench-engine` in short
form in bf16 and fp32, (4) the compiled engine against eager `ar` and `layerskip` in bf16 with
their roofline fractions, (5) the quickstart sweep with plots, (6) the blog's pair: SmolLM2-135M
trained on for the same tokens twice, with the LayerSkip recipe and without, swept at every
exit layer with k = 2, 4, 6 on held-out articles, (7) a short sweep with a device map that
splits the layers between cuda:0 and the CPU (all-cpu in the dry run), (8) `lsbench scan` of
step 6's LayerSkip twin with its 3 best points verified. OUT ends with summary.md, summary.json
and the figures; both summaries are rewritten after every step, so an interrupted check keeps
what it did. `--device cpu --tiny` runs the same steps at toy scale (a tiny random model, a few
training steps, a handful of tokens). Exit status 1 when a step failed, else 0 (skipped and
partial steps are written down, not failures).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from lsbench.errors import LsbenchError, one_line, run_main
from lsbench.training.recipe import Recipe

ROOT = Path(__file__).resolve().parents[2]
# (step, weight of the budget, minimum seconds worth starting it with: GPU, tiny)
STEPS: list[tuple[str, float, tuple[float, float]]] = [
    ("environment", 2, (5, 1)),
    ("tests", 2, (20, 5)),
    ("bench", 4, (20, 5)),
    ("compiled", 3, (30, 5)),
    ("quickstart", 3, (20, 5)),
    ("ab", 16, (120, 10)),
    ("devices", 1, (20, 3)),
    ("scan", 2, (30, 5)),
]
# layerskip = ar exactness tests of tests/test_engine.py that build on the `target` fixture,
# which conftest moves to LSBENCH_TEST_DEVICE / LSBENCH_TEST_DTYPE.
EXACTNESS_TESTS = ("layerskip_greedy_equals_ar", "exit_at_last_layer_accepts_every_draft",
                   "accounting_is_consistent", "layer_token_counts_match_cost_formula",
                   "cache_holds_exactly_the_committed_tokens")
# The LayerSkip twin's recipe for continued pretraining: milder layer dropout than from
# scratch (the paper's continual-pretraining setting), full-weight early-exit losses.
GPU_RECIPE = Recipe(p_max=0.1, dropout_curriculum="none", exit_curriculum="rotational",
                    rotation=2, e_scale=1.0)
AB_SWEEP_FILE = ROOT / "sweeps" / "ab-twins.toml"
LOSS_RISE_LIMIT = 0.05  # the twins' final-layer held-out loss may rise at most 5%


class OutOfTime(Exception):
    """A step reached the end of its share of the budget."""


@dataclass
class Step:
    name: str
    status: str = "skipped"  # ok | partial | failed | skipped
    reason: str = ""
    seconds: float = 0.0
    share_s: float = 0.0
    details: dict = field(default_factory=dict)
    markdown: list[str] = field(default_factory=list)


@dataclass
class Check:
    """What every step sees: where to write, on what, and until when."""

    out: Path
    device: str
    tiny: bool
    model_ref: str = "smollm2-135m"
    self_tokens: int = 0  # the model's own sampled text added to the twins' training text
    epochs: float = 3.0
    train_tokens: int = 0
    lr: float = 1e-4
    deadline: float = 0.0
    say: Callable[[str], None] = print
    twins: dict[str, str] = field(default_factory=dict)  # step 6's trained models, by kind
    _model: str | None = None

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def check_time(self) -> None:
        if self.left() <= 0:
            raise OutOfTime

    def dir(self, name: str) -> Path:
        path = self.out / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def model(self) -> str:
        """The model the steps run: SmolLM2-135M, or in --tiny mode a tiny random Llama with a
        BPE tokenizer trained on the news text (built once, in OUT)."""
        if self._model is None:
            self._model = build_tiny_model(self.out / "tiny-model") if self.tiny \
                else self.model_ref
        return self._model

    def progress_guard(self, event) -> None:
        """A runner progress callback that ends a sweep at the step's deadline; every row
        measured so far is already stored."""
        self.check_time()


def build_tiny_model(path: Path) -> str:
    if (path / "config.json").is_file():
        return str(path)
    from lsbench.scenario.data import DatasetSpec, load_examples
    from lsbench.training.train import TrainConfig, build_model, train_bpe

    examples, _ = load_examples(DatasetSpec("lee-news", limit=300))
    tokenizer = train_bpe([e.article for e in examples], vocab_size=512)
    model = build_model(TrainConfig(out=str(path), size="micro", seq_len=64), tokenizer)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


# --- 1. environment ------------------------------------------------------------------------

def step_environment(c: Check, step: Step) -> None:
    from lsbench.backend.loading import load_model
    from lsbench.scenario.accounting import peak_gbps
    from lsbench.scenario.runner import environment

    dev = torch.device(c.device)
    env = environment(dev, torch.float32)
    env.pop("dtype")
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        env.update(memory_bytes=props.total_memory, cuda_version=torch.version.cuda,
                   cudnn_version=torch.backends.cudnn.version(),
                   capability=f"{props.major}.{props.minor}")
    else:
        env.update(memory_bytes=os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
                   cuda_version=torch.version.cuda, cpu_count=os.cpu_count())
    env.update(python=platform.python_version(), tiny=c.tiny)
    t0 = time.perf_counter()
    env["peak_gbps"] = peak_gbps(str(dev))  # cached: the sweeps' rows reuse this measurement
    env["copy_measure_s"] = time.perf_counter() - t0
    c.check_time()
    t0 = time.perf_counter()  # first load converts the GGUF file once (~40 s), not timed later
    loaded = load_model(c.model(), device=c.device)
    env.update(model=c.model(), model_params=loaded.num_parameters,
               model_load_s=time.perf_counter() - t0)
    del loaded
    step.details = env
    step.markdown = [f"- device: {env['device_name']} ({env['device']}), "
                     f"{env['memory_bytes'] / 2**30:.1f} GiB",
                     f"- torch {env['torch_version']}, CUDA {env['cuda_version']}, "
                     f"transformers {env['transformers_version']}, lsbench "
                     f"{env['lsbench_version']} ({env['git_commit'][:12] or 'no git'})",
                     f"- memory copy bandwidth (roofline peak): {env['peak_gbps']:.1f} GB/s",
                     f"- model: {env['model']}, loaded in {env['model_load_s']:.1f} s"]


# --- 2. tests on the device ----------------------------------------------------------------

def step_tests(c: Check, step: Step) -> None:
    if not (ROOT / "tests" / "conftest.py").is_file():
        raise _Skip(f"no test suite at {ROOT / 'tests'} (an installed lsbench has none)")
    if importlib.util.find_spec("pytest") is None:
        raise _Skip("pytest is not installed (pip install lsbench[dev])")
    out = c.dir("tests")
    selection = "cuda or (test_engine and (" + " or ".join(EXACTNESS_TESTS) + "))"
    dtypes = ("float32", "bfloat16")
    step.markdown = ["| dtype | passed | failed | errors | skipped |", "|---|---:|---:|---:|---:|"]
    for i, dtype in enumerate(dtypes):
        c.check_time()
        junit = out / f"pytest-{dtype}.xml"
        env = {**os.environ, "LSBENCH_TEST_DEVICE": c.device, "LSBENCH_TEST_DTYPE": dtype,
               "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT),
                                                           os.environ.get("PYTHONPATH")]))}
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests",
               "-k", selection, f"--junitxml={junit}"]
        timeout = c.left() / (len(dtypes) - i)
        try:
            proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                                  timeout=timeout)
        except subprocess.TimeoutExpired:
            (out / f"pytest-{dtype}.log").write_text(f"timed out after {timeout:.0f} s\n")
            raise OutOfTime from None
        (out / f"pytest-{dtype}.log").write_text(proc.stdout + proc.stderr)
        counts = junit_counts(junit)
        step.details[dtype] = counts
        step.markdown.append(f"| {dtype} | {counts['passed']} | {counts['failed']} | "
                             f"{counts['errors']} | {counts['skipped']} |")
    fp32 = step.details["float32"]
    bf16 = step.details.get("bfloat16", {})
    step.markdown += ["", "fp32 must pass every test. bf16 is recorded as raw counts: its "
                      "greedy near-ties can flip a token (the near-tie verdict lands with the "
                      "measurement-fidelity issue)."]
    if bf16.get("failed_tests"):
        step.markdown.append("bf16 failures: " + ", ".join(bf16["failed_tests"][:10]))
    if fp32["passed"] == 0 or fp32["failed"] or fp32["errors"]:
        step.status, step.reason = "failed", "fp32 exactness tests did not all pass"


def junit_counts(path: Path) -> dict:
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "failed_tests": []}
    if not path.is_file():
        return counts
    for case in ET.parse(path).getroot().iter("testcase"):
        kinds = {child.tag for child in case}
        if "failure" in kinds:
            counts["failed"] += 1
            counts["failed_tests"].append(case.get("name", "?"))
        elif "error" in kinds:
            counts["errors"] += 1
            counts["failed_tests"].append(case.get("name", "?"))
        elif "skipped" in kinds:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    return counts


# --- 3. bench-engine, short form -----------------------------------------------------------

def step_bench(c: Check, step: Step) -> None:
    from lsbench.benchmarks import bench

    out = c.dir("bench")
    args = ["--model", c.model(), "--device", c.device, "--prompts", "3", "--skip-compiled"]
    if c.tiny:
        args += ["--max-new-tokens", "8", "--exit-layers", "2", "--repeats", "1",
                 "--max-input-tokens", "64"]
    else:
        args += ["--max-new-tokens", "48", "--repeats", "2"]
    step.markdown = []
    for dtype in ("bfloat16", "float32"):
        c.check_time()
        text = out / f"bench-{dtype}.txt"
        with text.open("w") as f, contextlib.redirect_stdout(f):
            t0 = time.perf_counter()
            code = bench.main([*args, "--dtype", dtype])
            print(f"({time.perf_counter() - t0:.0f} s)")
        lines = text.read_text().splitlines()
        step.details[dtype] = {"exit_status": code, "lines": lines}
        step.markdown += [f"{dtype} (exit status {code}; 1 = a greedy output differed):", "",
                          "```", *lines, "```", ""]


# --- 4. the compiled engine ----------------------------------------------------------------

COMPILED_GOAL, ROOFLINE_GOAL = 5.0, 0.60  # on a GPU; the roofline goal is for bf16 models >= 1B


def step_compiled(c: Check, step: Step) -> None:
    """Compiled against eager `ar` and `layerskip` (E = 3L/4, k = 4) in bf16 on the device,
    side by side (`bench.side_by_side`), with each one's roofline fraction; compilation and
    graph capture happen in an unmeasured warm-up, reported as `compile_s`. A compiled output
    that differs from eager ar's is recorded (bf16 can flip near-ties), not a failure; a
    compilation that fails is."""
    from lsbench.benchmarks import bench
    from lsbench.engine.strategies import generate
    from lsbench.scenario.accounting import WeightModel, count_weight_bytes, peak_gbps, roofline

    n_prompts, new_tokens, max_input, repeats = (2, 8, 64, 1) if c.tiny else (3, 48, 384, 2)
    loaded, model, prompts, cfg = bench.load_bench(c.model(), "bfloat16", c.device, "lee-news",
                                                   n_prompts, max_input, new_tokens)
    k, e = 4, max(1, 3 * model.num_layers // 4)
    reference = {i: generate("ar", model, p, cfg).tokens for i, p in enumerate(prompts)}
    c.check_time()
    pairs = {"ar": [("ar", None, False), ("ar", None, True)],
             "layerskip": [("layerskip", e, False), ("layerskip", e, True)]}
    bench._warm(model, prompts[0], [eager for eager, _ in pairs.values()], k)
    t0 = time.perf_counter()  # compile_s: the compiled sides' warm-up alone
    bench._warm(model, prompts[0], [compiled for _, compiled in pairs.values()], k)
    compile_s = time.perf_counter() - t0
    peak = peak_gbps(str(model.device))
    wm = WeightModel.from_model(model)
    results, lossless = {}, True
    for name, configs in pairs.items():
        c.check_time()
        tps, gens, same = bench.side_by_side(model, prompts, cfg, configs, k, repeats, reference)
        lossless &= same
        fractions = [roofline(count_weight_bytes(wm, gens[x].decode_counts),
                              gens[x].decode_s, peak)[1] for x in configs]
        results[name] = {"eager_tokens_per_s": tps[configs[0]],
                         "compiled_tokens_per_s": tps[configs[1]],
                         "speedup": tps[configs[1]] / tps[configs[0]],
                         "eager_roofline": fractions[0], "compiled_roofline": fractions[1]}
    ops = {mode: bench.ops_per_token(model, prompts[0], compiled=mode == "compiled")
           for mode in ("eager", "compiled")}
    params = loaded.num_parameters
    step.details = {"model": c.model(), "dtype": "bfloat16", "exit_layer": e, "k": k,
                    "prompts": len(prompts), "max_new_tokens": new_tokens,
                    "compile_s": compile_s, "peak_gbps": peak, "params": params,
                    "ops_per_token": ops, "greedy_equal_to_eager_ar": lossless, **results}
    big = params >= 1e9
    step.markdown = [
        f"{c.model()} in bf16, {len(prompts)} prompts, {new_tokens} new tokens; compilation "
        f"and graph capture in the warm-up: {compile_s:.1f} s.", "",
        "| strategy | eager tok/s | compiled tok/s | compiled / eager | eager roofline | "
        "compiled roofline |", "|---|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        label = "ar" if name == "ar" else f"layerskip E={e} k={k}"
        step.markdown.append(
            f"| {label} | {r['eager_tokens_per_s']:.1f} | {r['compiled_tokens_per_s']:.1f} | "
            f"{r['speedup']:.2f}x | {r['eager_roofline']:.0%} | {r['compiled_roofline']:.0%} |")
    step.markdown += [
        "", f"Goals on a GPU: compiled ar >= {COMPILED_GOAL:.0f}x eager "
        f"({results['ar']['speedup']:.2f}x here); >= {ROOFLINE_GOAL:.0%} of the copy "
        f"bandwidth ({peak:.0f} GB/s) for bf16 models of 1B parameters or more "
        + (f"({results['ar']['compiled_roofline']:.0%} here)." if big
           else f"(this model has {params / 1e6:.0f}M: not judged)."),
        f"Operator calls per decoded token (ar): eager {ops['eager']:.0f}, compiled "
        f"{ops['compiled']:.0f}.",
        "Greedy outputs of both engines equal eager ar's: "
        + ("yes." if lossless else "NO (bf16 near-ties can flip; see the tests step's fp32).")]


# --- 5. the quickstart sweep ----------------------------------------------------------------

def sweep_settings(c: Check, file: Path, overrides: dict[tuple[str, str], object]):
    from lsbench.scenario.jobs import Settings

    s = Settings.from_file(file)
    base = {("", "device"): c.device, ("", "dtype"): "auto"}
    for (section, key), value in {**base, **overrides}.items():
        s.override(section, key, value)
    return s


def run_sweep(c: Check, settings, path: Path, device_map: str | None = None
              ) -> tuple[object, bool]:
    """Run a sweep into `path` (fresh), stopping at the deadline; (rows, complete)."""
    from lsbench.backend.loading import model_num_layers
    from lsbench.results.store import ResultStore
    from lsbench.scenario.jobs import sweep_job
    from lsbench.scenario.runner import run_job

    job = sweep_job(settings, model_num_layers(settings.get("", "model")))
    path.unlink(missing_ok=True)
    store = ResultStore(path)
    complete = True
    try:
        run_job(job, store, on_progress=c.progress_guard, device_map=device_map)
    except OutOfTime:
        complete = False
    return (store.rows() if path.exists() else None), complete


def step_quickstart(c: Check, step: Step) -> None:
    from lsbench.reporting.plots import plot_sweep
    from lsbench.reporting.report import format_cell, sweep_table, to_markdown

    file = ROOT / "sweeps" / "quickstart.toml"
    if not file.is_file():
        raise _Skip(f"{file} not found")
    out = c.dir("quickstart")
    overrides: dict = {("", "model"): c.model()}
    if c.tiny:
        overrides.update({("data", "limit"): 2, ("decoding", "max_new_tokens"): 8,
                          ("sweep", "exit_layers"): [1, 2, 3], ("data", "max_input_tokens"): 64,
                          ("sweep", "exit"): {"exit_layers": [2, 3]}})
    df, complete = run_sweep(c, sweep_settings(c, file, overrides), out / "quickstart.parquet")
    if df is None or df.empty:
        raise OutOfTime
    table = sweep_table(df)
    figures = plot_sweep(df, out / "plots")
    base = table[table["strategy"] == "ar"].iloc[0]
    step.details = {"rows": len(df), "figures": [str(p.relative_to(c.out)) for p in figures],
                    "baseline_roofline_fraction": float(base["roofline"]),
                    "baseline_weights_gbps": float(base["weights GB/s"]),
                    "best_speedup": float(table["speedup"][~(table["strategy"] == "ar")].max())}
    step.markdown = [to_markdown(table.drop(columns=["model", "dataset"])), "",
                     f"Baseline roofline: autoregressive decoding reads weights at "
                     f"{format_cell('weights GB/s', base['weights GB/s'])} GB/s, "
                     f"{format_cell('roofline', base['roofline'])} of the device's copy "
                     f"bandwidth ({format_cell('peak GB/s', base['peak GB/s'])} GB/s).", ""]
    step.markdown += [f"![{p.stem}]({p.relative_to(c.out)})" for p in figures]
    if not complete:
        step.status, step.reason = "partial", "the sweep reached its share of the budget"


# --- 6. the blog's pair on a real model -----------------------------------------------------

def twin_config(c: Check):
    from lsbench.training.train import TrainConfig

    if c.tiny:
        return TrainConfig(out="", init=c.model(), tokenizer="model",
                           data=("wiki-lead", "lee-news"), data_limit=40, holdout=4,
                           holdout_from="lee-news", tokens=8 * 2 * 64, seed=0, lr=1e-3,
                           warmup=0.1, schedule="cosine", batch_size=2, seq_len=64, log_every=4,
                           device=c.device)
    return TrainConfig(out="", init=c.model(), tokenizer="model", data=("wiki-lead", "lee-news"),
                       holdout=24, holdout_from="lee-news", tokens=1, seed=0, lr=c.lr,
                       warmup=0.1, schedule="cosine", batch_size=16, seq_len=512, log_every=10,
                       device=c.device)


def heldout_scale(c: Check) -> dict:
    """The twins' sweep and scan at this check's scale: the device, how many held-out
    articles and how long (training/ab.py's twin_settings applies them)."""
    device = {("", "device"): c.device, ("", "dtype"): "auto"}
    if c.tiny:
        return {**device, ("data", "limit"): 2, ("decoding", "max_new_tokens"): 8,
                ("data", "max_input_tokens"): 40}
    return {**device, ("data", "limit"): 3, ("decoding", "max_new_tokens"): 48,
            ("data", "max_input_tokens"): 384}


def step_ab(c: Check, step: Step) -> None:
    """training/ab.py's A/B at this check's scale: the model's own text joins the training
    text, the LayerSkip twin trains on a time share, the baseline on the tokens it reached."""
    from lsbench.reporting.plots import plot_sweep
    from lsbench.results.store import read_results
    from lsbench.training.ab import (
        heldout_before,
        self_text,
        summary_markdown,
        train_in_turn,
        twin_configs,
        twin_settings,
    )
    from lsbench.training.train import HELDOUT_FILE, output_dir

    out = c.dir("ab")
    started = time.perf_counter()
    base = twin_config(c)
    generated = None
    if c.self_tokens:
        c.say(f"  sampling up to {c.self_tokens:,} tokens of the model's own text...")
        path = out / "self-text.jsonl"
        batch, new = (4, 16) if c.tiny else (512, 256)
        generated = self_text(base, path, c.self_tokens, 0.2 * c.left(), batch, new)
        if generated["texts"]:
            base = replace(base, data=(*base.data, f"jsonl:{path}"))
        c.check_time()
    before, available = heldout_before(base)
    c.check_time()
    per_step = base.batch_size * base.seq_len
    tokens = c.train_tokens or (base.tokens if c.tiny else int(c.epochs * available))
    tokens = max(per_step, tokens // per_step * per_step)
    # Training takes about half of what is left, the LayerSkip twin (slower steps) a bit more
    # than the baseline; if its share binds first, the baseline gets the tokens it reached.
    train_share = 0.5 * c.left()
    prefix = "gpucheck-tiny" if c.tiny else "gpucheck-smollm2"
    twins = twin_configs(replace(base, tokens=tokens), GPU_RECIPE,
                         {kind: f"{prefix}-{kind}" for kind in ("baseline", "layerskip")})
    twins["layerskip"] = replace(twins["layerskip"], time_budget_s=0.55 * train_share)

    def starting(kind, cfg):
        c.check_time()
        c.say(f"  training the {kind} twin ({cfg.tokens:,} tokens at most)...")

    logs = train_in_turn(twins, starting)
    names = {kind: str(output_dir(twins[kind].out)) for kind in twins}
    c.twins = names
    (out / "heldout-news.jsonl").write_bytes(
        (Path(names["layerskip"]) / HELDOUT_FILE).read_bytes())
    overrides: dict = {("sweep", "num_speculations"): [2, 4, 6], ("sweep", "exit_layers"): "all",
                       **heldout_scale(c)}
    frames, complete = [], True
    sweep_end = c.deadline - 5  # leave a few seconds for the summary and figures
    for i, kind in enumerate(("baseline", "layerskip")):
        c.deadline = time.perf_counter() + (sweep_end - time.perf_counter()) / (2 - i)
        c.say(f"  sweeping the {kind} twin...")
        settings = twin_settings(names[kind], out, AB_SWEEP_FILE,
                                 {**overrides, ("", "name"): f"{prefix}-{kind}"})
        df, done = run_sweep(c, settings, out / f"{kind}.parquet")
        complete &= done
        if df is not None:
            frames.append(out / f"{kind}.parquet")
    c.deadline = sweep_end + 5
    num_layers = len(before["loss"])
    rise = {kind: logs[kind]["heldout"]["loss"][num_layers] / before["loss"][num_layers] - 1
            for kind in logs}
    step.details = {"tokens_per_twin": logs["baseline"]["tokens_seen"],
                    "steps_per_twin": logs["baseline"]["steps"], "tokens_available": available,
                    "self_text": generated,
                    # the LayerSkip twin's time share ended its training before its tokens
                    "time_bound": logs["layerskip"]["tokens_seen"] < tokens,
                    "train_s": {k: v["train_s"] for k, v in logs.items()},
                    "heldout_loss_before": before["loss"],
                    "final_loss_rise": rise, "recipe": asdict(twins["layerskip"].recipe),
                    "train": {k: v for k, v in asdict(base).items() if k != "recipe"},
                    "models": names}
    step.markdown = [
        f"Both twins: {logs['baseline']['tokens_seen']:,} tokens in "
        f"{logs['baseline']['steps']} steps from {base.init} ({available:,} training tokens "
        "available, held-out articles excluded"
        + (f", {generated['tokens']:,} of them the model's own sampled continuations of "
           f"training-article openings" if generated else "")
        + "); LayerSkip twin recipe "
        f"{json.dumps(asdict(twins['layerskip'].recipe))}.", "",
        f"Final-layer held-out loss: before {before['loss'][num_layers]:.3f}, baseline twin "
        f"{logs['baseline']['heldout']['loss'][num_layers]:.3f} ({rise['baseline']:+.1%}), "
        f"LayerSkip twin {logs['layerskip']['heldout']['loss'][num_layers]:.3f} "
        f"({rise['layerskip']:+.1%}); limit +{LOSS_RISE_LIMIT:.0%}: "
        + ("ok" if max(rise.values()) <= LOSS_RISE_LIMIT else "EXCEEDED"), ""]
    if len(frames) == 2:
        df = read_results(frames)
        try:
            text, numbers = summary_markdown(df, logs, time.perf_counter() - started,
                                             twins=names)
        except (KeyError, ValueError, TypeError, IndexError) as exc:  # a sweep cut short
            text, numbers = f"(no A/B summary: {one_line(exc)})", {}
        figures = plot_sweep(df, out / "plots")
        step.details["ab"] = json.loads(json.dumps(numbers, default=str))
        step.details["figures"] = [str(p.relative_to(c.out)) for p in figures]
        step.markdown += [text.replace("# LayerSkip A/B", "### LayerSkip A/B", 1), ""]
        step.markdown += [f"![{p.stem}]({p.relative_to(c.out)})" for p in figures]
    if max(rise.values()) > LOSS_RISE_LIMIT:
        step.status, step.reason = "failed", "final-layer held-out loss rose more than 5%"
    elif not complete or len(frames) < 2:
        step.status, step.reason = "partial", "the twins' sweeps reached their share of the budget"


# --- 7. a model across devices --------------------------------------------------------------

def device_map_for(num_layers: int, device: str) -> dict[str, str]:
    """A --device-map file's mapping: on CUDA the embeddings and the first half of the layers
    on cuda:0, the rest with the final norm and the head on the CPU (every hidden state
    crosses once per token fed); on a CPU every module on cpu (the dry run of the same path)."""
    first = "cuda:0" if torch.device(device).type == "cuda" else "cpu"
    half = max(1, num_layers // 2)
    return {"model.embed_tokens": first, "model.rotary_emb": first,
            **{f"model.layers.{i}": first if i < half else "cpu" for i in range(num_layers)},
            "model.norm": "cpu", "lm_head": "cpu"}


def step_devices(c: Check, step: Step) -> None:
    from lsbench.backend.loading import model_num_layers
    from lsbench.reporting.report import sweep_table, to_markdown

    file = ROOT / "sweeps" / "quickstart.toml"
    if not file.is_file():
        raise _Skip(f"{file} not found")
    out = c.dir("devices")
    num_layers = model_num_layers(c.model())
    mapping = device_map_for(num_layers, c.device)
    map_file = out / "device-map.json"
    map_file.write_text(json.dumps(mapping, indent=1))
    split = torch.device(c.device).type == "cuda"
    # The quickstart shortened: 2 examples, a few tokens, layerskip at 2 exit layers.
    layers = [1, 2] if c.tiny else [6, 12]
    overrides: dict = {("", "model"): c.model(), ("", "dtype"): "float32",
                       ("data", "limit"): 2, ("decoding", "max_new_tokens"): 8 if c.tiny else 24,
                       ("sweep", "exit_layers"): layers, ("sweep", "strategies"): ["layerskip"]}
    if c.tiny:
        overrides[("data", "max_input_tokens")] = 64
    settings = sweep_settings(c, file, overrides)
    df, complete = run_sweep(c, settings, out / "devices.parquet", device_map=str(map_file))
    if df is None or df.empty:
        raise OutOfTime
    runs = df.groupby(["strategy", "exit_layer", "num_speculations"], sort=False).agg(
        tokens_per_s=("tokens_per_s", "median"), lossless=("matches_baseline", "all"),
        rows=("example_id", "size")).reset_index()
    half = max(1, num_layers // 2)
    label = (f"embeddings + layers 0-{half - 1} on cuda:0, layers {half}-{num_layers - 1} + "
             "norm + head on cpu" if split
             else "all-cpu map: a dry run of the device-map path, no device boundary")
    step.details = {"device_map": mapping,
                    "device_map_file": str(map_file.relative_to(c.out)),
                    "split": split, "label": label,
                    "device_map_column": sorted(set(df["device_map"].astype(str))),
                    "runs": json.loads(runs.to_json(orient="records")),
                    "lossless": bool(df.loc[~df["is_baseline"], "matches_baseline"].all())}
    step.markdown = [f"Device map ({label}): `{map_file.relative_to(c.out)}`.", "",
                     to_markdown(sweep_table(df).drop(columns=["model", "dataset"]))]
    if not step.details["lossless"]:
        step.status, step.reason = "failed", "an output across devices differed from ar's"
    elif not complete:
        step.status, step.reason = "partial", "the sweep reached its share of the budget"


# --- 8. lsbench scan ---------------------------------------------------------------------------

def step_scan(c: Check, step: Step) -> None:
    """Scan step 6's LayerSkip twin at every exit layer and k = 1..8 on the held-out articles,
    then time the 3 best predicted points with the sweep machinery (`lsbench scan --verify`)."""
    from lsbench.backend.loading import model_num_layers
    from lsbench.reporting import scan_report
    from lsbench.reporting.report import to_markdown
    from lsbench.reporting.scan_plots import plot_scan
    from lsbench.results.store import ResultStore
    from lsbench.scenario.runner import run_job
    from lsbench.scenario.scan import run_scan, scan_spec, verify_job, write_scan
    from lsbench.training.ab import twin_settings

    twin = c.twins.get("layerskip")
    heldout = c.out / "ab" / "heldout-news.jsonl"
    if not twin or not (Path(twin) / "config.json").is_file() or not heldout.is_file():
        raise _Skip("needs the LayerSkip twin of step 6, which did not produce one")
    out = c.dir("scan")
    overrides: dict = {("", "name"): "gpucheck-scan", ("sweep", "exit_layers"): "all",
                       ("sweep", "num_speculations"): "1:3" if c.tiny else "1:8",
                       **heldout_scale(c)}
    settings = twin_settings(twin, heldout.parent, AB_SWEEP_FILE, overrides)
    spec = scan_spec(settings, model_num_layers(twin))
    c.say(f"  scanning {spec.points} points per example...")
    result = run_scan(spec, on_progress=c.progress_guard)
    scan_file, _ = write_scan(result, out / "twin.scan.parquet")
    step.details = {"model": twin, "points_per_example": spec.points,
                    "exit_layers": list(spec.exit_layers), "ks": list(spec.ks),
                    "scan_file": str(scan_file.relative_to(c.out)), "rows": len(result.rows)}
    step.markdown = ["Predicted (no timing of these points): the 10 best of "
                     f"{spec.points} points per example.", "",
                     to_markdown(scan_report.scan_table(result.rows, 10)), ""]
    points = scan_report.top_points(result.rows, 3)
    job = verify_job(spec, points)
    verify_file = out / "verify.parquet"
    verify_file.unlink(missing_ok=True)
    store = ResultStore(verify_file)
    complete = True
    try:
        run_job(job, store, on_progress=c.progress_guard)
    except OutOfTime:
        complete = False
    measured = store.rows() if verify_file.exists() else None
    if measured is not None:
        measured = measured[measured.run_id.isin({job.run_id(r) for r in job.runs})]
        table = scan_report.predicted_vs_measured(result.rows, measured, points)
        step.details["verified"] = json.loads(table.to_json(orient="records"))
        step.markdown += ["Predicted against measured (the 3 best predicted points, timed by "
                          "the sweep machinery):", "", to_markdown(table), ""]
    figures = plot_scan(scan_report.read_scans([scan_file]), out / "plots", "png", measured)
    step.details["figures"] = [str(p.relative_to(c.out)) for p in figures]
    step.markdown += [f"![{p.stem}]({p.relative_to(c.out)})" for p in figures]
    if not complete or len(step.details.get("verified", [])) < len(points):
        step.status, step.reason = "partial", "verifying reached its share of the budget"


class _Skip(Exception):
    """A step's prerequisite is missing: skipped, with this reason."""


STEP_FUNCTIONS: dict[str, Callable[[Check, Step], None]] = {
    "environment": step_environment, "tests": step_tests, "bench": step_bench,
    "compiled": step_compiled,
    "quickstart": step_quickstart, "ab": step_ab, "devices": step_devices, "scan": step_scan,
}
DEPENDS = {"bench": "environment", "compiled": "environment", "quickstart": "environment",
           "ab": "environment", "devices": "environment"}


# --- orchestration and summaries -----------------------------------------------------------

def run_gpucheck(out: Path, budget: float, device: str, tiny: bool = False,
                 say: Callable[[str], None] = print, **options) -> list[Step]:
    from lsbench.backend.loading import resolve_device

    device = resolve_device(device)
    out.mkdir(parents=True, exist_ok=True)
    c = Check(out=out, device=device, tiny=tiny, say=say, **options)
    start = time.perf_counter()
    end = start + budget
    steps: list[Step] = []
    for i, (name, weight, minimum) in enumerate(STEPS):
        now = time.perf_counter()
        share = max(0.0, end - now) * weight / sum(w for _, w, _ in STEPS[i:])
        step = Step(name, share_s=share)
        need = minimum[1] if tiny else minimum[0]
        prerequisite = DEPENDS.get(name)
        if prerequisite and next(s for s in steps if s.name == prerequisite).status != "ok":
            step.reason = f"needs the {prerequisite} step, which did not succeed"
        elif share < need:
            step.reason = (f"out of time: a share of {share:.0f} s of the {budget:.0f} s "
                           f"budget, needs at least {need:.0f} s")
        else:
            say(f"[{i + 1}/{len(STEPS)}] {name} (up to {share:.0f} s)")
            c.deadline = now + share
            step.status = "ok"
            try:
                STEP_FUNCTIONS[name](c, step)
            except _Skip as exc:
                step.status, step.reason = "skipped", str(exc)
            except OutOfTime:
                step.status = "partial" if step.details or step.markdown else "skipped"
                step.reason = f"reached its share of the budget ({share:.0f} s)"
            except Exception as exc:  # a failed step must not cost the others their turn
                step.status, step.reason = "failed", one_line(f"{type(exc).__name__}: {exc}")
                (c.dir(name) / "error.txt").write_text(traceback.format_exc())
        step.seconds = time.perf_counter() - now
        if step.status != "ok":
            say(f"    {step.status}: {step.reason}")
        steps.append(step)
        write_summary(c, steps, budget, time.perf_counter() - start)
    return steps


def write_summary(c: Check, steps: list[Step], budget: float, wall_s: float) -> None:
    env = next((s.details for s in steps if s.name == "environment"), {})
    data = {"device": c.device, "tiny": c.tiny, "budget_s": budget, "wall_s": wall_s,
            "steps": [asdict(s) for s in steps]}
    (c.out / "summary.json").write_text(json.dumps(data, indent=1, default=str))
    title = "tiny dry run on CPU" if c.tiny and c.device == "cpu" else c.device
    lines = [f"# lsbench gpu-check: {env.get('device_name', c.device)} ({title})", "",
             f"Budget {budget:.0f} s, used {wall_s:.0f} s. Each step ran within its share of "
             "what was left; a skipped step says why.", "",
             "| step | status | seconds | share | reason |", "|---|---|---:|---:|---|"]
    lines += [f"| {s.name} | {s.status} | {s.seconds:.0f} | {s.share_s:.0f} | "
              f"{s.reason.replace('|', '/')} |" for s in steps]
    for s in steps:
        if s.markdown:
            lines += ["", f"## {s.name}", "", *s.markdown]
    (c.out / "summary.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("results/gpu"))
    parser.add_argument("--budget", type=float, default=480.0, help="wall-clock seconds")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="toy scale (CPU dry run)")
    parser.add_argument("--model", default="smollm2-135m",
                        help="model of steps 3-6 (step 6 continues training it)")
    parser.add_argument("--epochs", type=float, default=3.0,
                        help="training passes over the text per twin (unless --train-tokens)")
    parser.add_argument("--train-tokens", type=int, default=0, help="tokens per twin")
    parser.add_argument("--lr", type=float, default=1e-4, help="twins' peak learning rate")
    parser.add_argument("--self-tokens", type=int, default=None,
                        help="tokens of the model's own sampled text added to the training "
                        "text (default 1,000,000; 64 with --tiny; 0: none)")
    args = parser.parse_args(argv)
    if args.budget <= 0:
        raise LsbenchError("--budget must be positive")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    steps = run_gpucheck(args.out, args.budget, args.device, args.tiny,
                         say=lambda m: print(m, flush=True), epochs=args.epochs,
                         train_tokens=args.train_tokens, lr=args.lr, model_ref=args.model,
                         self_tokens=(args.self_tokens if args.self_tokens is not None
                                      else 64 if args.tiny else 1_000_000))
    print(f"summary: {args.out / 'summary.md'}")
    return 1 if any(s.status == "failed" for s in steps) else 0


if __name__ == "__main__":
    run_main(main)
