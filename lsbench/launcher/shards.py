"""Sharding a job without Ray (Slurm arrays, plain loops): `--shard I/N` picks a deterministic
slice of the units, `lsbench merge` combines the shard files.

A unit is one example (with --batch-size, one batch of B consecutive examples) with all of
its runs and repeats, so every speedup in a shard is taken against a baseline measured in the
same process on the same device, on the same batch. Shard I of N takes the examples at
positions I-1, I-1+N, I-1+2N, ... of the job's selection; at each batch size B > 1 the batches
with those ids (`runner.shard_batches`): a batch is never split over shards.
"""

from __future__ import annotations

import re
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from lsbench.errors import LsbenchError
from lsbench.results.store import ResultStore, parts_dir

# What makes rows of two files parts of one job besides their run ids.
DECODING_COLUMNS = ("do_sample", "temperature", "top_k", "top_p", "seed", "max_new_tokens",
                    "max_input_tokens", "prompt_format")
_SHARD_SUFFIX = re.compile(r"\.shard-\d+-of-\d+$")


def parse_shard(text: str) -> tuple[int, int]:
    """'2/3' -> (2, 3); one-line error otherwise."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not m or not 1 <= int(m.group(1)) <= int(m.group(2)):
        raise LsbenchError(f"--shard must be I/N with 1 <= I <= N (e.g. 2/3), got {text!r}")
    return int(m.group(1)), int(m.group(2))


def shard_path(out: Path, shard: tuple[int, int]) -> Path:
    """results/x.parquet -> results/x.shard-2-of-3.parquet (the shard's own file)."""
    stem = _SHARD_SUFFIX.sub("", out.stem)
    return out.with_name(f"{stem}.shard-{shard[0]}-of-{shard[1]}{out.suffix or '.parquet'}")


def _describe(table: pa.Table) -> dict[str, object]:
    """What must agree between the shard files of one job."""
    def values(col: str) -> tuple:
        return tuple(sorted(map(str, pc.unique(table.column(col)).to_pylist())))

    return {"run ids": values("run_id"), "dataset fingerprint": values("dataset_fingerprint"),
            "decoding settings": tuple(values(c) for c in DECODING_COLUMNS)}


def merge(out: Path, shards: list[Path]) -> int:
    """Write the rows of `shards` (files of one job) to the new results file `out`; returns the
    number of rows. Refuses files of another job, duplicate rows and an existing `out`."""
    if not shards:
        raise LsbenchError("no shard files given")
    if out.exists() or parts_dir(out).exists():
        raise LsbenchError(f"{out} already exists; merge writes a new results file")
    tables: list[pa.Table] = []
    first: tuple[Path, dict] | None = None
    seen: dict[tuple, Path] = {}
    for path in shards:
        if not path.exists() and not parts_dir(path).is_dir():
            raise LsbenchError(f"shard file {path} not found")
        table = ResultStore(path).table()
        if table.num_rows == 0:
            continue
        described = _describe(table)
        if first is None:
            first = (path, described)
        for what, value in described.items():
            if value != first[1][what]:
                raise LsbenchError(f"{path} is from another job than {first[0]} ({what} "
                                   "differ); refusing to merge")
        keys = zip(*(table.column(c).to_pylist() for c in ("run_id", "example_id", "repeat")),
                   strict=True)
        for key in keys:
            if key in seen:
                raise LsbenchError(f"row (run {key[0]}, example {key[1]}, repeat {key[2]}) is in "
                                   f"both {seen[key]} and {path}; refusing to merge")
            seen[key] = path
        tables.append(table)
    if not tables:
        raise LsbenchError("the shard files have no rows")
    merged = pa.concat_tables(tables)
    order = pc.sort_indices(merged, [("repeat", "ascending"), ("example_index", "ascending")])
    store = ResultStore(out)
    with store.locked():
        store.append_table(merged.take(order))
        store.compact()
    return merged.num_rows
