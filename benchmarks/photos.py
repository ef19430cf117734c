#!/usr/bin/env python
"""Real photographs for the ImageNet fidelity harness, fetched by package name from Debian.

Builds ``samples/generated/photos_calib.npz`` and ``samples/generated/photos_eval.npz``: uint8
``input`` N x 3 x 224 x 224 RGB crops of natural photographs, split **by source photograph**
(no photograph contributes crops to both files), deterministic for a given ``--seed``.

Where the photographs come from (Debian 12 "bookworm" packages, fetched with ``apt-get download``
into ``~/.cache/onnxprune/photos/debs`` and read with Python's ``tarfile``; no other network):

======================  ===============================  ==========================================
package                 photographs used                 licence (from the package's copyright file)
======================  ===============================  ==========================================
gcompris-qt-data 3.1    ~265: 33 animal photos (erase),  GPL-3+ program; the pictures are mostly
                        9 farm + 15 wild animals, 49     Wikimedia Commons photos under CC-BY-SA-
                        monuments, 121 objects (tools,   2.0/3.0/4.0, CC-BY-2.0/3.0, CC0 or public
                        windmills, dams, solar panels,   domain, each listed with author and source
                        fishes, household), 9 music      in /usr/share/doc/gcompris-qt-data/copyright
                        scenes, 6 underwater, 13 land-
                        marks (details backgrounds)
plasma-workspace-       12 photographic wallpapers       GPL-2+ / LGPL-3 (KDE wallpapers)
wallpapers 5.27
mate-backgrounds 1.26   12 ``nature/`` photos            GPL-2+, CC-BY-SA-4.0
lomiri-wallpapers-      13 + 1 photos (Ubuntu community  CC-BY-4.0 / CC-BY-SA-3.0/4.0 / CC0
16.04 / -20.04 20.04.0  photo contest wallpapers)
opencv-doc 4.6.0        17 colour photos from            BSD-3-Clause / Apache-2.0 (OpenCV samples)
                        ``examples/data``
python3-skimage 0.19.3  5 colour photos (astronaut,      BSD-3-Clause; astronaut and rocket NASA
                        chelsea, coffee, motorcycle,     public domain, chelsea and coffee CC0
                        rocket)
======================  ===============================  ==========================================

Every file is chosen by an explicit rule or name list below (drawings, clip-art, abstract
wallpapers, paintings, grey-scale images and stereo/duplicate pairs were left out by looking at
them). The GCompris pictures live inside Qt resource files (``.rcc``); they are read with the
small parser here. Identical pictures and photographs of the same landmark that appear in several
GCompris activities are one *group* (``LANDMARKS`` below, plus an automatic check for identical
thumbnails), and a group is never split.

Split: inside each collection, the groups are ranked by ``sha256(f"{seed}:{group}")`` and the first
``round(EVAL_FRACTION * n)`` (default 0.4) are evaluation photos, the rest calibration photos.

Crops (per photograph, a generator seeded by ``(seed, crc32(photo key))``, so each photo's crops do
not depend on the others): crop 0 is the standard ImageNet view (shorter side resized to 256,
centre 224 x 224); the others are random-resized crops of a window 35-100% of the shorter side,
aspect 3:4-4:3, anywhere in the image, horizontally flipped with probability 1/2, resized to
224 x 224 (bilinear, antialiased). Calibration: ``--calib-crops`` (4) per photo, evaluation:
``--eval-crops`` (3). Samples are ordered round-robin (every photo's crop 0 in a seeded random
order, then every crop 1, ...), so the first N samples (``--calib-size N``) cover as many distinct
photos as possible.

Files written (``--out``, default ``samples/generated``):

- ``photos_calib.npz`` / ``photos_eval.npz``: ``input`` uint8 N x 3 x 224 x 224 (the model's input
  name, so ``onnxprune ... --calib samples/generated/photos_calib.npz`` picks it; uint8 is scaled
  to [0, 1] by the loader), ``source`` int32 N (index into ``files``), ``crop`` int16 N (0 =
  centre view), ``files`` str (one entry per photo of that split: ``package:collection/path``);
- ``photos.json``: the packages (name, version, sha256 of the .deb), every photo (collection,
  group, split, size) and the settings.

Usage::

    python benchmarks/photos.py                    # download (~330 MB of .debs, cached) and build
    python benchmarks/photos.py --list             # just print the photos per collection
    python benchmarks/photos.py --deb-dir DIR      # use .deb files already downloaded there

Needs Pillow with WebP support and, unless ``--deb-dir`` holds the packages, ``apt-get`` with a
Debian bookworm package list (``apt-get update`` once).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import re
import shutil
import struct
import subprocess
import sys
import tarfile
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path.home() / ".cache" / "onnxprune" / "photos"
EVAL_FRACTION = 0.4
SIZE = 224
MIN_SIDE = 200  # pictures with a shorter side under this are skipped (icons, thumbnails)

GCOMPRIS_RCC = "usr/share/gcompris-qt/rcc/"


@dataclass(frozen=True)
class Collection:
    """A set of photographs inside one Debian package.

    ``member``: a regular expression on paths inside the package's data archive. For GCompris,
    ``rcc`` names the Qt resource file and ``member`` matches paths inside it. ``names``: a
    whitelist of file stems (empty: every match).
    """

    name: str
    package: str
    member: str
    rcc: str = ""
    names: tuple = ()
    license: str = ""


_GC_LICENSE = ("GCompris (GPL-3+); pictures from Wikimedia Commons and others, CC-BY-SA / CC-BY / "
               "CC0 / public domain, listed in /usr/share/doc/gcompris-qt-data/copyright")

COLLECTIONS: tuple[Collection, ...] = (
    Collection("gcompris-erase", "gcompris-qt-data", r"/erase/resource/[^/]+\.webp$", "erase.rcc",
               license=_GC_LICENSE),
    Collection("gcompris-farm-animals", "gcompris-qt-data", r"/resource/animals/[^/]+\.webp$",
               "explore_farm_animals.rcc", license=_GC_LICENSE),
    Collection("gcompris-world-animals", "gcompris-qt-data", r"/resource/animals/[^/]+\.webp$",
               "explore_world_animals.rcc", license=_GC_LICENSE),
    Collection("gcompris-monuments", "gcompris-qt-data", r"/resource/[a-z]+/[^/]+\.webp$",
               "explore_monuments.rcc", license=_GC_LICENSE),
    Collection("gcompris-objects", "gcompris-qt-data", r"/resource/images/[a-z]+/[^/]+\.webp$",
               "categorization.rcc", license=_GC_LICENSE),
    Collection("gcompris-music", "gcompris-qt-data", r"/resource/music/[^/]+\.webp$",
               "explore_world_music.rcc", license=_GC_LICENSE),
    Collection("gcompris-underwater", "gcompris-qt-data", r"/resource/sea\d\.webp$", "clickgame.rcc",
               license=_GC_LICENSE),
    Collection("gcompris-landmarks", "gcompris-qt-data", r"/resource/image/[^/]+_background\.webp$",
               "details.rcc",
               names=("Louvre_2007_02_24_c_background", "FanoeWindmill_background",
                      "EgeskovSlotSpejling_background", "GizahPyramids_background",
                      "EilanDonanCastle_background", "TowerBridgeLondon_background",
                      "Chenonceau_background", "NDP_background", "Nagoya_background",
                      "TajMahal_background", "TourEiffel_background", "Neuschwanstein_background",
                      "OperaSidney_background"),  # the others are paintings
               license=_GC_LICENSE),
    Collection("plasma-wallpapers", "plasma-workspace-wallpapers",
               r"usr/share/wallpapers/([^/]+)/contents/images/\d+x\d+\.(jpg|png)$",
               names=("BytheWater", "ColdRipple", "ColorfulCups", "DarkestHour", "EveningGlow",
                      "FallenLeaf", "Grey", "Kite", "OneStandsOut", "Path", "Volna", "summer_1am"),
               license="GPL-2+ / LGPL-3 (KDE Plasma wallpapers; per-image authors in the package)"),
    Collection("mate-nature", "mate-backgrounds", r"usr/share/backgrounds/mate/nature/[^/]+\.jpg$",
               license="GPL-2+ / CC-BY-SA-4.0 (mate-backgrounds copyright file)"),
    Collection("lomiri-16.04", "lomiri-wallpapers-16.04", r"usr/share/backgrounds/[^/]+\.jpg$",
               names=("Bridge_by_Sander_Klootwijk", "Dragonfly_by_Bolly", "Picture_0B_by_freespace",
                      "Picture_1A_by_freespace", "Wine_by_Jakkub_Mede", "aitzgorri_by_Aitzol_Berasategi",
                      "friends_by_Aitzol_Berasategi", "greentock_by_Peter_Nerlich",
                      "free_by_Peter_Nerlich", "life_by_Aitzol_Berasategi",
                      "picosdeeuropa_by_Aitzol_Berasategi", "seeding_by_Clements_Engelhardt",
                      "sunset_by_Aitzol_Berasategi"),
               license="CC-BY-4.0 / CC-BY-SA-3.0 / CC-BY-SA-4.0 / CC0 (Ubuntu photo contest, per file)"),
    Collection("lomiri-20.04", "lomiri-wallpapers-20.04", r"usr/share/backgrounds/[^/]+\.jpg$",
               names=("Kleiber_by_Lukas_Baubkus",),
               license="CC-BY-4.0 / CC-BY-SA-4.0 (Ubuntu photo contest, per file)"),
    Collection("opencv-samples", "opencv-doc", r"usr/share/doc/opencv-doc/examples/data/[^/]+\.(jpg|png)$",
               names=("aloeL", "apple", "baboon", "board", "building", "butterfly", "chicky_512",
                      "fruits", "graf1", "home", "leuvenA", "licenseplate_motion", "messi5", "orange",
                      "rubberwhale1", "squirrel_cls", "stuff"),
               license="OpenCV sample data (BSD-3-Clause / Apache-2.0 per the package copyright file)"),
    Collection("skimage-data", "python3-skimage", r"usr/lib/python3/dist-packages/skimage/data/[^/]+\.(jpg|png)$",
               names=("astronaut", "chelsea", "coffee", "motorcycle_left", "rocket"),
               license="scikit-image data (BSD-3-Clause; astronaut/rocket NASA public domain, chelsea/coffee CC0)"),
)

# Photos of the same landmark in several GCompris activities (or the same picture twice): one
# group each, so they never land on both sides of the split.
LANDMARKS = {
    "tajmahal": "taj-mahal", "tajmahal_background": "taj-mahal",
    "eiffeltower": "eiffel-tower", "toureiffel_background": "eiffel-tower",
    "colosseum": "colosseum",
    "greatwallofchina": "great-wall", "greatwall": "great-wall",
    "christtheredeemer": "christ-the-redeemer",
    "statueofliberty": "statue-of-liberty",
    "mountrushmore": "mount-rushmore",
    "brandenburggate": "brandenburg-gate",
    "greatpyramidofgiza": "giza", "greatpyramid": "giza", "gizahpyramids_background": "giza",
    "victoriamemorial": "victoria-memorial",
    "qutubminar": "qutub-minar", "kutubminar": "qutub-minar",
    "neuschwansteincastle": "neuschwanstein", "neuschwanstein_background": "neuschwanstein",
    "chateaudechenonceau": "chenonceau", "chenonceau_background": "chenonceau",
    "operahouse": "sydney-opera", "operasidney_background": "sydney-opera",
    "lemusee": "louvre", "louvre_2007_02_24_c_background": "louvre",
}


# ----------------------------------------------------------------------------- split and crops
# (pure numpy: tested by tests/test_fidelity_harness.py without any photo)

def split_groups(groups: dict[str, list[str]], fraction: float = EVAL_FRACTION,
                 seed: int = 0) -> dict[str, str]:
    """``{group: "eval" | "calib"}``: per stratum (``groups`` maps a stratum, e.g. a collection,
    to its group keys), the groups ranked by ``sha256(f"{seed}:{group}")``; the first
    ``round(fraction * n)`` are "eval". A group listed in several strata keeps the split of the
    first stratum (sorted) that lists it."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    out: dict[str, str] = {}
    for stratum in sorted(groups):
        keys = sorted({g for g in groups[stratum] if g not in out})
        ranked = sorted(keys, key=lambda g: hashlib.sha256(f"{seed}:{g}".encode()).hexdigest())
        n_eval = int(round(fraction * len(ranked)))
        for i, g in enumerate(ranked):
            out[g] = "eval" if i < n_eval else "calib"
    return out


def photo_rng(seed: int, key: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(key.encode())])


def crop_boxes(width: int, height: int, count: int, rng: np.random.Generator,
               scale: tuple[float, float] = (0.35, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3)
               ) -> list[tuple[float, float, float, float, bool]]:
    """``count`` crop windows ``(left, top, right, bottom, flip)`` in pixel coordinates.

    Box 0: the ImageNet evaluation view (shorter side -> 256, centre 224), i.e. a centred square of
    224/256 of the shorter side, not flipped. The others: side ``f * shorter`` (f uniform in
    ``scale``), aspect (w/h) log-uniform in ``ratio``, clipped to the image, uniform position,
    flipped with probability 1/2.
    """
    short = min(width, height)
    boxes = []
    side = short * SIZE / 256
    left, top = (width - side) / 2, (height - side) / 2
    boxes.append((left, top, left + side, top + side, False))
    for _ in range(count - 1):
        f = rng.uniform(*scale)
        r = float(np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1]))))
        w = min(width, short * f * np.sqrt(r))
        h = min(height, short * f / np.sqrt(r))
        left = rng.uniform(0, width - w)
        top = rng.uniform(0, height - h)
        boxes.append((float(left), float(top), float(left + w), float(top + h), bool(rng.random() < 0.5)))
    return boxes[:count]


def round_robin(crops_per_photo: list[int], seed: int) -> list[tuple[int, int]]:
    """Sample order ``[(photo, crop), ...]``: every photo's crop 0 (photos in a seeded random
    order), then every crop 1, and so on; the first N samples cover the most photos."""
    order = np.random.default_rng(seed).permutation(len(crops_per_photo))
    out = []
    for c in range(max(crops_per_photo, default=0)):
        out.extend((int(p), c) for p in order if c < crops_per_photo[p])
    return out


def _rgb(im):
    from PIL import Image

    if im.mode in ("RGBA", "LA", "P"):
        im = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
        bg.alpha_composite(im)
        im = bg
    return im.convert("RGB")


def make_crops(im, boxes) -> np.ndarray:
    """uint8 ``len(boxes) x 3 x 224 x 224`` from a PIL image."""
    from PIL import Image

    out = []
    for left, top, right, bottom, flip in boxes:
        c = im.resize((SIZE, SIZE), Image.BILINEAR, box=(left, top, right, bottom),
                      reducing_gap=3.0)
        if flip:
            c = c.transpose(Image.FLIP_LEFT_RIGHT)
        out.append(np.asarray(c, dtype=np.uint8).transpose(2, 0, 1))
    return np.stack(out)


# ----------------------------------------------------------------------------- packages

def read_deb_members(deb: Path, want) -> dict[str, bytes]:
    """``{path: bytes}`` for the regular files of a .deb's data archive with ``want(path)``.

    Parses the ar container itself and streams ``data.tar.{xz,gz,bz2}`` through ``tarfile``
    (``data.tar.zst`` through ``dpkg-deb --fsys-tarfile``)."""
    raw = deb.read_bytes()
    if raw[:8] != b"!<arch>\n":
        raise SystemExit(f"photos: {deb} is not a Debian package")
    pos, data = 8, None
    while pos + 60 <= len(raw):
        name = raw[pos:pos + 16].decode().strip().rstrip("/")
        size = int(raw[pos + 48:pos + 58].decode().strip())
        if name.startswith("data.tar"):
            data = (name, raw[pos + 60:pos + 60 + size])
            break
        pos += 60 + size + (size & 1)
    if data is None:
        raise SystemExit(f"photos: {deb} has no data.tar member")
    if data[0].endswith(".zst"):
        stream = io.BytesIO(subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deb)], check=True,
                                           capture_output=True).stdout)
    else:
        stream = io.BytesIO(data[1])
    out = {}
    with tarfile.open(fileobj=stream, mode="r|*") as tar:
        for info in tar:
            path = info.name[2:] if info.name.startswith("./") else info.name
            if info.isfile() and want(path):
                out[path] = tar.extractfile(info).read()
    return out


def read_rcc(blob: bytes) -> dict[str, bytes]:
    """``{path: bytes}`` of every file in a Qt resource (.rcc, format 1-3) file."""
    if blob[:4] != b"qres":
        raise ValueError("not a Qt resource file")
    version, tree, data, names = struct.unpack(">IIII", blob[4:20])
    entry = 14 if version < 2 else 22
    out: dict[str, bytes] = {}

    def name_at(off: int) -> str:
        n = struct.unpack(">H", blob[names + off:names + off + 2])[0]
        return blob[names + off + 6:names + off + 6 + 2 * n].decode("utf-16-be")

    stack = [(0, "")]
    while stack:
        index, prefix = stack.pop()
        e = tree + index * entry
        name_off, flags = struct.unpack(">IH", blob[e:e + 6])
        name = name_at(name_off) if index else ""
        if flags & 2:  # directory
            count, first = struct.unpack(">II", blob[e + 6:e + 14])
            stack.extend((first + c, f"{prefix}{name}/" if index else "") for c in range(count))
            continue
        off = struct.unpack(">I", blob[e + 10:e + 14])[0]
        size = struct.unpack(">I", blob[data + off:data + off + 4])[0]
        body = blob[data + off + 4:data + off + 4 + size]
        if flags & 1:
            body = zlib.decompress(body[4:])  # qCompress: 4-byte length, then zlib
        elif flags & 4:
            import zstandard  # Qt >= 5.13 may use zstd; GCompris 3.1 does not

            body = zstandard.ZstdDecompressor().decompress(body)
        out[prefix + name] = body
    return out


def fetch_debs(packages: list[str], deb_dir: Path) -> dict[str, Path]:
    """``{package: .deb path}``, downloading what ``deb_dir`` lacks with ``apt-get download``."""
    deb_dir.mkdir(parents=True, exist_ok=True)

    def find(pkg):
        hits = sorted(deb_dir.glob(f"{pkg}_*.deb"))
        return hits[-1] if hits else None

    missing = [p for p in packages if find(p) is None]
    if missing:
        if shutil.which("apt-get") is None:
            raise SystemExit(f"photos: no apt-get to download {', '.join(missing)}; put the .deb files "
                             f"in {deb_dir} (or pass --deb-dir)")
        print(f"photos: apt-get download {' '.join(missing)} -> {deb_dir}", flush=True)
        r = subprocess.run(["apt-get", "download", *missing], cwd=deb_dir, capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(f"photos: apt-get download failed ({r.stderr.strip().splitlines()[-1:]}); "
                             f"run 'apt-get update' first (Debian bookworm lists)")
    return {p: find(p) for p in packages}


def deb_version(deb: Path) -> str:
    # name_version_arch.deb; the version's ':' is stored as %3a
    return deb.name.split("_")[1].replace("%3a", ":")


@dataclass
class Photo:
    collection: str
    package: str
    path: str  # inside the package (or "file.rcc:inner/path")
    key: str = ""
    group: str = ""
    data: bytes = field(default=b"", repr=False)
    size: tuple = ()


def _stem(path: str) -> str:
    """The photo's name: the file stem, or the wallpaper folder for KDE's ``NAME/contents/...``."""
    parts = path.split("/")
    if "contents" in parts:
        return parts[parts.index("contents") - 1]
    return Path(path).stem


def collect(debs: dict[str, Path], collections=COLLECTIONS) -> list[Photo]:
    """Every selected photo with its bytes, in a fixed order."""
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = None
    by_pkg: dict[str, list[Collection]] = {}
    for c in collections:
        by_pkg.setdefault(c.package, []).append(c)
    photos: list[Photo] = []
    for pkg, cols in by_pkg.items():
        rcc_names = {GCOMPRIS_RCC + c.rcc for c in cols if c.rcc}
        regexes = [re.compile(c.member) for c in cols if not c.rcc]
        files = read_deb_members(debs[pkg], lambda p: p in rcc_names or any(r.search(p) for r in regexes))
        for c in cols:
            if c.rcc:
                inner = read_rcc(files[GCOMPRIS_RCC + c.rcc])
                cands = {f"{c.rcc}:{k}": v for k, v in inner.items() if re.search(c.member, k)}
            else:
                cands = {k: v for k, v in files.items() if re.search(c.member, k)}
            chosen = _choose(c, cands)
            for path in sorted(chosen):
                photos.append(Photo(c.name, pkg, path, data=chosen[path]))
    for p in photos:
        with Image.open(io.BytesIO(p.data)) as im:
            p.size = im.size
    photos = [p for p in photos if min(p.size) >= MIN_SIDE]
    for p in photos:
        p.key = f"{p.collection}/{_stem(p.path)}"
        p.group = "landmark:" + LANDMARKS[_stem(p.path).lower()] if (
            p.collection.startswith("gcompris") and _stem(p.path).lower() in LANDMARKS) else p.key
    _merge_identical(photos)
    return photos


def _choose(c: Collection, cands: dict[str, bytes]) -> dict[str, bytes]:
    if c.name == "plasma-wallpapers":  # one file per wallpaper folder: the largest rendering
        best: dict[str, str] = {}
        for path, body in cands.items():
            if not body:
                continue  # size variants are empty symlink stand-ins
            folder = _stem(path)
            if folder in c.names and (folder not in best or len(body) > len(cands[best[folder]])):
                best[folder] = path
        missing = set(c.names) - set(best)
        chosen = {best[f]: cands[best[f]] for f in best}
    else:
        chosen = {p: b for p, b in cands.items() if b and (not c.names or _stem(p) in c.names)}
        missing = set(c.names) - {_stem(p) for p in chosen}
    if missing:
        print(f"photos: warning: {c.name}: not found in {c.package}: {', '.join(sorted(missing))}",
              file=sys.stderr)
    return chosen


def _thumb(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        im.draft("RGB", (256, 256))
        g = np.asarray(_rgb(im).convert("L").resize((32, 32), Image.BILINEAR), dtype=np.float64).ravel()
    g -= g.mean()
    return g / (np.linalg.norm(g) + 1e-9)


def _merge_identical(photos: list[Photo], threshold: float = 0.97) -> None:
    """Union the groups of pictures whose 32 x 32 grey thumbnails correlate above ``threshold``."""
    t = np.stack([_thumb(p.data) for p in photos])
    sim = t @ t.T
    parent = {p.group: p.group for p in photos}

    def root(g):
        while parent[g] != g:
            g = parent[g]
        return g

    for i, j in zip(*np.nonzero(np.triu(sim, 1) > threshold)):
        a, b = root(photos[i].group), root(photos[j].group)
        if a != b:
            parent[max(a, b)] = min(a, b)
    for p in photos:
        p.group = root(p.group)


# ----------------------------------------------------------------------------- build

def build(photos: list[Photo], split: dict[str, str], calib_crops: int, eval_crops: int,
          seed: int) -> dict[str, dict]:
    from PIL import Image

    result = {}
    for name, crops in (("calib", calib_crops), ("eval", eval_crops)):
        members = [p for p in photos if split[p.group] == name]
        per_photo = []
        for p in members:
            with Image.open(io.BytesIO(p.data)) as im:
                im.draft("RGB", (1024, 1024))
                im = _rgb(im)
                # pre-shrink huge wallpapers so the shorter side is <= 896 px (4x the crop)
                short = min(im.size)
                if short > 896:
                    f = 896 / short
                    im = im.resize((round(im.size[0] * f), round(im.size[1] * f)), Image.BILINEAR,
                                   reducing_gap=3.0)
                boxes = crop_boxes(im.size[0], im.size[1], crops, photo_rng(seed, p.key))
                per_photo.append((make_crops(im, boxes), boxes))
        order = round_robin([crops] * len(members), seed)
        x = np.stack([per_photo[i][0][c] for i, c in order]) if order else np.zeros((0, 3, SIZE, SIZE), np.uint8)
        result[name] = {
            "input": x,
            "source": np.array([i for i, _ in order], dtype=np.int32),
            "crop": np.array([c for _, c in order], dtype=np.int16),
            "files": np.array([f"{p.package}:{p.path}" for p in members]),
            "photos": members,
            "boxes": [[round(v, 1) if isinstance(v, float) else v for v in per_photo[i][1][c]] for i, c in order],
        }
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "samples" / "generated")
    ap.add_argument("--cache", type=Path, default=CACHE, help=f"download cache (default {CACHE})")
    ap.add_argument("--deb-dir", type=Path, help="folder with the .deb files (default CACHE/debs)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-fraction", type=float, default=EVAL_FRACTION,
                    help=f"fraction of photo groups per collection used for evaluation (default {EVAL_FRACTION})")
    ap.add_argument("--calib-crops", type=int, default=4, help="crops per calibration photo (default 4)")
    ap.add_argument("--eval-crops", type=int, default=3, help="crops per evaluation photo (default 3)")
    ap.add_argument("--collections", nargs="+", metavar="NAME",
                    help="only these collections (default all: " + ", ".join(c.name for c in COLLECTIONS) + ")")
    ap.add_argument("--list", action="store_true", help="print the photos and the split, write nothing")
    args = ap.parse_args(argv)

    t0 = time.time()
    from PIL import features

    if not features.check("webp"):
        raise SystemExit("photos: this Pillow has no WebP support (needed for the GCompris pictures)")
    cols = [c for c in COLLECTIONS if not args.collections or c.name in args.collections]
    if not cols:
        raise SystemExit(f"photos: no collection among {args.collections}")
    packages = sorted({c.package for c in cols})
    debs = fetch_debs(packages, args.deb_dir or args.cache / "debs")
    photos = collect(debs, cols)
    strata: dict[str, list[str]] = {}
    for p in photos:
        strata.setdefault(p.collection, []).append(p.group)
    split = split_groups(strata, args.eval_fraction, args.seed)
    n_groups = len(set(split))
    if args.list:
        for p in photos:
            print(f"{split[p.group]:5} {p.collection:24} {p.group:40} {p.size[0]}x{p.size[1]}  {p.path}")
    counts = {s: sum(split[p.group] == s for p in photos) for s in ("calib", "eval")}
    print(f"photos: {len(photos)} photos in {n_groups} groups from {len(packages)} packages: "
          f"{counts['calib']} calibration, {counts['eval']} evaluation photos", flush=True)
    if args.list:
        return 0
    sets = build(photos, split, args.calib_crops, args.eval_crops, args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, s in sets.items():
        path = args.out / f"photos_{name}.npz"
        np.savez_compressed(path, input=s["input"], source=s["source"], crop=s["crop"], files=s["files"])
        print(f"photos: wrote {path} input {s['input'].shape} from {len(s['photos'])} photos "
              f"({path.stat().st_size / 1e6:.1f} MB)", flush=True)
    meta = {
        "about": "benchmarks/photos.py: real photographs from Debian packages, split by source photo",
        "seed": args.seed, "eval_fraction": args.eval_fraction,
        "calib_crops": args.calib_crops, "eval_crops": args.eval_crops, "size": SIZE,
        "packages": {p: {"deb": d.name, "version": deb_version(d),
                         "sha256": hashlib.sha256(d.read_bytes()).hexdigest()} for p, d in debs.items()},
        "collections": {c.name: {"package": c.package, "license": c.license,
                                 "photos": sum(p.collection == c.name for p in photos)} for c in cols},
        "photos": [{"collection": p.collection, "package": p.package, "path": p.path, "group": p.group,
                    "split": split[p.group], "width": p.size[0], "height": p.size[1]} for p in photos],
        "splits": {name: {"samples": int(len(s["input"])), "photos": len(s["photos"]),
                          "groups": len({p.group for p in s["photos"]}),
                          "boxes": s["boxes"]} for name, s in sets.items()},
    }
    (args.out / "photos.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(f"photos: wrote {args.out / 'photos.json'}; {time.time() - t0:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
