"""The `lsbench` command line: the only module that talks to the terminal.

Exit codes: 0 success, 1 a problem with the input (one line on stderr), 2 bad usage,
130 interrupted (everything measured so far is kept; rerun the same command to resume).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from lsbench import __version__
from lsbench.errors import LsbenchError

# Libraries' own tqdm bars (GGUF conversion, weight loading) would garble rich's progress.
os.environ.setdefault("TQDM_DISABLE", "1")

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Benchmark early-exit self-speculative decoding (LayerSkip) against "
                       "autoregressive and two-model speculative decoding.")
# Tables are wide; when a stream is not a terminal rich would wrap them at 80 columns
# (wide enough for the sweep table with every optional column).
err = Console(stderr=True, width=None if sys.stderr.isatty() else 200)
out = Console(width=None if sys.stdout.isatty() else 200)

EXIT_ERROR, EXIT_INTERRUPTED = 1, 130


def _fail(message: str) -> typer.Exit:
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    return typer.Exit(EXIT_ERROR)


def _guarded(body: Callable[[], None], out_path: Path | None = None) -> None:
    """Run a command body: one line for user errors, a resume hint on Ctrl-C."""
    try:
        body()
    except LsbenchError as exc:
        raise _fail(str(exc)) from None
    except KeyboardInterrupt:
        where = f" in {escape(str(out_path))}" if out_path else ""
        err.print(f"[yellow]interrupted:[/] completed measurements are saved{where}; "
                  "rerun the same command to resume")
        raise typer.Exit(EXIT_INTERRUPTED) from None


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


# --- shared options -------------------------------------------------------------------------

Model = Annotated[str | None, typer.Option("--model", "-m", help="Embedded name "
                  "(smollm2-135m), hub id, model directory or .gguf file.")]
Dataset = Annotated[str | None, typer.Option(help="cnn_dailymail, xsum, lee-news, wiki-lead "
                    "or jsonl:PATH.")]
Limit = Annotated[int | None, typer.Option(help="Number of examples (same seed-chosen subset "
                  "for every run).")]
Speculations = Annotated[str | None, typer.Option("--num-speculations", "-k",
                         help="Draft tokens per round: list like 2,4,8.")]
BatchSizes = Annotated[str | None, typer.Option("--batch-size", help="Examples decoded "
                      "together (static batching): list like 1,4,16, each a sweep point with "
                      "its own ar baseline (default 1).")]
MaxNew = Annotated[int | None, typer.Option(help="Tokens to generate per example.")]
Repeats = Annotated[int | None, typer.Option(help="Measured repeats per example.")]
Warmup = Annotated[int | None, typer.Option(help="Unmeasured warm-up generations per run.")]
Sample = Annotated[bool | None, typer.Option("--sample/--greedy", help="Sampling or greedy.")]
Temperature = Annotated[float | None, typer.Option(help="Sampling temperature.")]
TopP = Annotated[float | None, typer.Option(help="Nucleus sampling threshold.")]
TopK = Annotated[int | None, typer.Option(help="Top-k sampling (0: off).")]
Seed = Annotated[int | None, typer.Option(help="Sampling seed.")]
DType = Annotated[str | None, typer.Option(help="float32, bfloat16, float16 or auto "
                  "(fp32 on CPU, bf16 on CUDA).")]
Device = Annotated[str | None, typer.Option(help="cpu, cuda, cuda:N or auto.")]
MaxInput = Annotated[int | None, typer.Option(help="Article token budget; longer articles "
                     "are truncated.")]
PromptFormat = Annotated[str | None, typer.Option(help="chat (the tokenizer's chat template), "
                         "article-summary ('Article: ...\\nSummary:', the LayerSkip "
                         "benchmark's) or plain (the article alone); default chat where the "
                         "tokenizer has a template, else article-summary.")]
NShot = Annotated[int | None, typer.Option(help="Prepend N examples with their reference "
                  "summaries (the train split; the other examples where there is none).")]
Stop = Annotated[list[str] | None, typer.Option(help="Stop string (repeatable): the output "
                 "is cut at it; a one-token string also stops decoding.")]
Out = Annotated[Path | None, typer.Option("--out", "-o", help="Parquet results file "
                "(default results/<name>.parquet).")]
Threads = Annotated[int | None, typer.Option(help="torch CPU threads (default: torch's).")]
Force = Annotated[bool, typer.Option(help="Redo runs already in the results file.")]
Ray = Annotated[str | None, typer.Option(help="Run on a Ray cluster: local:N (N workers on "
                "this machine), auto or ADDRESS (an existing cluster); needs lsbench[cluster].")]
DeviceMap = Annotated[str | None, typer.Option(help="Spread target and draft over devices "
                      "(accelerate): auto, balanced or FILE.json (module name -> device).")]
Compile = Annotated[bool | None, typer.Option("--compile/--no-compile", help="Decode "
                    "through the compiled engine (torch.compile, compiled in warm-up; time "
                    "in compile_s). Default: on for CUDA, off (eager) on CPU.")]
Shard = Annotated[str | None, typer.Option(help="I/N: measure only shard I of N (every N-th "
                  "example, or batch with --batch-size), into <out>.shard-I-of-N.parquet; "
                  "combine with lsbench merge.")]


def _settings(file: Path | None, overrides: dict[tuple[str, str], object], *, model, dataset,
              limit, max_input_tokens, max_new_tokens, sample, temperature, top_p, top_k,
              seed, dtype, device, threads, prompt_format=None, n_shot=None, stop=None):
    """The file's settings with the command's options on top: the options every measuring
    command shares (model, data, prompt, decoding, device) and the command's own
    `overrides`."""
    from lsbench.scenario.jobs import Settings

    s = Settings.from_file(file)
    shared = {
        ("", "model"): model, ("data", "dataset"): dataset, ("data", "limit"): limit,
        ("data", "max_input_tokens"): max_input_tokens,
        ("decoding", "max_new_tokens"): max_new_tokens, ("decoding", "sample"): sample,
        ("decoding", "temperature"): temperature, ("decoding", "top_p"): top_p,
        ("decoding", "top_k"): top_k, ("decoding", "seed"): seed, ("", "dtype"): dtype,
        ("", "device"): device, ("", "threads"): threads,
        ("data", "prompt_format"): prompt_format, ("data", "n_shot"): n_shot,
        ("decoding", "stop"): stop or None}
    for (section, key), value in {**shared, **overrides}.items():
        s.override(section, key, value)
    return s


def _measure(job_builder: Callable[[object, int], object], settings, out_path: Path | None,
             force: bool, title: str, shard_text: str | None = None,
             ray_text: str | None = None, device_map: str | None = None) -> None:
    """Validate, run with a progress bar, print the results table."""
    from lsbench.launcher.shards import parse_shard, shard_path
    from lsbench.results.store import ResultStore
    from lsbench.scenario.jobs import JobSpec
    from lsbench.scenario.runner import validate

    shard = parse_shard(shard_text) if shard_text is not None else None
    ray_target = None
    if ray_text is not None:
        from lsbench.launcher.ray_cluster import import_ray, parse_ray

        ray_target = parse_ray(ray_text)
        if device_map:
            raise LsbenchError("--device-map and --ray do not combine: a Ray worker owns one "
                               "device")
        import_ray()  # the install hint before anything is loaded
    if device_map:
        from lsbench.backend.loading import parse_device_map

        parse_device_map(device_map)
    model = settings.get("", "model")
    if not model:
        raise LsbenchError("no model given: pass --model or a sweep file that sets model")
    # Refuse unknown models, datasets and out-of-range layers before loading anything.
    from lsbench.backend.loading import model_num_layers
    from lsbench.scenario.data import check_dataset

    check_dataset(settings.get("data", "dataset", "lee-news"))
    num_layers = model_num_layers(model, settings.get("", "revision"))
    job: JobSpec = job_builder(settings, num_layers)
    validate(job)  # draft models too, before the header and the results file
    path = out_path or Path("results") / f"{job.name}.parquet"
    if shard:
        path = shard_path(path, shard)
        title = f"{title} shard {shard[0]}/{shard[1]}"
    store = ResultStore(path)
    with store.locked():  # refuses a second writer before anything is loaded
        _run_with_progress(job, store, path, num_layers, force, title, shard, ray_target,
                           device_map)


def _run_with_progress(job, store, path: Path, num_layers: int, force: bool, title: str,
                       shard: tuple[int, int] | None, ray_target, device_map: str | None
                       ) -> None:
    from functools import partial

    from lsbench.scenario.runner import run_job

    run = partial(run_job, device_map=device_map) if device_map else run_job
    if ray_target is not None:
        from lsbench.launcher.ray_cluster import run_job_on_ray

        run = partial(run_job_on_ray, target=ray_target)

    _quiet_libraries()
    err.print(f"[bold]{title}[/] {escape(job.model)} ({num_layers} layers) on "
              f"{escape(job.dataset.name)} x{job.dataset.limit}: {len(job.runs)} runs, "
              f"in a shuffled order per example"
              f"{', compiled engine' if job.compiled else ''} -> {escape(str(path))}",
              highlight=False)
    with Progress(TextColumn("[progress.description]{task.description}"), BarColumn(),
                  MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("eta"),
                  TimeRemainingColumn(), console=err, transient=False) as progress:
        task = progress.add_task("loading", total=None)

        def on_progress(event) -> None:
            progress.update(task, total=event.total or None, completed=event.done,
                            description=escape(f"{event.phase}: {event.detail}"
                                               if event.phase != "done" else "done"))

        try:
            outcome = run(job, store, force=force, on_progress=on_progress, shard=shard)
        except KeyboardInterrupt:
            progress.stop()
            raise
    err.print(f"measured {outcome.measured} generations, {outcome.skipped} already in "
              f"{escape(str(path))}", highlight=False)
    df = store.rows()
    df = df[df.run_id.isin({job.run_id(r) for r in job.runs})]
    _print_sweep_table(df)


def _print_sweep_table(df) -> None:
    from lsbench.reporting.terminal import sweep_renderables

    for item in sweep_renderables(df):
        if isinstance(item, str):  # a verdict line: plain text, no markup, no highlighting
            out.print(item, markup=False, highlight=False, soft_wrap=True)
        else:
            out.print(item)


# --- commands -------------------------------------------------------------------------------

@app.command()
def sweep(
    sweep_file: Annotated[Path | None, typer.Argument(help="TOML sweep file (sweeps/*.toml); "
                                                      "options override it.")] = None,
    model: Model = None, dataset: Dataset = None, limit: Limit = None,
    exit_layers: Annotated[str | None, typer.Option("--exit-layers", "-e", help="List 4,8,12, "
                           "range start:stop:step (stop included) or all.")] = None,
    num_speculations: Speculations = None, batch_size: BatchSizes = None,
    strategy: Annotated[list[str] | None, typer.Option(help="layerskip (default), "
                        "hf-early-exit (transformers' assistant_early_exit), pld (prompt "
                        "lookup, swept over k), hf-pld (transformers' prompt lookup), exit "
                        "(early exit without verification: lossy).")] = None,
    max_new_tokens: MaxNew = None, repeats: Repeats = None, warmup: Warmup = None,
    sample: Sample = None, temperature: Temperature = None, top_p: TopP = None,
    top_k: TopK = None, seed: Seed = None, dtype: DType = None, device: Device = None,
    max_input_tokens: MaxInput = None, threads: Threads = None, out: Out = None,
    force: Force = False, shard: Shard = None, ray: Ray = None, device_map: DeviceMap = None,
    prompt_format: PromptFormat = None, n_shot: NShot = None, stop: Stop = None,
    compile_: Compile = None,
    top: Annotated[int | None, typer.Option(help="With --exit-layers auto: run lsbench scan "
                   "first and measure only its N best predicted points.")] = None,
) -> None:
    """Early-exit self-speculative decoding across exit layers, beside an autoregressive
    baseline measured in the same process on the same prompts."""
    from lsbench.scenario.jobs import sweep_job

    def body() -> None:
        s = _settings(sweep_file, {
            ("sweep", "exit_layers"): exit_layers, ("sweep", "num_speculations"): num_speculations,
            ("sweep", "strategies"): strategy or None, ("sweep", "repeats"): repeats,
            ("sweep", "warmup"): warmup, ("sweep", "compile"): compile_,
            ("sweep", "batch_sizes"): batch_size},
            model=model, dataset=dataset, limit=limit, max_input_tokens=max_input_tokens,
            max_new_tokens=max_new_tokens, sample=sample, temperature=temperature, top_p=top_p,
            top_k=top_k, seed=seed, dtype=dtype, device=device, threads=threads,
            prompt_format=prompt_format, n_shot=n_shot, stop=stop)
        if s.get("sweep", "exit_layers") == "auto":
            if shard is not None or device_map is not None:
                raise LsbenchError("--exit-layers auto scans first; drop --shard and "
                                   "--device-map")
            if s.get("sweep", "batch_sizes") not in (None, 1, [1], "1"):
                raise LsbenchError("--exit-layers auto measures batch size 1 only; give the "
                                   "exit layers to sweep with --batch-size")
            _auto_sweep(s, top, out, force, ray)
        elif top is not None:
            raise LsbenchError("--top needs --exit-layers auto")
        else:
            _measure(sweep_job, s, out, force, "sweep", shard, ray, device_map)

    _guarded(body, out)


@app.command()
def compare(
    compare_file: Annotated[Path | None, typer.Argument(help="TOML file with a [compare] "
                                                        "section; options override it.")] = None,
    model: Model = None,
    draft: Annotated[list[str] | None, typer.Option(help="Draft model (repeatable); must "
                     "share the target's tokenizer. 'pld': prompt lookup, no model.")] = None,
    early_exit: Annotated[list[str] | None, typer.Option(help="Early-exit layer (repeatable, "
                          "or a list 4,8).")] = None,
    num_speculations: Speculations = None, batch_size: BatchSizes = None,
    hf_reference: Annotated[bool | None, typer.Option("--hf-reference/--no-hf-reference",
                            help="Also run transformers' assisted generation, "
                            "assistant_early_exit and prompt lookup.")] = None,
    dataset: Dataset = None, limit: Limit = None, max_new_tokens: MaxNew = None,
    repeats: Repeats = None, warmup: Warmup = None, sample: Sample = None,
    temperature: Temperature = None, top_p: TopP = None, top_k: TopK = None, seed: Seed = None,
    dtype: DType = None, device: Device = None, max_input_tokens: MaxInput = None,
    threads: Threads = None, out: Out = None, force: Force = False, shard: Shard = None,
    ray: Ray = None, device_map: DeviceMap = None, compile_: Compile = None,
    prompt_format: PromptFormat = None, n_shot: NShot = None, stop: Stop = None,
) -> None:
    """A target model with draft models and early exit side by side (the blog's table)."""
    from lsbench.scenario.jobs import compare_job

    def body() -> None:
        s = _settings(compare_file, {
            ("compare", "drafts"): draft or None,
            ("compare", "early_exit"): ",".join(early_exit) if early_exit else None,
            ("compare", "num_speculations"): num_speculations,
            ("compare", "hf_reference"): hf_reference, ("compare", "repeats"): repeats,
            ("compare", "warmup"): warmup, ("compare", "compile"): compile_,
            ("compare", "batch_sizes"): batch_size},
            model=model, dataset=dataset, limit=limit, max_input_tokens=max_input_tokens,
            max_new_tokens=max_new_tokens, sample=sample, temperature=temperature, top_p=top_p,
            top_k=top_k, seed=seed, dtype=dtype, device=device, threads=threads,
            prompt_format=prompt_format, n_shot=n_shot, stop=stop)
        if not s.get("", "name"):
            s.override("", "name", "compare")
        _measure(compare_job, s, out, force, "compare", shard, ray, device_map)

    _guarded(body, out)


@app.command()
def scan(
    sweep_file: Annotated[Path | None, typer.Argument(help="TOML sweep file (sweeps/*.toml); "
                                                      "options override it.")] = None,
    model: Model = None,
    draft: Annotated[list[str] | None, typer.Option(help="Draft model to scan as spec "
                     "(repeatable); must share the target's tokenizer.")] = None,
    exit_layers: Annotated[str | None, typer.Option("--exit-layers", "-e", help="Exit layers "
                           "to replay (default every layer 1..L-1).")] = None,
    num_speculations: Annotated[str | None, typer.Option("--num-speculations", "-k",
                                help="Draft lengths to replay (default 1:8).")] = None,
    thresholds: Annotated[str | None, typer.Option(help="Confidence thresholds of the "
                          "layerskip-conf drafter, e.g. 0.3,0.5 (default 0.3,0.5,0.7,0.9).")]
    = None,
    pld: Annotated[bool, typer.Option("--pld/--no-pld", help="Also replay prompt lookup "
                   "(strategy pld) at every k.")] = True,
    batch_size: Annotated[str | None, typer.Option("--batch-size", help="Also predict the "
                          "batch curve at these batch sizes (list like 1,4,16): layerskip "
                          "and pld speedup on ar of the same batch, and the crossover; "
                          "--verify then times its points at each.")] = None,
    verify: Annotated[int, typer.Option(help="Then time the N best predicted points plus two "
                      "random ones with the sweep machinery (into results/<name>.parquet) "
                      "and print predicted against measured.")] = 0,
    dataset: Dataset = None, limit: Limit = None, max_new_tokens: MaxNew = None,
    repeats: Repeats = None, warmup: Warmup = None, sample: Sample = None,
    temperature: Temperature = None, top_p: TopP = None, top_k: TopK = None, seed: Seed = None,
    dtype: DType = None, device: Device = None, max_input_tokens: MaxInput = None,
    threads: Threads = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Scan file (default "
                   "results/<name>.scan.parquet; traces go to <out>.trace.parquet).")] = None,
    ray: Ray = None, compile_: Compile = None,
    prompt_format: PromptFormat = None, n_shot: NShot = None, stop: Stop = None,
) -> None:
    """Predict the whole exit-layer x k surface (greedy) from one teacher-forced pass per
    example: exact acceptance and rounds, and speedup priced with measured unit costs."""
    def body() -> None:
        s = _settings(sweep_file, {
            ("sweep", "exit_layers"): exit_layers, ("sweep", "num_speculations"): num_speculations,
            ("sweep", "repeats"): repeats, ("sweep", "warmup"): warmup,
            ("sweep", "compile"): compile_, ("sweep", "batch_sizes"): batch_size},
            model=model, dataset=dataset, limit=limit, max_input_tokens=max_input_tokens,
            max_new_tokens=max_new_tokens, sample=sample, temperature=temperature, top_p=top_p,
            top_k=top_k, seed=seed, dtype=dtype, device=device, threads=threads,
            prompt_format=prompt_format, n_shot=n_shot, stop=stop)
        _scan(s, draft or [], thresholds, verify, out, pld=pld, ray_text=ray)

    _guarded(body, out)


def _ray_target(ray_text: str | None):
    """--ray parsed, and the install hint before anything is loaded; None without --ray."""
    if ray_text is None:
        return None
    from lsbench.launcher.ray_cluster import import_ray, parse_ray

    target = parse_ray(ray_text)
    import_ray()
    return target


def _auto_sweep(settings, top: int | None, out_path: Path | None, force: bool,
                ray_text: str | None = None) -> None:
    """`sweep --exit-layers auto --top N`: scan every exit layer, measure the N best points."""
    from lsbench.reporting import scan_report
    from lsbench.results.store import ResultStore
    from lsbench.scenario.scan import verify_job

    if top is None or top < 1:
        raise LsbenchError("--exit-layers auto needs --top N (N >= 1): the number of best "
                           "predicted points to measure")
    settings.raw.setdefault("sweep", {}).pop("exit_layers")
    name = settings.get("", "name") or (Path(settings.source).stem if settings.source
                                        else "sweep")
    settings.override("", "name", name)
    path = out_path or Path("results") / f"{name}.parquet"
    scan_path = path.with_name(path.name.removesuffix(".parquet") + ".scan.parquet")
    spec, rows, _ = _scan(settings, [], None, 0, scan_path, ray_text=ray_text)
    job = verify_job(spec, scan_report.top_points(rows, top))
    store = ResultStore(path)
    if force:
        store.drop_runs({job.run_id(r) for r in job.runs})
    _run_job_with_progress(job, store, "sweep", _ray_target(ray_text))
    df = store.rows()
    _print_sweep_table(df[df.run_id.isin({job.run_id(r) for r in job.runs})])


def _parse_thresholds(text: str | None) -> tuple[float, ...]:
    from lsbench.scenario.scan import DEFAULT_THRESHOLDS

    if text is None:
        return DEFAULT_THRESHOLDS
    try:
        return tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise LsbenchError(f"cannot parse thresholds '{text}': use a list like 0.3,0.5") from None


def _scan(settings, drafts: list[str], thresholds: str | None, verify: int,
          out_path: Path | None, *, pld: bool = True, ray_text: str | None = None):
    """Run a scan with a progress bar, write its files, print its tables; returns the spec,
    the scan rows and the path."""
    from lsbench.backend.loading import locate_model, model_num_layers
    from lsbench.reporting import scan_report
    from lsbench.scenario.data import check_dataset
    from lsbench.scenario.scan import run_scan, scan_spec, write_scan

    model = settings.get("", "model")
    if not model:
        raise LsbenchError("no model given: pass --model or a sweep file that sets model")
    if settings.get("decoding", "sample"):
        from lsbench.scenario.scan import SAMPLING_REFUSED

        raise LsbenchError(SAMPLING_REFUSED)
    if verify < 0:
        raise LsbenchError(f"--verify must be >= 0, got {verify}")
    ray_target = _ray_target(ray_text)
    check_dataset(settings.get("data", "dataset", "lee-news"))
    for ref in drafts:
        locate_model(ref)
    num_layers = model_num_layers(model, settings.get("", "revision"))
    spec = scan_spec(settings, num_layers, drafts=drafts,
                     thresholds=_parse_thresholds(thresholds), pld=pld)
    path = out_path or Path("results") / f"{spec.job.name}.scan.parquet"
    if ray_target is not None and spec.batch_sizes != (1,):
        raise LsbenchError("--batch-size and --ray do not combine in a scan: the batch "
                           "curve's unit costs are measured in one process")
    from lsbench.scenario.scan import trace_path

    for target in (path, trace_path(path)):
        scan_report.check_scan_target(target)
    _quiet_libraries()
    err.print(f"[bold]scan[/] {escape(spec.job.model)} ({num_layers} layers) on "
              f"{escape(spec.job.dataset.name)} x{spec.job.dataset.limit}: {spec.points} points "
              f"per example -> {escape(str(path))}", highlight=False)
    with Progress(TextColumn("[progress.description]{task.description}"), BarColumn(),
                  MofNCompleteColumn(), TimeElapsedColumn(), console=err) as progress:
        task = progress.add_task("loading", total=None)

        def on_progress(event) -> None:
            progress.update(task, total=event.total or None, completed=event.done,
                            description=escape(f"{event.phase}: {event.detail}"))

        if ray_target is not None:
            from lsbench.launcher.ray_cluster import run_scan_on_ray

            result = run_scan_on_ray(spec, ray_target, on_progress)
        else:
            result = run_scan(spec, on_progress)
    written = write_scan(result, path)
    for p in written:
        err.print(f"wrote {escape(str(p))}", highlight=False)
    _print_frame(scan_report.policies(result.rows), "adaptive policies (predicted, over all "
                 "examples; regret against the per-example oracle)")
    _print_frame(scan_report.scan_table(result.rows, 10), "best predicted points")
    if result.batch is not None:
        _print_batch_curve(result.batch)
    if verify:
        _verify(spec, result.rows, verify, path, ray_target)
    return spec, result.rows, path


def _print_batch_curve(batch) -> None:
    """The predicted batch curve and, per setting, its predicted crossover."""
    import pandas as pd

    from lsbench.scenario.scan import batch_curve

    curve = batch_curve(batch)
    _print_frame(curve.rename(columns={"exit_layer": "exit layer", "num_speculations": "k",
                                       "batch_size": "batch",
                                       "predicted_speedup": "predicted speedup",
                                       "predicted_crossover": "predicted crossover"}),
                 "predicted speedup on ar of the same batch (median over rows)")
    for (strategy, e, k), g in curve.groupby(["strategy", "exit_layer", "num_speculations"],
                                             sort=False):
        name = f"{strategy} E={e} k={k}" if strategy == "layerskip" else f"{strategy} k={k}"
        cross = g["predicted_crossover"].iloc[0]
        verdict = ("slower than ar at every batch size" if pd.isna(cross)
                   else f"faster than ar up to batch size {cross}")
        out.print(f"predicted crossover: {name} {verdict}", markup=False, highlight=False)


def _verify(spec, rows, n: int, scan_path: Path, ray_target=None) -> None:
    """Time the n best predicted points plus two random ones the ordinary way."""
    from lsbench.reporting import scan_report
    from lsbench.results.store import ResultStore
    from lsbench.scenario.scan import verify_job

    points = scan_report.top_points(rows, n, random_extra=2, seed=spec.job.decoding.seed)
    job = verify_job(spec, points)
    results_path = scan_path.with_name(scan_path.name.replace(".scan.parquet", ".parquet")
                                       if scan_path.name.endswith(".scan.parquet")
                                       else scan_path.stem + ".verify.parquet")
    _run_job_with_progress(job, ResultStore(results_path), "verify", ray_target)
    measured = ResultStore(results_path).rows()
    measured = measured[measured.run_id.isin({job.run_id(r) for r in job.runs})]
    one = {job.run_id(r) for r in job.runs if r.batch_size == 1}
    if one:  # the scan's own predictions are batch 1's
        _print_frame(scan_report.predicted_vs_measured(rows, measured[measured.run_id.isin(one)],
                                                       points),
                     f"predicted vs measured ({escape(str(results_path))})")
    if len(one) < len(job.runs):  # with --batch-size: measured at every batch size
        from lsbench.reporting.report import batch_table

        _print_frame(batch_table(measured), "measured at every batch size (compare with the "
                     "predicted batch curve above)")


def _run_job_with_progress(job, store, title: str, ray_target=None) -> None:
    from functools import partial

    from lsbench.scenario.runner import run_job

    run = run_job
    if ray_target is not None:
        from lsbench.launcher.ray_cluster import run_job_on_ray

        run = partial(run_job_on_ray, target=ray_target)

    err.print(f"[bold]{title}[/] {len(job.runs)} runs -> {escape(str(store.path))}",
              highlight=False)
    with Progress(TextColumn("[progress.description]{task.description}"), BarColumn(),
                  MofNCompleteColumn(), TimeElapsedColumn(), console=err) as progress:
        task = progress.add_task("loading", total=None)

        def on_progress(event) -> None:
            progress.update(task, total=event.total or None, completed=event.done,
                            description=escape(f"{event.phase}: {event.detail}"))

        run(job, store, on_progress=on_progress)


def _print_frame(frame, title: str) -> None:
    from lsbench.reporting.report import to_markdown

    out.print(f"\n{title}", highlight=False)
    out.print(escape(to_markdown(frame)), highlight=False, soft_wrap=True)


Results = Annotated[list[Path], typer.Argument(help="Parquet results files.")]


@app.command()
def plot(
    results: Results,
    out: Annotated[Path, typer.Option("--out", "-o", help="Figure directory.")] = Path("plots"),
    fmt: Annotated[str, typer.Option("--format", "-f", help="png, svg or pdf.")] = "png",
) -> None:
    """Tokens/s, speedup and acceptance vs exit layer; speedup per draft option."""
    from lsbench.reporting.plots import plot_compare, plot_sweep
    from lsbench.results.store import read_results

    def body() -> None:
        from lsbench.reporting import scan_report
        from lsbench.reporting.scan_plots import plot_scan

        scans = [p for p in results if scan_report.is_scan_file(p)]
        rest = [p for p in results if p not in scans]
        if scans:  # scan files, annotated with the speedups measured in any results files
            measured = read_results(rest) if rest else None
            paths = plot_scan(scan_report.read_scans(scans), out, fmt, measured)
            if not paths:
                raise LsbenchError("nothing to plot: the scan files have no layerskip rows")
            for p in paths:
                _print_path(p)
            return
        df = read_results(results)
        paths = plot_sweep(df, out, fmt) + plot_compare(df, out, fmt)
        if not paths:
            raise LsbenchError("nothing to plot: the results have no early-exit or draft runs")
        for p in paths:
            _print_path(p)

    _guarded(body)


def _print_path(path: Path) -> None:
    # A function of its own because the commands' `--out` parameter shadows the console.
    out.print(str(path), highlight=False)


@app.command()
def report(
    results: Results,
    fmt: Annotated[str, typer.Option("--format", "-f", help="md, csv, html (one self-contained "
                   "page: settings, every table, the plots, the lossless audit; needs --out) or "
                   "json (the lsbench-report/1 document).")] = "md",
    table: Annotated[str, typer.Option(help="blog (the LayerSkip blog's table, correctly "
                     "labelled), summary (every statistic per run), sweep or batch "
                     "(aggregate throughput and speedup per batch size, with the "
                     "crossover); md and csv only (html and json hold them all).")] = "blog",
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Write to FILE instead of "
                   "stdout.")] = None,
) -> None:
    """Tables from results files: Markdown for people, CSV for tools, an HTML page to share,
    JSON for scripts."""
    from lsbench.reporting import report as rep
    from lsbench.results.store import read_results

    def body() -> None:
        from lsbench.reporting import scan_report

        if fmt not in FORMATS:
            raise LsbenchError(f"unknown format '{fmt}'; choose {', '.join(FORMATS)}")
        if fmt == "html" and out is None:
            raise LsbenchError("--format html writes a file: give --out FILE.html")
        scans = [p for p in results if scan_report.is_scan_file(p)]
        rest = [p for p in results if p not in scans]
        if fmt in ("html", "json"):
            _write_report(_document(fmt, rest, scans), out)
            return
        if scans:  # scan files get the predicted surface and the adaptive-policy table
            if rest:
                raise LsbenchError("give either scan files or results files, not both")
            df = scan_report.read_scans(scans)
            render = rep.to_markdown if fmt == "md" else rep.to_csv
            text = render(scan_report.scan_table(df)) + "\n" + render(scan_report.policies(df))
            _write_report(text, out)
            return
        builders = {"blog": rep.blog_table, "summary": rep.summarize, "sweep": rep.sweep_table,
                    "batch": rep.batch_table}
        if table not in builders:
            raise LsbenchError(f"unknown table '{table}'; choose {', '.join(builders)}")
        rows = read_results(results)
        _warn_mixed_devices(rows)
        frame = builders[table](rows)
        text = rep.to_markdown(frame) if fmt == "md" else rep.to_csv(frame)
        _write_report(text, out)

    _guarded(body)


FORMATS = ("md", "csv", "html", "json")


def _warn_mixed_devices(rows) -> None:
    from lsbench.reporting.report import mixed_device_warnings

    for line in mixed_device_warnings(rows):
        err.print(f"[yellow]warning:[/] {escape(line)}", highlight=False, soft_wrap=True)


def _document(fmt: str, results: list[Path], scans: list[Path]) -> str:
    """The HTML page or JSON document of results files and scan files (either may be empty)."""
    from lsbench.reporting import scan_report
    from lsbench.reporting.report import to_json
    from lsbench.results.store import read_results

    rows = read_results(results) if results else None
    if rows is not None:
        if rows.empty:
            raise LsbenchError("the results files hold no rows")
        _warn_mixed_devices(rows)
    scan_rows = scan_report.read_scans(scans) if scans else None
    sources = [str(p) for p in [*results, *scans]]
    points = None if scan_rows is None else scan_report.scan_table(scan_rows)
    policies = None if scan_rows is None else scan_report.policies(scan_rows)
    if fmt == "json":
        return to_json(rows, sources, points, policies)
    from lsbench.reporting.html import html_report
    from lsbench.reporting.scan_plots import scan_figures

    scan = None if scan_rows is None else (points, policies, scan_figures(scan_rows, rows))
    return html_report(rows, sources, scan)


def _write_report(text: str, path: Path | None) -> None:
    if path is None:
        sys.stdout.write(text)
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise LsbenchError(f"cannot write {path}: {exc.strerror or exc}") from None
    err.print(f"wrote {escape(str(path))}", highlight=False)


@app.command()
def merge(
    out: Annotated[Path, typer.Argument(help="New results file to write.")],
    shard_files: Annotated[list[Path], typer.Argument(help="Shard files of one job.")],
) -> None:
    """Combine the shard files of one job (--shard I/N) into one results file."""
    from lsbench.launcher.shards import merge as merge_shards

    def body() -> None:
        rows = merge_shards(out, shard_files)
        err.print(f"merged {rows} rows from {len(shard_files)} files into {escape(str(out))}",
                  highlight=False)

    _guarded(body)


@app.command()
def compact(
    results: Annotated[Path, typer.Argument(help="Parquet results file.")],
) -> None:
    """Fold the part files of a results file into it (jobs do this when they end)."""
    from lsbench.results.store import ResultStore, parts_dir

    def body() -> None:
        if not results.exists() and not parts_dir(results).is_dir():
            raise LsbenchError(f"results file {results} not found")
        store = ResultStore(results)
        with store.locked():
            folded = store.compact()
        err.print(f"{results}: {len(store.rows())} rows"
                  + ("" if folded else ", nothing to compact"), highlight=False)

    _guarded(body)


@app.command()
def train(
    out: Annotated[str, typer.Argument(help="A name (saved in the lsbench cache, then usable as "
                                       "--model NAME) or a directory path.")],
    recipe: Annotated[str, typer.Option(help="layerskip (layer dropout + early-exit loss) or "
                                        "baseline (both off).")] = "layerskip",
    size: Annotated[str, typer.Option(help="From scratch: micro, tiny, small or a config "
                                      ".json file.")] = "tiny",
    init: Annotated[str | None, typer.Option(help="Continue from a pretrained model: hub id, "
                                             "directory or .gguf.")] = None,
    data: Annotated[list[str] | None, typer.Option(help="Training text (repeatable): "
                    "wiki-lead, lee-news, jsonl:PATH, cnn_dailymail, xsum.")] = None,
    split: Annotated[str, typer.Option(help="Split of hub datasets.")] = "train",
    holdout: Annotated[int, typer.Option(help="Articles kept out of training (written to "
                       "heldout.jsonl, scored for held-out loss).")] = 0,
    holdout_from: Annotated[str, typer.Option(help="Dataset to hold out from (default: the "
                            "last --data).")] = "",
    tokenizer: Annotated[str | None, typer.Option(help="bpe (train one on the text; default "
                         "from scratch) or model (--init's; default with --init).")] = None,
    vocab_size: Annotated[int, typer.Option(help="BPE vocabulary size.")] = 4096,
    tokens: Annotated[int, typer.Option(help="Token budget (0: wall-clock budget only).")]
    = 850_000,
    time_budget: Annotated[float, typer.Option(help="Wall-clock budget in seconds (0: none); "
                           "the schedule then follows elapsed time.")] = 0.0,
    seed: Annotated[int, typer.Option(help="Init, data order and dropout seed.")] = 0,
    lr: Annotated[float, typer.Option(help="Peak learning rate.")] = 3e-3,
    schedule: Annotated[str, typer.Option(help="cosine, linear or constant (after warm-up).")]
    = "cosine",
    warmup: Annotated[float, typer.Option(help="Warm-up share of the budget.")] = 0.05,
    batch_size: Annotated[int, typer.Option(help="Sequences per step.")] = 8,
    seq_len: Annotated[int, typer.Option(help="Tokens per sequence.")] = 256,
    p_max: Annotated[float, typer.Option(help="Layer-dropout rate at the last layer.")] = 0.2,
    dropout_curriculum: Annotated[str, typer.Option(help="none, linear or exp (time scaling "
                                  "of layer dropout).")] = "none",
    exit_curriculum: Annotated[str, typer.Option(help="rotational, gradual or none.")]
    = "rotational",
    rotation: Annotated[int, typer.Option(help="R of the rotational curriculum.")] = 2,
    e_scale: Annotated[float, typer.Option(help="Scale of the intermediate exits' loss "
                       "weights.")] = 0.2,
    exit_weighting: Annotated[str, typer.Option(help="Growth of the exit weights with depth: "
                              "sum_l (the paper), l or one.")] = "sum_l",
    threads: Threads = None, device: Device = None,
) -> None:
    """Train an early-exit-capable model with the LayerSkip recipe, or its baseline twin."""
    from lsbench.training.recipe import Recipe
    from lsbench.training.train import TrainConfig
    from lsbench.training.train import train as run_training

    def body() -> None:
        if recipe not in ("layerskip", "baseline"):
            raise LsbenchError(f"unknown recipe {recipe!r}; choose layerskip or baseline")
        knobs = (Recipe.baseline() if recipe == "baseline" else
                 Recipe(p_max=p_max, dropout_curriculum=dropout_curriculum,
                        exit_curriculum=exit_curriculum, rotation=rotation, e_scale=e_scale,
                        exit_weighting=exit_weighting))
        cfg = TrainConfig(out=out, recipe=knobs, size=size, init=init,
                          data=tuple(data or ("wiki-lead", "lee-news")), split=split,
                          holdout=holdout, holdout_from=holdout_from,
                          tokenizer=tokenizer or ("model" if init else "bpe"),
                          vocab_size=vocab_size, tokens=tokens, time_budget_s=time_budget,
                          seed=seed, lr=lr, schedule=schedule, warmup=warmup,
                          batch_size=batch_size, seq_len=seq_len, threads=threads,
                          device=device or "auto")
        _quiet_libraries()

        def on_log(r: dict) -> None:
            exits = " ".join(f"E{e}={v:.3f}" for e, v in r["exit_loss"].items())
            err.print(f"step {r['step']:>5}  {r['tokens']:>10,} tok  {r['time_s']:>7.1f} s  "
                      f"lr {r['lr']:.2e}  loss {r['loss']:.3f}  {exits}", highlight=False)

        result = run_training(cfg, on_log)
        log = result.log
        err.print(f"{log['steps']} steps, {log['tokens_seen']:,} tokens in "
                  f"{log['train_s']:.0f} s", highlight=False)
        if log["heldout"]:
            losses = " ".join(f"E{e}={v:.3f}" for e, v in log["heldout"]["loss"].items())
            err.print(f"held-out loss per exit: {losses}", highlight=False)
        _print_path(result.path)

    _guarded(body)


@app.command()
def version() -> None:
    """Print lsbench's version."""
    out.print(f"lsbench {__version__}")
