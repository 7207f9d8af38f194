"""Install an offline GPU bundle (made by `make gpu-bundle`) on the GPU machine, then run a
command with it: Python's standard library and pip only, since nothing else can be assumed
there and nothing can be fetched.

    python3 -m lsbench.gpu.install gpu-bundle [--target DIR] [-- COMMAND ...]
    python3 -m lsbench.gpu.install gpu-bundle --verify-present   # after copying each part

Every chunk of every part is checked against the manifest (size and sha256) before anything
is written; a missing part or a damaged chunk is refused in one line naming the part. The
chunks are joined, each whole file checked again, the wheels installed with `pip install
--no-index --no-deps --target DIR` and the data files copied under DIR. The variables the
check then needs (PYTHONPATH first of all) are printed as `export` lines and written to
DIR/env.sh; after `--`, COMMAND runs with them set (the install is skipped when DIR already
holds this very bundle, so a rerun on a warm machine costs nothing).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

MANIFEST = "manifest.json"
FORMAT = 1
STAMP = ".lsbench-bundle"  # in DIR: the sha256 of the manifest installed there
DEFAULT_TARGET = Path(tempfile.gettempdir()) / "lsbench-site"
_BLOCK = 1 << 20


class BundleError(Exception):
    """A bundle that cannot be installed: printed as one line, exit status 1."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(bundle: Path) -> tuple[dict, str]:
    """The manifest (every part holds the same copy, so any part that arrived gives it) and
    its sha256."""
    copies = sorted(bundle.glob(f"part-*/{MANIFEST}"))
    if not copies:
        raise BundleError(f"{bundle}: no part-N/{MANIFEST} found; copy the bundle's parts "
                          "into this folder first")
    texts = {p.read_bytes() for p in copies}
    if len(texts) > 1:
        raise BundleError(f"{bundle}: the parts hold different manifests (parts of two "
                          "bundles mixed?); make the bundle once and copy all its parts")
    text = texts.pop()
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BundleError(f"{copies[0]}: not a valid manifest ({exc.msg})") from None
    if manifest.get("format") != FORMAT:
        raise BundleError(f"{copies[0]}: manifest format {manifest.get('format')!r}, "
                          f"this installer reads {FORMAT}")
    return manifest, hashlib.sha256(text).hexdigest()


def verify_parts(bundle: Path, manifest: dict, present_only: bool = False) -> list[str]:
    """Every part present (or, with present_only, those that are), every chunk of the right
    size and sha256; nothing is written. Returns the parts checked."""
    parts = manifest["parts"]
    missing = [p for p in parts if not (bundle / p).is_dir()]
    if missing and not present_only:
        raise BundleError(f"{bundle / missing[0]} is missing: the bundle has {len(parts)} "
                          f"parts ({', '.join(parts)}); copy {missing[0]} too")
    for item in manifest["items"]:
        for chunk in item["chunks"]:
            if chunk["part"] in missing:
                continue
            path = bundle / chunk["part"] / chunk["file"]
            if not path.is_file():
                raise BundleError(f"{chunk['part']} is incomplete: {chunk['file']} is missing; "
                                  f"copy {chunk['part']} again")
            if path.stat().st_size != chunk["size"] or sha256_file(path) != chunk["sha256"]:
                raise BundleError(f"{chunk['part']} is damaged: {chunk['file']} does not match "
                                  f"its sha256 in the manifest; copy {chunk['part']} again")
    return [p for p in parts if p not in missing]


def assemble(bundle: Path, item: dict, dest_dir: Path) -> Path:
    """Join an item's chunks in order into dest_dir/name and check the whole file's sha256."""
    dest = dest_dir / item["name"]
    with dest.open("wb") as out:
        for chunk in item["chunks"]:
            with (bundle / chunk["part"] / chunk["file"]).open("rb") as f:
                shutil.copyfileobj(f, out, _BLOCK)
    if sha256_file(dest) != item["sha256"]:
        raise BundleError(f"{item['name']}: joined chunks do not match its sha256 in the "
                          "manifest; make the bundle again")
    return dest


def pip_install(wheels: list[Path], target: Path, python: str = sys.executable) -> None:
    """`pip install --no-index --no-deps --target`: exactly these wheels, nothing fetched."""
    cmd = [python, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
           "--no-cache-dir", "--disable-pip-version-check", "--target", str(target),
           *map(str, wheels)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines() or ["no output"]
        raise BundleError(f"pip install of the bundle's wheels failed: {lines[-1]}")


def bundle_env(manifest: dict, target: Path) -> dict[str, str]:
    """The variables the check needs: DIR first on PYTHONPATH, so the bundle's wheels win
    over the image's own versions, plus the manifest's folders under DIR."""
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(target),
                                                       os.environ.get("PYTHONPATH")]))}
    env.update({k: str(target / v) for k, v in manifest.get("env", {}).items()})
    return env


def install(bundle: Path, target: Path) -> dict[str, str]:
    """Verify, join and install the bundle into target; returns the variables to set."""
    manifest, digest = read_manifest(bundle)
    stamp = target / STAMP
    if stamp.is_file() and stamp.read_text().strip() == digest:
        return bundle_env(manifest, target)  # this very bundle is already installed here
    verify_parts(bundle, manifest)
    if target.exists():
        if not stamp.is_file() and any(target.iterdir()):
            raise BundleError(f"{target} exists and is not a bundle's install folder; "
                              "name another --target")
        shutil.rmtree(target)  # an older bundle's, or a broken install of this one
    target.mkdir(parents=True)
    stamp.write_text("installing\n")  # marks the folder as ours before anything goes in
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".lsbench-join-") as tmp:
        wheels = []
        for item in manifest["items"]:
            if item["kind"] == "wheel":
                wheels.append(assemble(bundle, item, Path(tmp)))
            else:  # a data file, copied under target/item["dest"]
                dest_dir = target / item["dest"]
                dest_dir.mkdir(parents=True, exist_ok=True)
                assemble(bundle, item, dest_dir)
        if wheels:
            pip_install(wheels, target)
    stamp.write_text(digest + "\n")
    return bundle_env(manifest, target)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", type=Path, help="folder holding part-1, part-2, ...")
    parser.add_argument("--target", type=Path, default=DEFAULT_TARGET,
                        help=f"where the wheels go (default {DEFAULT_TARGET})")
    parser.add_argument("--verify-present", action="store_true",
                        help="only check the parts copied so far; install nothing")
    args = parser.parse_args(own)
    try:
        if args.verify_present:
            manifest, _ = read_manifest(args.bundle)
            ok = verify_parts(args.bundle, manifest, present_only=True)
            rest = [p for p in manifest["parts"] if p not in ok]
            print(f"{', '.join(ok)} verified; still to copy: {', '.join(rest) or 'nothing'}")
            return 0
        env = install(args.bundle, args.target.resolve())
    except (BundleError, OSError) as exc:  # OSError: a full disk, an unreadable part
        print(f"error: {exc}", file=sys.stderr)
        return 1
    lines = [f"export {k}={v}" for k, v in env.items()]
    (args.target / "env.sh").write_text("\n".join(lines) + "\n")
    print(f"bundle installed in {args.target}; to use it by hand:", *lines, sep="\n",
          flush=True)
    if not command:
        return 0
    os.execvpe(command[0], command, {**os.environ, **env})  # the check replaces this process


if __name__ == "__main__":
    sys.exit(main())
