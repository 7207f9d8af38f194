"""`make bench-scan`: what `lsbench scan` costs and how well it predicts, in one process.

    python -m lsbench.benchmarks.scanbench [--model smollm2-135m] [--dataset lee-news] [--prompts 4]
                                [--max-new-tokens 48] [-k 1:8] [--points 8:4,16:4,24:2]

1. The whole scan (every exit layer 1..L-1 x k, plus the confidence-stopped drafter) on the
   examples, wall time from loading the model to the last priced point.
2. The same examples timed the ordinary way (`runner.run_job`: baseline + the --points given
   as E:k, warm-up included), wall time likewise.
3. Predicted against measured acceptance, identical round sequences, ms/token and speedup for
   those points, and the median absolute relative error of the predicted speedup.

Prints its own ratios; exit status 1 when a predicted round sequence differs from the
measured one on some example (a near-tie; the table shows where), else 0.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from lsbench.backend.loading import model_num_layers
from lsbench.benchmarks.bench import run_timed
from lsbench.errors import LsbenchError
from lsbench.reporting.report import to_markdown
from lsbench.reporting.scan_report import predicted_vs_measured, surface
from lsbench.results.store import ResultStore
from lsbench.scenario.jobs import RunSpec, Settings
from lsbench.scenario.runner import run_job
from lsbench.scenario.scan import run_scan, scan_spec, verify_job


def _points(text: str, num_layers: int) -> list[tuple[int, int]]:
    try:
        pairs = [tuple(int(x) for x in part.split(":")) for part in text.split(",") if part]
    except ValueError:
        raise LsbenchError(f"cannot parse points '{text}': use E:k pairs like 8:4,16:4") from None
    if any(len(p) != 2 or not 1 <= p[0] <= num_layers or p[1] < 1 for p in pairs):
        raise LsbenchError(f"points must be E:k with 1 <= E <= {num_layers} and k >= 1")
    return pairs  # type: ignore[return-value]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dataset", default="lee-news")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--max-input-tokens", type=int, default=384)
    parser.add_argument("-k", "--num-speculations", default="1:8")
    parser.add_argument("--points", default=None, help="E:k pairs timed the ordinary way "
                        "(default: L/4, L/2 and 3L/4 at k=4)")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--device", default=None)
    args = parser.parse_args(argv)

    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    L = model_num_layers(args.model)
    points = _points(args.points or f"{max(L // 4, 1)}:4,{max(L // 2, 1)}:4,"
                     f"{max(3 * L // 4, 1)}:4", L)
    s = Settings({"model": args.model, "name": "bench-scan", "dtype": args.dtype or "auto",
                  "device": args.device or "auto",
                  "data": {"dataset": args.dataset, "limit": args.prompts,
                           "max_input_tokens": args.max_input_tokens},
                  "decoding": {"max_new_tokens": args.max_new_tokens},
                  "sweep": {"num_speculations": args.num_speculations}})
    spec = scan_spec(s, L)
    print(f"{args.model}: {L} layers, {args.prompts} examples of {args.dataset}, "
          f"{args.max_new_tokens} new tokens; scan of {len(spec.exit_layers)} exit layers x "
          f"{len(spec.ks)} k ({spec.points} points with the confidence-stopped drafter)")
    sys.stdout.flush()
    t0 = time.perf_counter()
    result = run_scan(spec)
    scan_s = time.perf_counter() - t0

    runs = [RunSpec("layerskip", e, k) for e, k in points]
    surf = surface(result.rows)
    chosen = surf[surf.apply(lambda r: r["strategy"] == "layerskip"
                             and (int(r["exit_layer"]), int(r["num_speculations"])) in points,
                             axis=1)]
    job = verify_job(spec, chosen)
    assert {r for r in job.runs[1:]} == set(runs)
    with tempfile.TemporaryDirectory() as tmp:
        store = ResultStore(Path(tmp) / "points.parquet")
        t0 = time.perf_counter()
        run_job(job, store)
        sweep_s = time.perf_counter() - t0
        measured = store.rows()
    table = predicted_vs_measured(result.rows, measured, chosen)
    print(to_markdown(table), end="")
    errors = [abs(x) for x in table["rel. error"]]
    print(f"scan of all points: {scan_s:.1f} s; {len(points)} points timed the ordinary way: "
          f"{sweep_s:.1f} s -> the scan takes {scan_s / sweep_s:.2f}x the time "
          f"(target < 1.00x)")
    print(f"predicted vs measured speedup: median |relative error| "
          f"{statistics.median(errors):.1%} over {len(errors)} points (target <= 10%)")
    identical = all(a == b for a, b in (x.split("/") for x in table["identical rounds"]))
    print("predicted round sequences identical to measured ones on every example:",
          "yes" if identical else "NO (near-ties; see min_margin in the scan rows)")
    return 0 if identical else 1


if __name__ == "__main__":
    run_timed(main)
