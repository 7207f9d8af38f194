"""`make ab`: the LayerSkip blog's contrast, offline. Two twins (same architecture, data order,
seed and token budget) are trained on this machine, one with the LayerSkip recipe and one
without, then swept on held-out news articles with the ordinary `lsbench sweep` machinery, and
drawn side by side with a Markdown summary. Each twin is also scanned (`lsbench scan`) right
after its sweep, and the summary checks the scan's predictions against that measured grid.

    python -m lsbench.training.ab [--out results/ab] [--plots plots/ab] [--tokens N]

The twins train in parallel, one thread each (2 cores); the sweeps and scans then run one at
a time so that their timings do not disturb each other.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import multiprocessing
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, replace
from pathlib import Path

import pandas as pd

from lsbench.errors import run_main
from lsbench.training.recipe import Recipe
from lsbench.training.train import HELDOUT_FILE, LOG_FILE, TrainConfig, output_dir

SWEEP_FILE = Path(__file__).resolve().parents[2] / "sweeps" / "ab-twins.toml"
TWINS = {"baseline": "tiny-baseline", "layerskip": "tiny-layerskip"}
# The twins' shared settings; only the recipe differs.
AB_TRAIN = TrainConfig(
    out="", size="tiny", data=("wiki-lead", "lee-news"), holdout=24, holdout_from="lee-news",
    tokenizer="bpe", vocab_size=4096, tokens=850_000, seed=0, lr=3e-3, warmup=0.05,
    schedule="cosine", batch_size=8, seq_len=256, log_every=20, threads=1, device="cpu",
)
AB_RECIPE = Recipe(p_max=0.2, dropout_curriculum="none", exit_curriculum="rotational",
                   rotation=2, e_scale=1.0)


def _train_one(cfg: TrainConfig) -> str:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    import transformers

    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    from lsbench.training.train import train

    return str(train(cfg).path)


def twin_configs(base: TrainConfig, recipe: Recipe, names: dict[str, str] = TWINS
                 ) -> dict[str, TrainConfig]:
    """The two twins of `base`: only the recipe (and the output name) differs."""
    return {"baseline": replace(base, recipe=Recipe.baseline(), out=names["baseline"]),
            "layerskip": replace(base, recipe=recipe, out=names["layerskip"])}


def train_twins(base: TrainConfig, recipe: Recipe, parallel: bool = True) -> None:
    configs = twin_configs(base, recipe)
    if not parallel:
        for cfg in configs.values():
            _train_one(cfg)
        return
    # spawn: a fresh interpreter per twin, so neither inherits the other's torch state.
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=2, mp_context=ctx) as pool:
        for future in [pool.submit(_train_one, c) for c in configs.values()]:
            future.result()


def autocast(device: str):
    """bf16 autocast on the GPU (fp32 master weights, bf16 matmuls); plain fp32 on the CPU."""
    import torch

    if torch.device(device).type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train_in_turn(configs: dict[str, TrainConfig], before_each=lambda kind, cfg: None
                  ) -> dict[str, dict]:
    """Train the LayerSkip twin, then the baseline on the tokens the LayerSkip twin reached
    (a time budget may end it first): the same tokens and steps either way. The logs by kind."""
    from lsbench.training.train import train

    logs: dict[str, dict] = {}
    for kind in ("layerskip", "baseline"):
        cfg = configs[kind]
        if kind == "baseline":
            cfg = replace(cfg, tokens=logs["layerskip"]["tokens_seen"])
        before_each(kind, cfg)
        with autocast(cfg.device):
            logs[kind] = train(cfg).log
    return logs


def heldout_before(cfg: TrainConfig) -> tuple[dict, int]:
    """Held-out loss per exit of `cfg.init` before training (the rows `train` evaluates), and
    the training tokens available (one epoch)."""
    from lsbench.backend.loading import load_model
    from lsbench.training.train import evaluate, heldout_rows, load_corpus, pack

    corpus = load_corpus(cfg)
    loaded = load_model(cfg.init, dtype="float32", device=cfg.device)
    rows = heldout_rows(loaded.tokenizer, corpus.heldout, cfg.seq_len)
    available = pack(loaded.tokenizer, corpus.train, cfg.seq_len).numel()
    assert rows is not None
    with autocast(cfg.device):
        before = evaluate(loaded.model, rows.to(cfg.device))
    return before, available


def self_text(cfg: TrainConfig, path: Path, tokens: int, seconds: float, batch: int,
              new_tokens: int, prompt_tokens: int = 64) -> dict:
    """Continuations `cfg.init` samples (temperature 1, no filters: its own distribution) from
    the opening tokens of its training articles, written to `path` as JSONL. Held-out articles
    are not in the training text, so they prompt nothing. Stops at `tokens` or `seconds`."""
    import torch
    from transformers import GenerationConfig

    from lsbench.backend.loading import load_model
    from lsbench.training.train import load_corpus

    started = time.perf_counter()
    corpus = load_corpus(cfg)
    loaded = load_model(cfg.init, device=cfg.device)  # bf16 on CUDA
    tok, model = loaded.tokenizer, loaded.model
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    starts = [ids[:prompt_tokens] for ids in (tok.encode(t, add_special_tokens=False)
                                               for t in corpus.train) if len(ids) >= 8]
    # Every knob set: generate() would otherwise fill them from the checkpoint's defaults.
    gen_cfg = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=0, do_sample=True,
                               temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0,
                               no_repeat_ngram_size=0, pad_token_id=pad,
                               eos_token_id=tok.eos_token_id)
    torch.manual_seed(cfg.seed)
    written = rows = 0
    with path.open("w") as f:
        while written < tokens and time.perf_counter() - started < seconds:
            chunk = [starts[(rows + i) % len(starts)] for i in range(batch)]
            width = max(len(ids) for ids in chunk)
            ids = torch.tensor([[pad] * (width - len(x)) + x for x in chunk], device=model.device)
            mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in chunk],
                                device=model.device)
            with torch.inference_mode():
                out = model.generate(ids, attention_mask=mask, generation_config=gen_cfg)
            for prompt, row in zip(chunk, out[:, width:].tolist(), strict=True):
                new = row[: row.index(tok.eos_token_id)] if tok.eos_token_id in row else row
                text = tok.decode(prompt + new, skip_special_tokens=True)
                if new and text.strip():
                    f.write(json.dumps({"id": f"self-{rows}", "article": text}) + "\n")
                    written += len(new)
                rows += 1
    return {"tokens": written, "texts": rows, "seconds": time.perf_counter() - started,
            "batch": batch, "new_tokens": new_tokens}


def twin_settings(name: str, out: Path, sweep_file: Path = SWEEP_FILE,
                  overrides: dict[tuple[str, str], object] | None = None):
    """The sweep file's settings for twin `name` on the held-out articles in `out`, with
    `overrides` ((section, key) -> value: a caller's scale, device) on top."""
    from lsbench.scenario.jobs import Settings

    settings = Settings.from_file(sweep_file)
    settings.override("", "model", name)
    settings.override("data", "dataset", f"jsonl:{out / 'heldout-news.jsonl'}")
    for (section, key), value in (overrides or {}).items():
        settings.override(section, key, value)
    return settings


def sweep_twin(name: str, out: Path, sweep_file: Path = SWEEP_FILE) -> Path:
    from lsbench.backend.loading import model_num_layers
    from lsbench.results.store import ResultStore
    from lsbench.scenario.jobs import sweep_job
    from lsbench.scenario.runner import run_job

    job = sweep_job(twin_settings(name, out, sweep_file), model_num_layers(name))
    path = out / f"{name}.parquet"
    path.unlink(missing_ok=True)  # fresh twins: never resume from an older model's rows
    run_job(job, ResultStore(path))
    return path


def scan_twin(name: str, out: Path, sweep_file: Path = SWEEP_FILE) -> Path:
    """`lsbench scan` of twin `name` with its sweep's settings (examples, decoding, device,
    exit layers and k; no prompt lookup), into out/<name>.scan.parquet and its trace file."""
    from lsbench.backend.loading import model_num_layers
    from lsbench.scenario.scan import run_scan, scan_spec, write_scan

    spec = scan_spec(twin_settings(name, out, sweep_file), model_num_layers(name), pld=False)
    path, _ = write_scan(run_scan(spec), out / f"{name}.scan.parquet")
    return path


def scan_checks(df: pd.DataFrame, scans: dict[str, Path],
                twins: dict[str, str] = TWINS) -> dict[str, dict]:
    """Per twin: its scan against its fully measured layerskip grid (`scan_report.grid_check`),
    the best points chosen below the last layer as in the summary's best settings."""
    from lsbench.reporting.scan_report import grid_check, read_scans

    checks = {}
    for kind, path in scans.items():
        rows = df[df["model"] == twins[kind]]
        last = int(rows["model_num_layers"].iloc[0])
        checks[kind] = grid_check(read_scans([path]), rows, best_below_exit=last).as_dict()
    return checks


def scan_section(checks: dict[str, dict]) -> tuple[list[str], dict[str, bool]]:
    """The summary's "Scan against the measured grid" lines and the two issue-10 targets."""
    lines = ["## Scan against the measured grid", "",
             "Each twin is scanned (`lsbench scan`, same examples, decoding, exits and k) right "
             "after its sweep, which times every one of those (E, k) points: the fully measured "
             "grid. Identical: (example, E, k) points whose predicted accepted count equals "
             "the measured one in every round (so rounds and histogram agree), and of those "
             "the ones whose drafted counts agree too (so acceptance does). Speedup of a point: "
             "total baseline decode time over the point's, summed over the examples (measured: "
             "the sweep's own `ar`; predicted: the scan's `ar` over its priced rounds); the "
             "error is the median over the (E, k) points of |predicted / measured - 1|. Best "
             "points: among exits below the last layer.", "",
             "| twin | identical rounds | identical drafted too | median abs. rel. error of "
             "speedup | scan's best predicted | its predicted / measured speedup | best "
             "measured | its speedup | ratio |",
             "|---|---:|---:|---:|---|---:|---|---:|---:|"]
    for kind, c in checks.items():
        bp, bm = c["best_predicted"], c["best_measured"]
        n = c["example_points"]
        lines.append(
            f"| {kind} | {c['identical_rounds']}/{n} ({c['identical_rounds'] / n:.1%}) | "
            f"{c['identical_drafted']}/{n} ({c['identical_drafted'] / n:.1%}) | "
            f"{c['median_abs_rel_error']:.1%} over {c['points']} points | "
            f"E={bp['exit_layer']} k={bp['num_speculations']} | "
            f"{bp['predicted_speedup']:.2f}x / {bp['measured_speedup']:.2f}x | "
            f"E={bm['exit_layer']} k={bm['num_speculations']} | "
            f"{bm['measured_speedup']:.2f}x | {c['best_ratio']:.3f} |")
    targets = {
        "scan: predicted vs measured speedup, median abs. relative error <= 10% on each twin "
        "(issue 10)": all(c["median_abs_rel_error"] <= 0.10 for c in checks.values()),
    }
    if "layerskip" in checks:
        targets["scan: on the LayerSkip twin, the measured speedup of the scan's best predicted "
                "point within 5% of the grid's best (ratio >= 0.95; issue 10)"] = (
            checks["layerskip"]["best_ratio"] >= 0.95)
    lines += [""] + [f"- [{'x' if ok else ' '}] {what}" for what, ok in targets.items()]
    return lines, targets


def distinct_share(df: pd.DataFrame) -> float:
    """Mean over autoregressive outputs of distinct tokens / tokens (1.0: no repetition)."""
    ar = df[df["is_baseline"]]
    shares = [len(set(ids)) / len(ids) for ids in ar["output_ids"] if len(ids)]
    return sum(shares) / len(shares) if shares else math.nan


def _ratio(a: float, b: float) -> float:
    return a / b if b else math.inf if a else math.nan


def summary_markdown(df: pd.DataFrame, logs: dict[str, dict], wall_s: float,
                     k_target: int = 4, twins: dict[str, str] = TWINS,
                     scans: dict[str, dict] | None = None) -> tuple[str, dict]:
    """The A/B summary of two swept twins; `twins` maps baseline/layerskip to model names;
    `scans`, per twin, its scan against the grid (`scan_checks`), a section of its own."""
    from lsbench.reporting.report import summarize

    s = summarize(df)
    num_layers = int(s["model_num_layers"].iloc[0])
    acc: dict[str, dict[int, float]] = {}
    best: dict[str, dict] = {}
    speed: dict[str, dict[int, float]] = {}
    for kind, name in twins.items():
        rows = s[(s["model"] == name) & (s["strategy"] == "layerskip")]
        at_k = rows[rows["num_speculations"] == k_target]
        acc[kind] = {int(r.exit_layer): float(r.acceptance_rate) for r in at_k.itertuples()}
        speed[kind] = {int(e): float(g["speedup_median"].max())
                       for e, g in rows.groupby("exit_layer")}
        # Exiting at the last layer drafts with the full model: not self-speculation.
        shallow = rows[rows["exit_layer"] < num_layers]
        top = shallow.loc[shallow["speedup_median"].idxmax()]
        best[kind] = {"exit_layer": int(top["exit_layer"]), "k": int(top["num_speculations"]),
                      "speedup": float(top["speedup_median"]),
                      "lossless": float(top["match_rate"])}
    loss = {kind: {int(e): v for e, v in logs[kind]["heldout"]["loss"].items()}
            for kind in TWINS}
    agree = {kind: {int(e): v for e, v in logs[kind]["heldout"]["agreement"].items()}
             for kind in TWINS}
    distinct = {kind: distinct_share(df[df["model"] == name]) for kind, name in twins.items()}
    half = [e for e in range(1, num_layers // 2 + 1)]
    ratios = {e: _ratio(acc["layerskip"].get(e, math.nan), acc["baseline"].get(e, math.nan))
              for e in half}
    final_b, final_l = loss["baseline"][num_layers], loss["layerskip"][num_layers]
    targets = {
        "acceptance >= 1.5x baseline at every E <= L/2": all(r >= 1.5 for r in ratios.values()),
        "final-layer held-out loss within 5% of baseline": final_l <= 1.05 * final_b,
        "best LayerSkip speedup > 1.0, lossless": best["layerskip"]["speedup"] > 1.0
        and best["layerskip"]["lossless"] == 1.0,
        "make ab under 30 minutes": wall_s < 1800,
    }
    lines = ["# LayerSkip A/B: baseline twin vs LayerSkip twin", "",
             f"Same architecture ({num_layers} layers), data order, seed and token budget "
             f"({logs['baseline']['tokens_seen']:,} tokens each); held-out prompts: "
             f"{len(df['example_id'].unique())} news articles not in the training text. "
             f"Greedy decoding; acceptance at k={k_target}.", "",
             "| exit E | acceptance baseline | acceptance LayerSkip | ratio | "
             "best speedup baseline | best speedup LayerSkip | held-out loss baseline | "
             "held-out loss LayerSkip | agreement baseline | agreement LayerSkip |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for e in range(1, num_layers + 1):
        ab, al = acc["baseline"].get(e, math.nan), acc["layerskip"].get(e, math.nan)
        ratio = _ratio(al, ab)
        lines.append(f"| {e} | {ab:.2f} | {al:.2f} | "
                     f"{'—' if math.isnan(ratio) else f'{ratio:.2f}x'} | "
                     f"{speed['baseline'].get(e, math.nan):.2f}x | "
                     f"{speed['layerskip'].get(e, math.nan):.2f}x | {loss['baseline'][e]:.3f} | "
                     f"{loss['layerskip'][e]:.3f} | {agree['baseline'][e]:.2f} | "
                     f"{agree['layerskip'][e]:.2f} |")
    lines += ["", "Best speedup: the highest median speedup over k at that exit. Agreement: "
              "teacher-forced share of held-out positions where exit E's argmax equals the "
              "last layer's (a proxy for greedy acceptance).", "",
              "| twin | best setting | speedup | lossless | distinct-token share (AR) | "
              "train time | step time |", "|---|---|---:|---:|---:|---:|---:|"]
    for kind in TWINS:
        b, log = best[kind], logs[kind]
        lines.append(f"| {kind} | E={b['exit_layer']} k={b['k']} | {b['speedup']:.2f}x | "
                     f"{b['lossless']:.0%} | {distinct[kind]:.2f} | {log['train_s']:.0f} s | "
                     f"{1000 * log['step_s']:.0f} ms |")
    lines += ["", "## Targets", ""]
    lines += [f"- [{'x' if ok else ' '}] {what}" for what, ok in targets.items()]
    if scans:
        section, scan_targets = scan_section(scans)
        lines += ["", *section]
    lines += ["", f"`make ab` wall time: {wall_s / 60:.1f} min.", "",
              "Recipe of the LayerSkip twin: " + json.dumps(logs["layerskip"]["config"]["recipe"]),
              ""]
    numbers = {"acceptance": acc, "speedup": speed, "heldout_loss": loss, "agreement": agree,
               "best": best, "distinct_share": distinct, "wall_s": wall_s, "targets": targets}
    if scans:
        numbers["scan"] = {**scans, "targets": scan_targets}
    return "\n".join(lines), numbers


def run_ab(base: TrainConfig, recipe: Recipe, out: Path, plots: Path,
           sweep_file: Path = SWEEP_FILE, train: bool = True, parallel: bool = True,
           say=print) -> dict:
    """Train both twins (unless train=False), sweep them, plot, write summary.md/.json."""
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    if train:
        say(f"training twins ({base.tokens:,} tokens each)...")
        train_twins(base, recipe, parallel)
    paths = {kind: output_dir(name) for kind, name in TWINS.items()}
    logs = {kind: json.loads((p / LOG_FILE).read_text()) for kind, p in paths.items()}
    for kind, log in logs.items():
        losses = log["heldout"]["loss"]
        say(f"  {kind}: {log['steps']} steps in {log['train_s']:.0f} s, held-out loss "
            f"{losses[str(len(losses))]:.3f}")
    shutil.copyfile(paths["layerskip"] / HELDOUT_FILE, out / "heldout-news.jsonl")

    from lsbench.reporting.plots import plot_sweep
    from lsbench.results.store import read_results

    results, scans = [], {}
    for kind, name in TWINS.items():  # one at a time: no timing runs beside another
        say(f"sweeping {name} on held-out news...")
        results.append(sweep_twin(name, out, sweep_file))
        say(f"scanning {name} on the same examples, exits and k...")
        scans[kind] = scan_twin(name, out, sweep_file)
    df = read_results(results)
    for p in plot_sweep(df, plots):
        say(f"  {p}")
    text, numbers = summary_markdown(df, logs, time.perf_counter() - started,
                                     scans=scan_checks(df, scans))
    (out / "summary.md").write_text(text)
    (out / "summary.json").write_text(json.dumps(
        {**numbers, "train": asdict(base), "recipe": asdict(recipe)}, indent=1, default=str))
    say(text)
    return numbers


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("results/ab"))
    parser.add_argument("--plots", type=Path, default=Path("plots/ab"))
    parser.add_argument("--tokens", type=int, default=AB_TRAIN.tokens)
    parser.add_argument("--skip-train", action="store_true",
                        help="sweep and scan the twins already trained")
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    run_ab(replace(AB_TRAIN, tokens=args.tokens), AB_RECIPE, args.out, args.plots,
           train=not args.skip_train, say=lambda m: print(m, flush=True))
    return 0


if __name__ == "__main__":
    run_main(main)
