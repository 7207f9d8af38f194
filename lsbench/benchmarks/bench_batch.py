"""`make bench-batch`: speculation's speedup against the batch size, measured and predicted.

    python -m lsbench.benchmarks.bench_batch [--model smollm2-135m] [--dataset lee-news]
        [--examples 16] [--max-new-tokens 48] [--batch-sizes 1,2,4,8,16] [-e 28] [-k 4]

1. `ar`, `pld` k and `layerskip` E k at every batch size (`runner.run_job`, static batching:
   the examples in batches of B consecutive ones, every speedup on `ar` of the same batch).
2. `lsbench scan --batch-size` on the same examples: the predicted speedup per batch size.
3. One line per batch size, then the measured and predicted crossover of each setting (the
   largest batch size at which it is still faster than `ar`), and the median |relative
   error| of the predicted speedups.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
from pathlib import Path

import pandas as pd

from lsbench.backend.loading import model_num_layers
from lsbench.benchmarks.bench import run_timed
from lsbench.reporting.report import batch_table, crossovers
from lsbench.results.store import ResultStore
from lsbench.scenario.jobs import Settings, parse_int_list, sweep_job
from lsbench.scenario.runner import run_job
from lsbench.scenario.scan import batch_curve, run_scan, scan_spec


def _settings(args: argparse.Namespace, exit_layer: int) -> Settings:
    return Settings({
        "model": args.model, "name": "bench-batch", "dtype": args.dtype or "auto",
        "device": args.device or "auto",
        "data": {"dataset": args.dataset, "limit": args.examples,
                 "max_input_tokens": args.max_input_tokens},
        "decoding": {"max_new_tokens": args.max_new_tokens},
        "sweep": {"strategies": ["layerskip", "pld"], "exit_layers": [exit_layer],
                  "num_speculations": [args.num_speculations],
                  "batch_sizes": args.batch_sizes, "warmup": 1}})


def _name(strategy: str, e: int, k: int) -> str:
    return f"layerskip E={e} k={k}" if strategy == "layerskip" else f"{strategy} k={k}"


def _x(value: float) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) \
        else f"{value:.2f}x"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dataset", default="lee-news")
    parser.add_argument("--examples", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--max-input-tokens", type=int, default=384)
    parser.add_argument("--batch-sizes", default="1,2,4,8,16")
    parser.add_argument("-e", "--exit-layer", type=int, default=None,
                        help="default 28, or L-1 for a model of fewer layers")
    parser.add_argument("-k", "--num-speculations", type=int, default=4)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--device", default=None)
    args = parser.parse_args(argv)

    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    L = model_num_layers(args.model)
    e = args.exit_layer or max(min(28, L - 1), 1)
    k = args.num_speculations
    sizes = parse_int_list(args.batch_sizes, what="batch sizes")
    s = _settings(args, e)
    job = sweep_job(s, L)
    print(f"{args.model}: {L} layers, {args.examples} examples of {args.dataset}, "
          f"{args.max_new_tokens} new tokens, batch sizes {', '.join(map(str, sizes))}: "
          f"ar, pld k={k}, layerskip E={e} k={k} (static batching)")
    sys.stdout.flush()
    with tempfile.TemporaryDirectory() as tmp:
        store = ResultStore(Path(tmp) / "batch.parquet")
        run_job(job, store)
        rows = store.rows()
    scan_s = _settings(args, e)
    scan_s.raw["sweep"].pop("strategies")
    result = run_scan(scan_spec(scan_s, L, thresholds=()))
    curve = batch_curve(result.batch).set_index(["strategy", "num_speculations", "batch_size"])

    table = batch_table(rows)
    ar = table[table["strategy"] == "ar"].set_index("batch")
    settings = [("pld", 0), ("layerskip", e)]
    errors = []
    for b in sizes:
        parts, predicted = [], []
        for strategy, layer in settings:
            got = table[(table["strategy"] == strategy) & (table["batch"] == b)]["speedup"]
            measured = float(got.iloc[0]) if len(got) else math.nan
            parts.append(f"{_name(strategy, layer, k)} {_x(measured)}")
            pred = float(curve.loc[(strategy, k, b), "predicted_speedup"])
            predicted.append(_x(pred))
            if measured == measured and pred == pred:
                errors.append(abs(pred / measured - 1))
        print(f"batch {b}: ar {ar.loc[b, 'aggregate tokens/s']:.1f} tok/s aggregate "
              f"({_x(ar.loc[b, 'x batch 1'])} batch 1), {', '.join(parts)}; "
              f"scan predicted {' / '.join(predicted)}")
    found = {(c["strategy"], int(c["num_speculations"])): c["crossover"]
             for c in crossovers(rows)}
    for strategy, layer in settings:
        measured = found.get((strategy, k))
        pred = curve.xs((strategy, k), level=[0, 1])["predicted_crossover"].iloc[0]
        pred = None if pd.isna(pred) else int(pred)

        def say(b: int | None) -> str:
            return "none" if b is None else f"batch {b}"

        print(f"crossover: {_name(strategy, layer, k)} at {say(measured)} "
              f"(predicted {say(pred)})" + (" (none: slower than ar at every batch size)"
                                            if measured is None else ""))
    if errors:
        print(f"predicted vs measured speedup: median |relative error| "
              f"{statistics.median(errors):.1%} over {len(errors)} points (target <= 10%)")
    return 0


if __name__ == "__main__":
    run_timed(main)
