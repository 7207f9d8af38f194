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
from rich.table import Table

from lsbench import __version__
from lsbench.errors import LsbenchError

# Libraries' own tqdm bars (GGUF conversion, weight loading) would garble rich's progress.
os.environ.setdefault("TQDM_DISABLE", "1")

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Benchmark early-exit self-speculative decoding (LayerSkip) against "
                       "autoregressive and two-model speculative decoding.")
# Tables are wide; when a stream is not a terminal rich would wrap them at 80 columns.
err = Console(stderr=True, width=None if sys.stderr.isatty() else 120)
out = Console(width=None if sys.stdout.isatty() else 120)

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
Out = Annotated[Path | None, typer.Option("--out", "-o", help="Parquet results file "
                "(default results/<name>.parquet).")]
Threads = Annotated[int | None, typer.Option(help="torch CPU threads (default: torch's).")]
Force = Annotated[bool, typer.Option(help="Redo runs already in the results file.")]


def _settings(file: Path | None, overrides: dict[tuple[str, str], object]):
    from lsbench.jobs import Settings

    s = Settings.from_file(file)
    for (section, key), value in overrides.items():
        s.override(section, key, value)
    return s


def _measure(job_builder: Callable[[object, int], object], settings, out_path: Path | None,
             force: bool, title: str) -> None:
    """Validate, run with a progress bar, print the results table."""
    from lsbench.jobs import JobSpec
    from lsbench.runner import run_job, validate
    from lsbench.store import ResultStore

    model = settings.get("", "model")
    if not model:
        raise LsbenchError("no model given: pass --model or a sweep file that sets model")
    # Refuse unknown models, datasets and out-of-range layers before loading anything.
    from lsbench.data import check_dataset
    from lsbench.models import model_num_layers

    check_dataset(settings.get("data", "dataset", "lee-news"))
    num_layers = model_num_layers(model, settings.get("", "revision"))
    job: JobSpec = job_builder(settings, num_layers)
    validate(job)  # draft models too, before the header and the results file
    path = out_path or Path("results") / f"{job.name}.parquet"
    store = ResultStore(path)
    _quiet_libraries()
    err.print(f"[bold]{title}[/] {escape(job.model)} ({num_layers} layers) on "
              f"{escape(job.dataset.name)} x{job.dataset.limit}: {len(job.runs)} runs, "
              f"baseline first -> {escape(str(path))}", highlight=False)
    with Progress(TextColumn("[progress.description]{task.description}"), BarColumn(),
                  MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("eta"),
                  TimeRemainingColumn(), console=err, transient=False) as progress:
        task = progress.add_task("loading", total=None)

        def on_progress(event) -> None:
            progress.update(task, total=event.total or None, completed=event.done,
                            description=escape(f"{event.phase}: {event.detail}"
                                               if event.phase != "done" else "done"))

        try:
            outcome = run_job(job, store, force=force, on_progress=on_progress)
        except KeyboardInterrupt:
            progress.stop()
            raise
    err.print(f"measured {outcome.measured} generations, {outcome.skipped} already in "
              f"{escape(str(path))}", highlight=False)
    df = store.rows()
    df = df[df.run_id.isin({job.run_id(r) for r in job.runs})]
    _print_sweep_table(df)


def _print_sweep_table(df) -> None:
    from lsbench.report import format_cell, sweep_table

    table = sweep_table(df)
    for (model, dataset), rows in table.groupby(["model", "dataset"], sort=False):
        t = Table(title=f"{model} on {dataset}: medians over examples, speedup vs "
                        "autoregressive in the same process", title_justify="left")
        cols = ["run", "k", "tokens/s", "speedup", "acceptance", "accepted len", "ROUGE-L",
                "roofline", "lossless"]
        for c in cols:
            t.add_column(c, justify="left" if c == "run" else "right")
        for _, row in rows.iterrows():
            label = {"ar": "autoregressive (baseline)"}.get(row["strategy"], row["draft"])
            if row["strategy"].startswith("hf-") and row["strategy"] != "hf-ar":
                label = f"{label} (transformers)"
            cells = [label, "—" if row["strategy"] == "ar" else str(row["k"])]
            cells += [format_cell(c, row[c]) for c in cols[2:-1]]
            match = row["lossless"]
            cells.append("—" if match != match else "yes" if match == 1 else f"{match:.0%}")
            style = "bold green" if row["best"] else ("cyan" if row["strategy"] == "ar" else None)
            t.add_row(*cells, style=style)
        out.print(t)
        base = rows[rows["strategy"] == "ar"]
        if len(base) and base.iloc[0]["roofline"] == base.iloc[0]["roofline"]:
            b = base.iloc[0]
            out.print(f"roofline: autoregressive decoding reads weights at "
                      f"{format_cell('weights GB/s', b['weights GB/s'])} GB/s, "
                      f"{format_cell('roofline', b['roofline'])} of this device's memory copy "
                      f"bandwidth ({format_cell('peak GB/s', b['peak GB/s'])} GB/s)",
                      highlight=False)
        best = rows[rows["best"]]
        if len(best):
            b = best.iloc[0]
            verdict = ("faster than" if b["speedup"] > 1 else
                       "every setting is slower than")
            out.print(f"best: {escape(b['draft'])}, k={b['k']} at "
                      f"{format_cell('speedup', b['speedup'])}: {verdict} autoregressive decoding",
                      highlight=False)


# --- commands -------------------------------------------------------------------------------

@app.command()
def sweep(
    sweep_file: Annotated[Path | None, typer.Argument(help="TOML sweep file (sweeps/*.toml); "
                                                      "options override it.")] = None,
    model: Model = None, dataset: Dataset = None, limit: Limit = None,
    exit_layers: Annotated[str | None, typer.Option("--exit-layers", "-e", help="List 4,8,12, "
                           "range start:stop:step (stop included) or all.")] = None,
    num_speculations: Speculations = None,
    strategy: Annotated[list[str] | None, typer.Option(help="layerskip (default) and/or "
                        "hf-early-exit (transformers' assistant_early_exit).")] = None,
    max_new_tokens: MaxNew = None, repeats: Repeats = None, warmup: Warmup = None,
    sample: Sample = None, temperature: Temperature = None, top_p: TopP = None,
    top_k: TopK = None, seed: Seed = None, dtype: DType = None, device: Device = None,
    max_input_tokens: MaxInput = None, threads: Threads = None, out: Out = None,
    force: Force = False,
) -> None:
    """Early-exit self-speculative decoding across exit layers, beside an autoregressive
    baseline measured in the same process on the same prompts."""
    from lsbench.jobs import sweep_job

    def body() -> None:
        s = _settings(sweep_file, {
            ("", "model"): model, ("data", "dataset"): dataset, ("data", "limit"): limit,
            ("data", "max_input_tokens"): max_input_tokens,
            ("sweep", "exit_layers"): exit_layers, ("sweep", "num_speculations"): num_speculations,
            ("sweep", "strategies"): strategy or None, ("sweep", "repeats"): repeats,
            ("sweep", "warmup"): warmup, ("decoding", "max_new_tokens"): max_new_tokens,
            ("decoding", "sample"): sample, ("decoding", "temperature"): temperature,
            ("decoding", "top_p"): top_p, ("decoding", "top_k"): top_k,
            ("decoding", "seed"): seed, ("", "dtype"): dtype, ("", "device"): device,
            ("", "threads"): threads})
        _measure(sweep_job, s, out, force, "sweep")

    _guarded(body, out)


@app.command()
def compare(
    compare_file: Annotated[Path | None, typer.Argument(help="TOML file with a [compare] "
                                                        "section; options override it.")] = None,
    model: Model = None,
    draft: Annotated[list[str] | None, typer.Option(help="Draft model (repeatable); must "
                     "share the target's tokenizer.")] = None,
    early_exit: Annotated[list[str] | None, typer.Option(help="Early-exit layer (repeatable, "
                          "or a list 4,8).")] = None,
    num_speculations: Speculations = None,
    hf_reference: Annotated[bool | None, typer.Option("--hf-reference/--no-hf-reference",
                            help="Also run transformers' assisted generation and "
                            "assistant_early_exit.")] = None,
    dataset: Dataset = None, limit: Limit = None, max_new_tokens: MaxNew = None,
    repeats: Repeats = None, warmup: Warmup = None, sample: Sample = None,
    temperature: Temperature = None, top_p: TopP = None, top_k: TopK = None, seed: Seed = None,
    dtype: DType = None, device: Device = None, max_input_tokens: MaxInput = None,
    threads: Threads = None, out: Out = None, force: Force = False,
) -> None:
    """A target model with draft models and early exit side by side (the blog's table)."""
    from lsbench.jobs import compare_job

    def body() -> None:
        s = _settings(compare_file, {
            ("", "model"): model, ("compare", "drafts"): draft or None,
            ("compare", "early_exit"): ",".join(early_exit) if early_exit else None,
            ("compare", "num_speculations"): num_speculations,
            ("compare", "hf_reference"): hf_reference,
            ("data", "dataset"): dataset, ("data", "limit"): limit,
            ("data", "max_input_tokens"): max_input_tokens, ("compare", "repeats"): repeats,
            ("compare", "warmup"): warmup, ("decoding", "max_new_tokens"): max_new_tokens,
            ("decoding", "sample"): sample, ("decoding", "temperature"): temperature,
            ("decoding", "top_p"): top_p, ("decoding", "top_k"): top_k,
            ("decoding", "seed"): seed, ("", "dtype"): dtype, ("", "device"): device,
            ("", "threads"): threads})
        if not s.get("", "name"):
            s.override("", "name", "compare")
        _measure(compare_job, s, out, force, "compare")

    _guarded(body, out)


Results = Annotated[list[Path], typer.Argument(help="Parquet results files.")]


@app.command()
def plot(
    results: Results,
    out: Annotated[Path, typer.Option("--out", "-o", help="Figure directory.")] = Path("plots"),
    fmt: Annotated[str, typer.Option("--format", "-f", help="png, svg or pdf.")] = "png",
) -> None:
    """Tokens/s, speedup and acceptance vs exit layer; speedup per draft option."""
    from lsbench.plots import plot_compare, plot_sweep
    from lsbench.store import read_results

    def body() -> None:
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
    fmt: Annotated[str, typer.Option("--format", "-f", help="md or csv.")] = "md",
    table: Annotated[str, typer.Option(help="blog (the LayerSkip blog's table, correctly "
                     "labelled), summary (every statistic per run) or sweep.")] = "blog",
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Write to FILE instead of "
                   "stdout.")] = None,
) -> None:
    """Tables from results files: Markdown for people, CSV for tools."""
    from lsbench import report as rep
    from lsbench.store import read_results

    def body() -> None:
        builders = {"blog": rep.blog_table, "summary": rep.summarize, "sweep": rep.sweep_table}
        if table not in builders:
            raise LsbenchError(f"unknown table '{table}'; choose {', '.join(builders)}")
        if fmt not in ("md", "csv"):
            raise LsbenchError(f"unknown format '{fmt}'; choose md or csv")
        frame = builders[table](read_results(results))
        text = rep.to_markdown(frame) if fmt == "md" else rep.to_csv(frame)
        if out is None:
            sys.stdout.write(text)
        else:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(text)
            err.print(f"wrote {out}")

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
    from lsbench.recipe import Recipe
    from lsbench.train import TrainConfig
    from lsbench.train import train as run_training

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
