"""`make bench-cluster`: the same sweep on one worker with one thread, then on `--ray local:2`
with one thread per worker, and the ratio of their wall times.

    python -m lsbench.benchmarks.bench_cluster [--model smollm2-135m] [--limit 8]
        [--exit-layer 8] [--k 4] [--max-new-tokens 128]

Wall time is the whole job as a user waits for it: loading, warm-up, measuring, storing (and
starting Ray for the cluster), printed as startup (to the first unit handed out), measuring
(to the last unit stored) and finishing (compaction, stopping Ray). Target: ratio <= 0.6
on a 2-core machine. Needs lsbench[cluster]. Exit status 0 either way.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from lsbench.backend.loading import load_tokenizer, model_num_layers
from lsbench.errors import run_main
from lsbench.launcher.ray_cluster import RayTarget, run_job_on_ray
from lsbench.results.store import ResultStore
from lsbench.scenario.jobs import JobSpec, Settings, sweep_job
from lsbench.scenario.runner import ProgressEvent, run_job

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


@dataclass(frozen=True)
class Timing:
    wall: float  # the whole job as a user waits for it
    startup: float  # to the first measured unit: Ray, workers, imports, models, warm-up
    measuring: float  # from the first unit handed out to the last unit stored
    finishing: float  # after the last unit: compaction, stopping the workers and Ray
    marks: tuple[tuple[str, float], ...]  # seconds from the start to each loading step

    def line(self) -> str:
        steps = ", ".join(f"{what} at {t:.1f} s" for what, t in self.marks)
        return (f"{self.wall:.1f} s wall = {self.startup:.1f} s startup + {self.measuring:.1f} s "
                f"measuring + {self.finishing:.1f} s finishing" + (f" ({steps})" if steps
                                                                   else ""))


def timed(run, *call_args, **kwargs) -> Timing:
    """Time a job through its progress events."""
    marks: list[tuple[str, float]] = []
    measure: list[float] = []
    start = time.perf_counter()

    def on_progress(event: ProgressEvent) -> None:
        now = time.perf_counter() - start
        if event.phase == "measure":
            measure.append(now)
        elif event.phase in ("load", "warmup") and (not marks or marks[-1][0] != event.detail):
            marks.append((event.detail, now))

    run(*call_args, on_progress=on_progress, **kwargs)
    wall = time.perf_counter() - start
    first, last = (measure[0], measure[-1]) if measure else (wall, wall)
    return Timing(wall, first, last - first, wall - last, tuple(marks[:4]))


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
        print(f"1 worker, 1 thread: {one.line()}", flush=True)
        two = timed(run_job_on_ray, job, ResultStore(Path(tmp) / "two.parquet"),
                    RayTarget(None, 2))
        print(f"--ray local:2, 1 thread each: {two.line()}", flush=True)
    ratio = two.wall / one.wall
    print(f"wall time ratio (ray local:2 / 1 worker): {ratio:.2f} (target <= {TARGET_RATIO}: "
          f"{'met' if ratio <= TARGET_RATIO else 'NOT met'}); measuring only: "
          f"{two.measuring / one.measuring:.2f}; startup + finishing: "
          f"{two.startup + two.finishing:.1f} s against {one.startup + one.finishing:.1f} s")


if __name__ == "__main__":
    run_main(main)
