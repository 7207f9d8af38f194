"""`make bench-cluster`: the same sweep on one worker with one thread, then on `--ray local:2`
with one thread per worker, and the ratio of their wall times.

    python -m lsbench.bench_cluster [--model smollm2-135m] [--limit 8] [--exit-layer 8] [--k 4]
                                    [--max-new-tokens 128]

Wall time is the whole job as a user waits for it: loading, warm-up, measuring, storing (and
starting Ray for the cluster). The measuring phase alone is printed too. Target: ratio <= 0.6
on a 2-core machine. Needs lsbench[cluster]. Exit status 0 either way.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from lsbench.jobs import JobSpec, Settings, sweep_job
from lsbench.launchers import RayTarget, run_job_on_ray
from lsbench.models import load_tokenizer, model_num_layers
from lsbench.runner import ProgressEvent, run_job
from lsbench.store import ResultStore

TARGET_RATIO = 0.6


def build_job(args: argparse.Namespace) -> JobSpec:
    s = Settings()
    for (section, key), value in {
            ("", "model"): args.model, ("", "threads"): 1, ("", "device"): "cpu",
            ("data", "dataset"): args.dataset, ("data", "limit"): args.limit,
            ("sweep", "exit_layers"): str(args.exit_layer),
            ("sweep", "num_speculations"): str(args.k), ("sweep", "warmup"): 1,
            ("decoding", "max_new_tokens"): args.max_new_tokens}.items():
        s.override(section, key, value)
    return sweep_job(s, model_num_layers(args.model, None))


def timed(run, *call_args, **kwargs) -> tuple[float, float]:
    """(wall seconds, seconds from the first measured generation on)."""
    first: list[float] = []

    def on_progress(event: ProgressEvent) -> None:
        if event.phase == "measure" and not first:
            first.append(time.perf_counter())

    start = time.perf_counter()
    run(*call_args, on_progress=on_progress, **kwargs)
    end = time.perf_counter()
    return end - start, end - (first[0] if first else start)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dataset", default="lee-news")
    parser.add_argument("--limit", type=int, default=8)
    parser.add_argument("--exit-layer", type=int, default=8)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    args = parser.parse_args(argv)
    os.environ.setdefault("TQDM_DISABLE", "1")
    job = build_job(args)
    load_tokenizer(job.model)  # a GGUF model is converted once, outside both timings
    with tempfile.TemporaryDirectory(prefix="lsbench-bench-cluster-") as tmp:
        one = timed(run_job, job, ResultStore(Path(tmp) / "one.parquet"))
        print(f"1 worker, 1 thread: {one[0]:.1f} s wall ({one[1]:.1f} s measuring)", flush=True)
        two = timed(run_job_on_ray, job, ResultStore(Path(tmp) / "two.parquet"),
                    RayTarget(None, 2))
        print(f"--ray local:2, 1 thread each: {two[0]:.1f} s wall ({two[1]:.1f} s measuring)",
              flush=True)
    ratio = two[0] / one[0]
    print(f"wall time ratio (ray local:2 / 1 worker): {ratio:.2f} (target <= {TARGET_RATIO}: "
          f"{'met' if ratio <= TARGET_RATIO else 'NOT met'}); measuring only: "
          f"{two[1] / one[1]:.2f}")


if __name__ == "__main__":
    main()
