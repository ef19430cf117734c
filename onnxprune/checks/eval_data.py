"""Labelled images for evaluation: the ``Dataset`` type and the readers of the formats it comes in.

Why apart from ``evaluate.py``: reading and checking data (one-line ``UserError`` for every file
that cannot be used) is a job of its own, shared by ``onnxprune eval``, the CI gate
``--eval-data`` (``gate.AccuracyCheck``) and the benchmarks; ``evaluate.py`` only runs models and
scores them. Nothing here knows where a data set is installed: the default Fashion-MNIST
locations are the ``eval`` command's (``commands/eval.py``), so a wheel install works with
explicit paths alone.

Images are float32 ``N x C x H x W`` in [0, 1]. ``.npz`` files need ``images`` (uint8 0..255, or
float already in [0, 1]; shape ``N x H x W`` or ``N x C x H x W``) and integer ``labels`` (N);
IDX files (``*-ubyte.gz``, the MNIST/Fashion-MNIST distribution format) are read by ``_read_idx``.
"""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import NamedTuple, Union

import numpy as np

from ..errors import UserError


class Dataset(NamedTuple):
    """``images`` float32 N x C x H x W in [0, 1]; ``labels`` int64 (N,); ``description``."""

    images: np.ndarray
    labels: np.ndarray
    description: str


def _read_idx(path: Path) -> np.ndarray:
    try:
        with gzip.open(path, "rb") as f:
            data = f.read()
        ndim = data[3]
        dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
        return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)
    except (OSError, ValueError, IndexError, EOFError) as e:
        raise UserError(f"cannot read IDX file {path}: {e}") from None


def _to_float_images(images: np.ndarray, source: str) -> np.ndarray:
    if images.ndim == 3:
        images = images[:, None, :, :]
    if images.ndim != 4:
        raise UserError(f"{source}: 'images' must be N x H x W or N x C x H x W, "
                        f"got shape {images.shape}")
    if images.dtype == np.uint8:
        return images.astype(np.float32) / np.float32(255.0)
    if np.issubdtype(images.dtype, np.floating):
        return np.ascontiguousarray(images, dtype=np.float32)
    raise UserError(f"{source}: 'images' must be uint8 (0..255) or float in [0, 1], "
                    f"got dtype {images.dtype}")


def _check_labels(labels: np.ndarray, n: int, source: str) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1 or len(labels) != n:
        raise UserError(f"{source}: 'labels' must have shape ({n},) to match 'images', "
                        f"got {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise UserError(f"{source}: 'labels' must be integers, got dtype {labels.dtype}")
    if n and labels.min() < 0:
        raise UserError(f"{source}: 'labels' must be non-negative class indices")
    return labels.astype(np.int64)


def load_npz(path: Union[str, Path]) -> Dataset:
    """Images and labels from an ``.npz`` with arrays ``images`` and ``labels``."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"data file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as z:
            keys = set(z.files)
            if not {"images", "labels"} <= keys:
                raise UserError(f"{path}: expected arrays 'images' and 'labels' in the .npz, "
                                f"found {sorted(keys) or 'none'}")
            images, labels = z["images"], z["labels"]
    except UserError:
        raise
    except Exception as e:  # zipfile.BadZipFile, ValueError, OSError, pickle refusals ...
        raise UserError(f"{path}: not a readable .npz file ({type(e).__name__}: {e})") from None
    x = _to_float_images(images, str(path))
    y = _check_labels(labels, len(x), str(path))
    if len(x) == 0:
        raise UserError(f"{path}: contains no images")
    return Dataset(x, y, f"{path} ({len(x):,} images)")


def load_idx(images: Union[str, Path], labels: Union[str, Path], source: str) -> Dataset:
    """Images and labels from a pair of gzipped IDX files; ``source`` names them in errors and is
    the description."""
    x = _to_float_images(_read_idx(Path(images)), source)
    y = _check_labels(_read_idx(Path(labels)), len(x), source)
    return Dataset(x, y, source)


def as_dataset(data) -> Dataset:
    """``data`` as a ``Dataset``: a ``Dataset``, ``(images, labels[, description])`` or an ``.npz`` path."""
    if isinstance(data, Dataset):
        return data
    if isinstance(data, (str, Path)):
        return load_npz(data)
    if isinstance(data, tuple) and len(data) in (2, 3):
        x = _to_float_images(np.asarray(data[0]), "data")
        y = _check_labels(np.asarray(data[1]), len(x), "data")
        return Dataset(x, y, data[2] if len(data) == 3 else f"{len(x):,} images")
    raise TypeError("data must be a Dataset, (images, labels[, description]) or an .npz path")
