"""The results file: one Parquet file of rows in `schema.ARROW_SCHEMA`, rewritten atomically.

Every change writes the whole table to a temp file next to the target, fsyncs it and renames it
over the target, so a crash at any moment (SIGKILL included) leaves the old file or the new one,
never a torn one. A file that lsbench did not write is refused and left byte-for-byte untouched:
`--out` pointing at someone else's data must never destroy it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lsbench import __version__
from lsbench.errors import LsbenchError, one_line
from lsbench.schema import ARROW_SCHEMA, COLUMN_NAMES, REMOVED_COLUMNS, SCHEMA_VERSION

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
    """One Parquet file of result rows (schema.ARROW_SCHEMA), one row per (example, run, repeat).

    A single writer is assumed (the runner); concurrent writers to one file would lose updates.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        _check_path(self.path)
        self._table: pa.Table | None = None  # cached contents of the file as last read/written
        self._keys: set[tuple[str, str, int]] = set()
        self._created_by = CREATED_BY
        self._stat: tuple[int, int, int] | None = None
        self.schema_version = SCHEMA_VERSION  # of the file as read (older: resume refused)
        self._current()  # validate now, before any benchmarking time is spent
        self._remove_stale_temps()

    # -- reading ---------------------------------------------------------------------------

    def _current(self) -> pa.Table:
        """The file's table, re-read only when the file changed since we last saw it."""
        key = _stat_key(self.path)
        if self._table is not None and key == self._stat:
            return self._table
        _check_path(self.path)
        if key is None:
            table, meta = ARROW_SCHEMA.empty_table(), {}
        else:
            try:
                table, meta = _load(self.path)
            except _Refused as e:
                raise LsbenchError(f"results file {self.path} {e}; refusing to overwrite it "
                                   "(left unchanged) — choose another --out") from None
        self._set(table, key)
        self._created_by = meta.get("created_by", CREATED_BY)
        self.schema_version = meta.get("schema_version", SCHEMA_VERSION)
        return table

    def _set(self, table: pa.Table, key: tuple[int, int, int] | None) -> None:
        self._table = table
        self._stat = key
        cols = [table.column(c).to_pylist() for c in ("run_id", "example_id", "repeat")]
        self._keys = {k for k in zip(*cols, strict=True) if k[0] is not None}

    def completed_keys(self) -> set[tuple[str, str, int]]:
        """(run_id, example_id, repeat) of every measured generation in the file."""
        self._current()
        return set(self._keys)

    def completed_run_ids(self) -> set[str]:
        """run_ids with rows in the file."""
        return {k[0] for k in self.completed_keys()}

    def rows(self) -> pd.DataFrame:
        """All rows; an empty DataFrame with the schema's columns when there is no file."""
        return self._current().to_pandas()

    # -- writing ---------------------------------------------------------------------------

    def append(self, rows: list[dict]) -> None:
        """Add rows of completed generations, atomically."""
        if not rows:
            return
        for i, row in enumerate(rows):
            unknown = set(row) - _KNOWN_COLUMNS
            if unknown:
                raise ValueError(f"row {i} has keys not in the schema: {sorted(unknown)}")
            if not row.get("run_id"):
                raise ValueError(f"row {i} has no run_id")
        new = pa.Table.from_pylist(rows, schema=ARROW_SCHEMA)
        current = self._current()
        keys = [(r["run_id"], r.get("example_id"), r.get("repeat")) for r in rows]
        dup = (set(keys) & self._keys) | ({k for k in keys if keys.count(k) > 1})
        if dup:
            raise ValueError(f"rows already in {self.path}: {sorted(dup, key=str)}")
        self._write(pa.concat_tables([current, new]))

    def drop_runs(self, run_ids: set[str]) -> None:
        """Remove the rows of these runs (for --force), atomically; no-op when none are present."""
        current = self._current()
        if not set(run_ids) & {k[0] for k in self._keys}:
            return
        drop = pc.is_in(current.column("run_id"), value_set=pa.array(sorted(run_ids), pa.string()))
        self._write(current.filter(pc.invert(pc.fill_null(drop, False))))

    def _temp_path(self) -> Path:
        return self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")

    def _write(self, table: pa.Table) -> None:
        meta = {"schema_version": SCHEMA_VERSION, "created_by": self._created_by,
                "written_by": CREATED_BY}
        table = table.replace_schema_metadata({METADATA_KEY: json.dumps(meta).encode()})
        tmp = self._temp_path()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                pq.write_table(table, f)
                f.flush()
                os.fsync(f.fileno())
            # Someone may have replaced the file since we validated it; never clobber theirs.
            if _stat_key(self.path) != self._stat:
                raise LsbenchError(f"results file {self.path} changed on disk while lsbench was "
                                   "writing it; refusing to overwrite it — rerun to resume")
            os.replace(tmp, self.path)
            _fsync_dir(self.path.parent)
        except OSError as e:
            raise LsbenchError(f"cannot write results file {self.path} ({one_line(e)}); "
                               "the previous file is unchanged") from e
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        self._set(table.replace_schema_metadata(None), _stat_key(self.path))
        self.schema_version = SCHEMA_VERSION

    def _remove_stale_temps(self) -> None:
        """Delete temp files of our naming pattern left by killed writers (never the real file)."""
        pattern = re.compile(rf"\.{re.escape(self.path.name)}\.tmp-(\d+)")
        try:
            candidates = list(self.path.parent.iterdir())
        except OSError:
            return
        for p in candidates:
            m = pattern.fullmatch(p.name)
            pid = int(m.group(1)) if m else None
            if pid is not None and pid != os.getpid() and not _pid_alive(pid):
                with contextlib.suppress(OSError):
                    p.unlink()


def read_results(paths: list[str | Path]) -> pd.DataFrame:
    """Rows of several results files, validated like ResultStore, plus a `source_file` column."""
    if not paths:
        raise LsbenchError("no results files given")
    tables = []
    for p in map(Path, paths):
        _check_path(p)
        if not p.exists():
            raise LsbenchError(f"results file {p} not found")
        try:
            table, _ = _load(p)
        except _Refused as e:
            raise LsbenchError(f"results file {p} {e}; cannot read it (left unchanged)") from None
        source = pa.array([p.name] * table.num_rows, pa.string())
        tables.append(table.append_column("source_file", source))
    return pa.concat_tables(tables).to_pandas()
