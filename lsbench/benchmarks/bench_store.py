"""`make bench-store`: what appending one result row costs as the results grow.

    python -m lsbench.benchmarks.bench_store [--sizes 1000,5000,10000,25000,50000] [--window 500]

One locked ResultStore in a temp directory receives rows one at a time, as a sweep stores
them; at each size N the next `window` appends are timed and printed as
`append at N rows: X ms/row`. Rows have a realistic width: every schema column set, per-layer
list columns of 30 layers, 64 output ids and a few hundred characters of text. The last lines
time the compaction of all parts into the file and say whether the targets hold
(<= 5 ms/row at the largest size; largest <= 2x smallest). Exit status 0 either way.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

import pyarrow as pa

from lsbench.errors import run_main
from lsbench.results.schema import COLUMNS
from lsbench.results.store import ResultStore

TARGET_MS, TARGET_GROWTH = 5.0, 2.0
LAYERS, OUTPUT_IDS = 30, 64


def realistic_row(i: int, rng: random.Random) -> dict:
    """A row with every column of the schema filled the way a sweep fills it."""
    row: dict = {}
    for name, typ, _ in COLUMNS:
        if pa.types.is_list(typ):
            # per token (output ids, ar's decode steps) or per layer
            length = OUTPUT_IDS if name in ("output_ids", "step_end_s", "step_tokens") \
                else LAYERS
            if pa.types.is_string(typ.value_type):  # stop_strings: a few short texts
                row[name] = [f"stop{rng.randrange(10)}" for _ in range(2)]
            elif pa.types.is_floating(typ.value_type):
                row[name] = sorted(rng.random() for _ in range(length))
            else:
                row[name] = [rng.randrange(50_000) for _ in range(length)]
        elif pa.types.is_string(typ):
            row[name] = f"{name}-{rng.randrange(10**6)}" + " text" * (60 if "text" in name else 0)
        elif pa.types.is_boolean(typ):
            row[name] = rng.random() < 0.5
        elif pa.types.is_integer(typ):
            row[name] = rng.randrange(10**6)
        else:
            row[name] = rng.random()
    row.update(run_id=f"run{i % 97:03d}", example_id=f"ex{i // 97}", repeat=0)
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1000,5000,10000,25000,50000")
    parser.add_argument("--window", type=int, default=500)
    args = parser.parse_args(argv)
    sizes = sorted(int(s) for s in args.sizes.split(","))
    rng = random.Random(0)
    rows = [realistic_row(i, rng) for i in range(256)]  # reused, with fresh keys
    results: list[tuple[int, float]] = []
    with tempfile.TemporaryDirectory(prefix="lsbench-bench-store-") as tmp:
        store = ResultStore(Path(tmp) / "bench.parquet")
        with store.locked():
            n = 0

            def append() -> None:
                nonlocal n
                row = dict(rows[n % len(rows)], run_id=f"run{n % 97:03d}",
                           example_id=f"ex{n // 97}")
                store.append([row])
                n += 1

            for size in sizes:
                while n < size:
                    append()
                start = time.perf_counter()
                for _ in range(args.window):
                    append()
                ms = 1000 * (time.perf_counter() - start) / args.window
                results.append((size, ms))
                print(f"append at {size} rows: {ms:.2f} ms/row", flush=True)
            start = time.perf_counter()
            store.compact()
            print(f"compact {n} rows: {time.perf_counter() - start:.1f} s", flush=True)
    largest, smallest = results[-1][1], results[0][1]
    growth = largest / smallest
    print(f"largest/smallest: {growth:.2f}x (target <= {TARGET_GROWTH:g}x); "
          f"{largest:.2f} ms/row at {results[-1][0]} rows (target <= {TARGET_MS:g}): "
          f"{'met' if growth <= TARGET_GROWTH and largest <= TARGET_MS else 'NOT met'}")


if __name__ == "__main__":
    run_main(main)
