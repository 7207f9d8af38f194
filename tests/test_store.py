"""ResultStore: round trips, atomicity under crashes, refusal to touch files it did not write."""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lsbench import __version__
from lsbench.errors import LsbenchError
from lsbench.results.schema import COLUMN_NAMES, SCHEMA_VERSION
from lsbench.results.store import ResultStore, read_results


def run_rows(run_id: str, n: int = 2) -> list[dict]:
    return [{"run_id": run_id, "strategy": "layerskip", "repeat": i, "example_index": i,
             "output_ids": [1, 2, 3 + i], "accept_hist": [], "tokens_per_s": 10.0 + i,
             "acceptance_rate": float("nan"), "rouge1": None, "matches_baseline": True}
            for i in range(n)]


def write(path: Path, rows: list[dict]) -> None:
    """Append and compact: the results file itself holds the rows."""
    store = ResultStore(path)
    store.append(rows)
    store.compact()


def test_round_trip_with_lists_nan_and_nulls(tmp_path):
    path = tmp_path / "r.parquet"
    store = ResultStore(path)
    assert not path.exists()
    assert list(store.rows().columns) == COLUMN_NAMES and store.rows().empty
    assert store.completed_run_ids() == set()

    store.append(run_rows("a"))
    store.append(run_rows("b", 3))
    for df in (store.rows(), ResultStore(path).rows()):  # cached and freshly read
        assert list(df.columns) == COLUMN_NAMES
        assert len(df) == 5 and list(df.run_id) == ["a", "a", "b", "b", "b"]
        assert [list(x) for x in df.output_ids] == [[1, 2, 3], [1, 2, 4], [1, 2, 3], [1, 2, 4],
                                                    [1, 2, 5]]
        assert list(df.accept_hist.iloc[0]) == []
        assert list(df.tokens_per_s) == [10.0, 11.0, 10.0, 11.0, 12.0]
        assert all(math.isnan(x) for x in df.acceptance_rate)
        assert df.rouge1.isna().all() and df.draft_model.isna().all()  # missing keys -> null
        assert df.matches_baseline.all()
    assert ResultStore(path).completed_run_ids() == {"a", "b"}


def test_file_metadata_and_arrow_types(tmp_path):
    path = tmp_path / "r.parquet"
    write(path, run_rows("a"))
    meta = json.loads(pq.ParquetFile(path).metadata.metadata[b"lsbench"])
    assert meta["schema_version"] == SCHEMA_VERSION
    assert meta["created_by"] == f"lsbench {__version__}"
    schema = pq.read_schema(path)
    assert schema.field("output_ids").type == pa.list_(pa.int64())
    assert schema.names == COLUMN_NAMES


def test_bad_rows_are_programming_errors(tmp_path):
    store = ResultStore(tmp_path / "r.parquet")
    with pytest.raises(ValueError, match="not_a_column"):
        store.append([{"run_id": "a", "not_a_column": 1}])
    with pytest.raises(ValueError, match="run_id"):
        store.append([{"strategy": "ar"}])
    store.append(run_rows("a"))
    with pytest.raises(ValueError, match="already"):
        store.append(run_rows("a"))
    with pytest.raises(ValueError, match="already"):
        ResultStore(tmp_path / "r.parquet").append(run_rows("a"))
    assert len(ResultStore(tmp_path / "r.parquet").rows()) == 2


def test_drop_runs(tmp_path):
    path = tmp_path / "r.parquet"
    store = ResultStore(path)
    for rid in "abc":
        store.append(run_rows(rid))
    store.drop_runs({"b", "zzz"})  # compacts too
    assert not (tmp_path / ".r.parquet.parts").exists()
    assert store.completed_run_ids() == {"a", "c"}
    assert ResultStore(path).completed_run_ids() == {"a", "c"}
    assert list(ResultStore(path).rows().run_id) == ["a", "a", "c", "c"]
    before = path.read_bytes()
    store.drop_runs({"zzz"})  # nothing to drop: file untouched
    assert path.read_bytes() == before
    store.append(run_rows("b"))  # a forced rerun can now append it again
    assert ResultStore(path).completed_run_ids() == {"a", "b", "c"}


def test_failed_replace_leaves_old_file_and_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "r.parquet"
    store = ResultStore(path)
    store.append(run_rows("a"))
    store.compact()
    before = path.read_bytes()

    def boom(src, dst):
        raise OSError("disk on fire")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(LsbenchError, match=r"cannot write.*unchanged"):
        store.append(run_rows("b"))
    with pytest.raises(LsbenchError):
        store.drop_runs({"a"})
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.parquet"]
    assert not store.has_parts()
    assert store.completed_run_ids() == {"a"}  # the cache did not record the failed write
    store.append(run_rows("b"))
    assert ResultStore(path).completed_run_ids() == {"a", "b"}


@pytest.mark.parametrize("content", [os.urandom(4096), b"", b"PAR1" + os.urandom(200) + b"PAR1"])
def test_corrupt_file_refused_and_unchanged(tmp_path, content):
    path = tmp_path / "x.parquet"
    path.write_bytes(content)
    with pytest.raises(LsbenchError) as e:
        ResultStore(path)
    msg = str(e.value)
    assert str(path) in msg and "refusing to overwrite" in msg and "\n" not in msg
    with pytest.raises(LsbenchError, match=r"x\.parquet"):
        read_results([path])
    assert path.read_bytes() == content


def test_foreign_parquet_refused_and_unchanged(tmp_path):
    path = tmp_path / "x.parquet"
    pd.DataFrame({"run_id": ["a"], "other": [1]}).to_parquet(path)
    before = path.read_bytes()
    with pytest.raises(LsbenchError, match=r"not an lsbench results file.*refusing.*--out"):
        ResultStore(path)
    with pytest.raises(LsbenchError, match="not an lsbench results file"):
        read_results([path])
    assert path.read_bytes() == before


def test_lsbench_metadata_but_missing_columns_refused(tmp_path):
    path = tmp_path / "x.parquet"
    meta = {b"lsbench": json.dumps({"schema_version": SCHEMA_VERSION}).encode()}
    pq.write_table(pa.table({"run_id": ["a"]}).replace_schema_metadata(meta), path)
    before = path.read_bytes()
    with pytest.raises(LsbenchError, match="lacks lsbench columns"):
        ResultStore(path)
    assert path.read_bytes() == before


def test_newer_schema_version_refused(tmp_path):
    path = tmp_path / "r.parquet"
    write(path, run_rows("a"))
    table = pq.read_table(path)
    meta = {b"lsbench": json.dumps({"schema_version": SCHEMA_VERSION + 1}).encode()}
    pq.write_table(table.replace_schema_metadata(meta), path)
    before = path.read_bytes()
    with pytest.raises(LsbenchError, match="newer lsbench"):
        ResultStore(path)
    assert path.read_bytes() == before


def test_directory_refused(tmp_path):
    with pytest.raises(LsbenchError, match="directory"):
        ResultStore(tmp_path)
    with pytest.raises(LsbenchError, match="directory"):
        read_results([tmp_path])


def test_stale_temp_of_dead_writer_removed(tmp_path):
    path = tmp_path / "r.parquet"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".r.parquet.tmp-{dead.pid}"
    stale.write_bytes(b"half a parquet file")
    live = tmp_path / f".r.parquet.tmp-{os.getppid()}"  # a live pid: maybe a writer, keep it
    live.write_bytes(b"x")
    other = tmp_path / ".other.parquet.tmp-1"
    other.write_bytes(b"x")
    ResultStore(path)
    assert not stale.exists() and live.exists() and other.exists()


def test_read_results_adds_source_file(tmp_path):
    a, b = tmp_path / "a.parquet", tmp_path / "sub" / "b.parquet"
    ResultStore(a).append(run_rows("r1"))
    ResultStore(b).append(run_rows("r2", 3))  # parent directory is created on write
    df = read_results([a, str(b)])
    assert len(df) == 5
    assert list(df.source_file) == ["a.parquet"] * 2 + ["b.parquet"] * 3
    assert list(df.columns) == [*COLUMN_NAMES, "source_file"]
    assert [list(x) for x in df.output_ids[:2]] == [[1, 2, 3], [1, 2, 4]]
    with pytest.raises(LsbenchError, match=r"results file .*missing\.parquet not found"):
        read_results([a, tmp_path / "missing.parquet"])
    with pytest.raises(LsbenchError):
        read_results([])


CHILD = textwrap.dedent("""
    import sys
    from lsbench.results.store import ResultStore
    store = ResultStore(sys.argv[1])
    store.lock()
    i = len(store.completed_run_ids())
    while True:
        store.append([{"run_id": f"run{i:05d}", "repeat": r, "output_ids": list(range(50)),
                       "output_text": "x" * 200} for r in range(3)])
        i += 1
        if i % 4 == 0:  # kills land in compactions too
            store.compact()
        print(i, flush=True)
""")


def check_prefix(path: Path) -> int:
    df = ResultStore(path).rows()
    n = len(df) // 3
    assert len(df) == 3 * n
    assert list(df.run_id) == [f"run{i:05d}" for i in range(n) for _ in range(3)]
    assert list(df.repeat) == [0, 1, 2] * n
    return n


def test_sigkill_during_appends_never_tears_the_file(tmp_path):
    path = tmp_path / "r.parquet"
    rng = random.Random(0)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = 0
    for _ in range(4):
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(path)], env=env,
                                 stdout=subprocess.PIPE, text=True)
        assert child.stdout.readline()  # it has appended once and is appending more
        time.sleep(rng.uniform(0.0, 0.15))
        child.send_signal(signal.SIGKILL)
        child.wait()
        child.stdout.close()
        n = check_prefix(path)
        assert n > done  # each child resumed after the last completed run
        done = n
    store = ResultStore(path)  # a new store continues where the killed ones stopped
    store.append([{"run_id": f"run{done:05d}", "repeat": r} for r in range(3)])
    assert check_prefix(path) == done + 1
    assert not list(tmp_path.glob(".r.parquet.tmp-*"))  # stale temps were cleaned on open


def test_appends_go_to_parts_readers_see_them_and_compaction_folds_them(tmp_path):
    path = tmp_path / "r.parquet"
    store = ResultStore(path)
    store.append(run_rows("a"))
    store.append(run_rows("b"))
    assert not path.exists()  # mid-run: only parts
    assert len(list((tmp_path / ".r.parquet.parts").glob("part-*.parquet"))) == 2
    assert list(read_results([path]).run_id) == ["a", "a", "b", "b"]
    assert ResultStore(path).completed_run_ids() == {"a", "b"}
    assert store.compact() and not store.compact()
    assert not (tmp_path / ".r.parquet.parts").exists()
    store.append(run_rows("c"))  # file and parts together
    assert list(read_results([path]).run_id) == ["a", "a", "b", "b", "c", "c"]
    assert list(ResultStore(path).rows().run_id) == ["a", "a", "b", "b", "c", "c"]
    store.compact()
    assert list(pq.read_table(path).column("run_id").to_pylist()) == ["a", "a", "b", "b", "c", "c"]


def test_crash_between_compaction_and_part_deletion_never_duplicates(tmp_path, monkeypatch):
    path = tmp_path / "r.parquet"
    store = ResultStore(path)
    store.append(run_rows("a"))
    store.append(run_rows("b"))

    def killed(self, *args, **kwargs):
        raise KeyboardInterrupt  # the process dies right after the compacted file is in place

    monkeypatch.setattr(Path, "unlink", killed)
    with pytest.raises(KeyboardInterrupt):
        store.compact()
    monkeypatch.undo()
    assert len(pq.read_table(path)) == 4  # the file has every row ...
    assert len(list((tmp_path / ".r.parquet.parts").glob("part-*"))) == 2  # ... parts remain
    again = ResultStore(path)
    assert list(again.rows().run_id) == ["a", "a", "b", "b"]  # recognised by key, not twice
    assert len(read_results([path])) == 4
    again.append(run_rows("c"))
    again.compact()
    assert list(pq.read_table(path).column("run_id").to_pylist()) == ["a", "a", "b", "b", "c", "c"]
    assert not (tmp_path / ".r.parquet.parts").exists()


def test_corrupt_part_refused(tmp_path):
    path = tmp_path / "r.parquet"
    ResultStore(path).append(run_rows("a"))
    part = next((tmp_path / ".r.parquet.parts").glob("part-*"))
    part.write_bytes(b"garbage")
    with pytest.raises(LsbenchError, match=r"bad part file part-.*refusing"):
        ResultStore(path)
    assert part.read_bytes() == b"garbage"


LOCKER = textwrap.dedent("""
    import sys, time
    from lsbench.results.store import ResultStore
    store = ResultStore(sys.argv[1])
    store.lock()
    print("locked", flush=True)
    time.sleep(60)
""")


def test_second_writer_refused_while_a_process_holds_the_lock(tmp_path):
    path = tmp_path / "r.parquet"
    write(path, run_rows("a"))
    before = path.read_bytes()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    holder = subprocess.Popen([sys.executable, "-c", LOCKER, str(path)], env=env,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        store = ResultStore(path)  # reading is fine
        with pytest.raises(LsbenchError, match=rf"being written by another lsbench "
                                               rf"\(pid {holder.pid}\)") as e:
            store.lock()
        assert "\n" not in str(e.value)
        assert path.read_bytes() == before
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
    with store.locked():  # the dead holder's lock is gone with its process
        with store.locked():  # re-entrant
            store.append(run_rows("b"))
        assert store._lock_fd is not None
    assert store._lock_fd is None


def test_bench_store_smoke(capsys):
    from lsbench.benchmarks import bench_store

    bench_store.main(["--sizes", "5,20", "--window", "3"])
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines[:2]] == ["append at 5 rows", "append at 20 rows"]
    assert all(line.endswith("ms/row") for line in lines[:2])
    assert lines[2].startswith("compact 23 rows") and "largest/smallest" in lines[3]
    row = bench_store.realistic_row(0, random.Random(0))
    assert len(row["output_ids"]) == 64 and len(row["layer_tokens_decode"]) == 30
    assert set(row) == set(COLUMN_NAMES)
