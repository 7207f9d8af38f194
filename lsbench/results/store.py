"""The results file: one Parquet file of rows in `schema.ARROW_SCHEMA`, plus small part files
beside it while a job runs.

An append writes its rows as one small part file in the hidden sidecar directory
`.<name>.parts/` (temp file, fsync, rename), so the cost of a row does not grow with the file.
Compaction folds the parts into the single user-facing file: the whole table goes to a temp file
that is fsynced and renamed over the file, and only then are the parts deleted. A crash between
the two leaves parts whose rows are already in the file; they are recognised by their key
(run_id, example_id, repeat) and dropped, so a row is never counted twice. Readers see the file
and its parts together: `report` and `plot` work mid-run and after a crash.

One writer at a time: a job holds an OS lock (`fcntl.flock` on `.<name>.lock`) for its lifetime,
and a second writer is refused up front. A file that lsbench did not write is refused and left
byte-for-byte untouched: `--out` pointing at someone else's data must never destroy it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lsbench import __version__
from lsbench.errors import LsbenchError, one_line
from lsbench.results.schema import ARROW_SCHEMA, COLUMN_NAMES, REMOVED_COLUMNS, SCHEMA_VERSION

METADATA_KEY = b"lsbench"
CREATED_BY = f"lsbench {__version__}"
_KNOWN_COLUMNS = frozenset(COLUMN_NAMES)


class _Refused(Exception):
    """Why a file is not a usable lsbench results file; callers phrase the LsbenchError."""


def _stat_key(path: Path) -> tuple[int, int, int] | None:
    """Identity of the file's current version, to notice when someone else replaced it."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def _load(path: Path) -> tuple[pa.Table, dict]:
    """Read and validate an existing results file; raise _Refused with the reason otherwise."""
    try:
        pf = pq.ParquetFile(path)
        kv = pf.metadata.metadata or {}
    except (pa.ArrowException, OSError, ValueError) as e:
        raise _Refused(f"is not a readable Parquet file ({one_line(e)})") from e
    if METADATA_KEY not in kv:
        raise _Refused("is not an lsbench results file (no lsbench metadata)")
    try:
        meta = json.loads(kv[METADATA_KEY])
        version = meta["schema_version"]
        if not isinstance(version, int):
            raise TypeError("schema_version is not an integer")
    except (ValueError, KeyError, TypeError) as e:
        raise _Refused(f"has unreadable lsbench metadata ({one_line(e)})") from e
    if version > SCHEMA_VERSION:
        raise _Refused(f"was written by a newer lsbench (schema version {version}, this lsbench "
                       f"reads up to {SCHEMA_VERSION}); upgrade lsbench")
    names = pf.schema_arrow.names
    legacy = version < SCHEMA_VERSION
    if legacy:  # an older lsbench's file: its removed columns go, new ones read as nulls
        names = [c for c in names if c not in REMOVED_COLUMNS]
    missing = [c for c in COLUMN_NAMES if c not in names]
    if missing and not legacy:
        raise _Refused(f"lacks lsbench columns ({', '.join(missing[:5])}"
                       f"{', ...' if len(missing) > 5 else ''})")
    extra = [c for c in names if c not in _KNOWN_COLUMNS]
    if extra:
        # Rewriting would silently drop them, so treat the file as not ours.
        raise _Refused(f"has columns lsbench does not know ({', '.join(extra[:5])})")
    try:
        table = pf.read(columns=[c for c in COLUMN_NAMES if c in names])
        for name in missing:
            field = ARROW_SCHEMA.field(name)
            table = table.append_column(field, pa.nulls(table.num_rows, field.type))
        table = table.select(COLUMN_NAMES).cast(ARROW_SCHEMA)
    except (pa.ArrowException, OSError, ValueError) as e:
        raise _Refused(f"is corrupt or has wrong column types ({one_line(e)})") from e
    return table, meta


def _check_path(path: Path) -> None:
    if path.is_dir():
        raise LsbenchError(f"results file {path} is a directory; choose a .parquet file for --out")


def parts_dir(path: Path) -> Path:
    """The hidden sidecar directory holding the part files of `path`."""
    return path.with_name(f".{path.name}.parts")


def lock_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.lock")


_PART = re.compile(r"part-(\d{10})-\d+\.parquet")


def _repeated(keys: list) -> set:
    seen: set = set()
    return {k for k in keys if k in seen or seen.add(k)}


def _keys(table: pa.Table) -> list[tuple[str, str, int]]:
    cols = [table.column(c).to_pylist() for c in ("run_id", "example_id", "repeat")]
    return list(zip(*cols, strict=True))


@dataclass
class _Snapshot:
    """A results file and its parts as read at one moment, part rows already in the file (or in
    an earlier part) dropped."""
    file: pa.Table
    meta: dict
    stat: tuple[int, int, int] | None
    parts: list[pa.Table] = field(default_factory=list)  # unique rows of each part, in order
    part_paths: list[Path] = field(default_factory=list)  # every part file seen, to delete
    keys: set[tuple[str, str, int]] = field(default_factory=set)
    next_seq: int = 0

    def table(self) -> pa.Table:
        if not self.parts:
            return self.file
        return pa.concat_tables([self.file, *self.parts]).combine_chunks()


def _read(path: Path) -> _Snapshot:
    """The file and its parts; raise _Refused when either is not lsbench's."""
    # Parts first, then the file: a compaction in between moves rows from parts into the file,
    # where the key check below finds them; reading the other way round could miss them.
    found = []
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        for p in parts_dir(path).iterdir():
            m = _PART.fullmatch(p.name)
            if m:
                found.append((int(m.group(1)), p))
    parts = []
    for seq, p in sorted(found):
        try:
            table, _ = _load(p)
        except _Refused as e:
            if not p.exists():  # compacted and deleted since we listed it
                continue
            raise _Refused(f"has a bad part file {p.name} ({e})") from None
        parts.append((seq, p, table))
    stat = _stat_key(path)
    file, meta = _load(path) if stat is not None else (ARROW_SCHEMA.empty_table(), {})
    snap = _Snapshot(file.replace_schema_metadata(None), meta, stat,
                     next_seq=max(found)[0] + 1 if found else 0)
    snap.keys = {k for k in _keys(file) if k[0] is not None}
    for _, p, table in parts:
        keys = _keys(table)
        fresh = [k not in snap.keys for k in keys]
        snap.part_paths.append(p)
        if any(fresh):
            snap.parts.append((table if all(fresh) else table.filter(pa.array(fresh)))
                              .replace_schema_metadata(None))
            snap.keys.update(keys)
    return snap


def _with_meta(table: pa.Table, created_by: str) -> pa.Table:
    meta = {"schema_version": SCHEMA_VERSION, "created_by": created_by, "written_by": CREATED_BY}
    return table.replace_schema_metadata({METADATA_KEY: json.dumps(meta).encode()})


# Parts live only until the next compaction: written plainly, they cost less per row.
_PART_OPTIONS = {"compression": "none", "use_dictionary": False, "write_statistics": False}


def _write_atomic(table: pa.Table, dest: Path, tmp: Path, expected: object = False,
                  **options: object) -> None:
    """Write to `tmp`, fsync, rename over `dest`. With `expected` (a _stat_key), refuse when
    `dest` changed since it was read. OSError and LsbenchError propagate; `tmp` never stays."""
    try:
        with open(tmp, "wb") as f:
            pq.write_table(table, f, **options)
            f.flush()
            os.fsync(f.fileno())
        # Someone may have replaced the file since we validated it; never clobber theirs.
        if expected is not False and _stat_key(dest) != expected:
            raise LsbenchError(f"results file {dest} changed on disk while lsbench was "
                               "writing it; refusing to overwrite it — rerun to resume")
        os.replace(tmp, dest)
        _fsync_dir(dest.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable; not possible on every OS, and harmless to skip there.
    if not hasattr(os, "O_DIRECTORY"):
        return
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class ResultStore:
    """One results file and its parts: one row per (example, run, repeat).

    Writers call `lock()` (or use `locked()`) first; while the lock is held the store trusts its
    cache, so an append costs the same at any size. Without the lock every read re-reads the
    disk, which suits readers of a file someone else is writing.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        _check_path(self.path)
        self._lock_fd: int | None = None
        self._snap = self._read()  # validate now, before any benchmarking time is spent
        self._created_by = self._snap.meta.get("created_by", CREATED_BY)
        self._remove_stale_temps()

    # -- reading ---------------------------------------------------------------------------

    @property
    def schema_version(self) -> int:
        """Schema version of the results file as last read (older ones: resume refused)."""
        return int(self._snap.meta.get("schema_version", SCHEMA_VERSION))

    def _read(self) -> _Snapshot:
        _check_path(self.path)
        try:
            return _read(self.path)
        except _Refused as e:
            raise LsbenchError(f"results file {self.path} {e}; refusing to overwrite it "
                               "(left unchanged) — choose another --out") from None

    def _current(self) -> _Snapshot:
        if self._lock_fd is None:  # someone else may be writing: look again
            self._snap = self._read()
        return self._snap

    def completed_keys(self) -> set[tuple[str, str, int]]:
        """(run_id, example_id, repeat) of every measured generation in the file and parts."""
        return set(self._current().keys)

    def completed_run_ids(self) -> set[str]:
        """run_ids with rows in the file."""
        return {k[0] for k in self.completed_keys()}

    def rows(self) -> pd.DataFrame:
        """All rows; an empty DataFrame with the schema's columns when there is no file."""
        return self.table().to_pandas()

    def table(self) -> pa.Table:
        """All rows as an Arrow table with the schema's columns."""
        return self._current().table()

    def has_parts(self) -> bool:
        return bool(self._current().part_paths)

    # -- the writer lock -------------------------------------------------------------------

    def lock(self) -> None:
        """Become the only writer until `unlock()` or process exit; refuse (LsbenchError) when
        another process holds the lock. Touches nothing but the lock file."""
        if self._lock_fd is not None:
            return
        path = lock_path(self.path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise LsbenchError(f"cannot create lock file {path} ({one_line(e)})") from e
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = os.read(fd, 32).decode(errors="replace").strip()
                os.close(fd)
                who = f" (pid {holder})" if holder.isdigit() else ""
                raise LsbenchError(f"results file {self.path} is being written by another "
                                   f"lsbench{who}; wait for it to finish or choose another "
                                   "--out") from None
            # The holder before us deletes the lock file on release: if ours is gone or was
            # replaced, lock the one now at the path instead.
            try:
                if os.stat(path).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._lock_fd = fd
        self._snap = self._read()  # from now on nobody else writes: the cache is the truth

    def unlock(self) -> None:
        if self._lock_fd is None:
            return
        with contextlib.suppress(OSError):  # while still held: nobody else is using it
            lock_path(self.path).unlink()
        fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
        os.close(self._lock_fd)
        self._lock_fd = None

    @contextlib.contextmanager
    def locked(self) -> Iterator[ResultStore]:
        """The lock for a block; re-entrant (an outer holder keeps it afterwards)."""
        held = self._lock_fd is not None
        self.lock()
        try:
            yield self
        finally:
            if not held:
                self.unlock()

    # -- writing ---------------------------------------------------------------------------

    def append(self, rows: list[dict]) -> None:
        """Add rows of completed generations as one atomic part file."""
        if not rows:
            return
        for i, row in enumerate(rows):
            unknown = set(row) - _KNOWN_COLUMNS
            if unknown:
                raise ValueError(f"row {i} has keys not in the schema: {sorted(unknown)}")
            if not row.get("run_id"):
                raise ValueError(f"row {i} has no run_id")
        self.append_table(pa.Table.from_pylist(rows, schema=ARROW_SCHEMA))

    def append_table(self, new: pa.Table) -> None:
        """Add the rows of an Arrow table with the schema's columns as one atomic part file."""
        new = new.select(COLUMN_NAMES).cast(ARROW_SCHEMA).replace_schema_metadata(None)
        snap = self._current()
        keys = _keys(new)
        if any(k[0] is None for k in keys):
            raise ValueError("rows without run_id")
        dup = (set(keys) & snap.keys) | _repeated(keys)
        if dup:
            raise ValueError(f"rows already in {self.path}: {sorted(dup, key=str)[:5]}")
        directory = parts_dir(self.path)
        part = directory / f"part-{snap.next_seq:010d}-{os.getpid()}.parquet"
        try:
            directory.mkdir(parents=True, exist_ok=True)
            _write_atomic(_with_meta(new, self._created_by), part,
                          directory / f".{part.name}.tmp-{os.getpid()}", **_PART_OPTIONS)
        except OSError as e:
            with contextlib.suppress(OSError):
                directory.rmdir()  # only when empty
            raise LsbenchError(f"cannot write results file {self.path} ({one_line(e)}); "
                               "the previous file is unchanged") from e
        snap.parts.append(new)
        snap.part_paths.append(part)
        snap.keys.update(keys)
        snap.next_seq += 1

    def compact(self) -> bool:
        """Fold the parts into the results file; False when there were none."""
        snap = self._current()
        if not snap.part_paths:
            return False
        self._replace(snap.table(), snap)
        return True

    def drop_runs(self, run_ids: set[str]) -> None:
        """Remove the rows of these runs (for --force), atomically; no-op when none are present."""
        snap = self._current()
        if not set(run_ids) & {k[0] for k in snap.keys}:
            return
        table = snap.table()
        drop = pc.is_in(table.column("run_id"), value_set=pa.array(sorted(run_ids), pa.string()))
        self._replace(table.filter(pc.invert(pc.fill_null(drop, False))), snap)

    def _replace(self, table: pa.Table, snap: _Snapshot) -> None:
        """Write `table` as the results file, then delete the parts it absorbed."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            _write_atomic(_with_meta(table, self._created_by), self.path,
                          self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}"),
                          expected=snap.stat)
        except OSError as e:
            raise LsbenchError(f"cannot write results file {self.path} ({one_line(e)}); "
                               "the previous file is unchanged") from e
        # A crash from here on leaves parts whose rows the file already has: _read drops them.
        for p in snap.part_paths:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        with contextlib.suppress(OSError):
            parts_dir(self.path).rmdir()
        meta = {**snap.meta, "schema_version": SCHEMA_VERSION}  # as _with_meta wrote it
        self._snap = _Snapshot(table, meta, _stat_key(self.path),
                               keys={k for k in _keys(table) if k[0] is not None})

    def _remove_stale_temps(self) -> None:
        """Delete temp files of our naming pattern left by killed writers (never real files)."""
        for directory, stem in ((self.path.parent, re.escape(self.path.name)),
                                (parts_dir(self.path), r"part-\d+-\d+\.parquet")):
            pattern = re.compile(rf"\.{stem}\.tmp-(\d+)")
            try:
                candidates = list(directory.iterdir())
            except OSError:
                continue
            for p in candidates:
                m = pattern.fullmatch(p.name)
                pid = int(m.group(1)) if m else None
                if pid is not None and pid != os.getpid() and not _pid_alive(pid):
                    with contextlib.suppress(OSError):
                        p.unlink()


def read_results(paths: list[str | Path]) -> pd.DataFrame:
    """Rows of several results files (each with its parts), validated like ResultStore, plus a
    `source_file` column."""
    if not paths:
        raise LsbenchError("no results files given")
    tables = []
    for p in map(Path, paths):
        _check_path(p)
        if not p.exists() and not parts_dir(p).is_dir():
            raise LsbenchError(f"results file {p} not found")
        try:
            table = _read(p).table()
        except _Refused as e:
            raise LsbenchError(f"results file {p} {e}; cannot read it (left unchanged)") from None
        source = pa.array([p.name] * table.num_rows, pa.string())
        tables.append(table.append_column("source_file", source))
    return pa.concat_tables(tables).to_pandas()
