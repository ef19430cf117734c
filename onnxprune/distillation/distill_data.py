"""What the distillation student trains on: the images, the batches drawn from them, their augmentation.

Why separate from ``distill.py``: the training loop only asks for "the next batch, augmented";
how images are read, how batches are drawn reproducibly and how they are perturbed are rules of
their own that change independently of the loop (and are the part a new data set needs to look
at). Rules:
- images come in the forms ``--calib`` accepts (``calib_data.load_calibration_inputs``); a bare
  array is the single graph input's;
- batches: indices from a fresh seeded permutation each epoch, wrapping across epochs, each
  batch sorted; a batch is never larger than the image count;
- augmentation (per sample, with probability ``prob``; every draw from the numpy generator
  given, in a fixed order, so a seed fixes it): a random zoom (crop or pad, side scale in
  ``zoom``), a random shift of up to ``max_shift`` of the side beyond the crop's slack, a
  horizontal flip with probability 1/2; one bilinear ``grid_sample`` with reflection padding,
  the same on every 4-D float input; inputs of other ranks pass unchanged.
"""

from __future__ import annotations

import numpy as np


def load_images(images, model) -> dict:
    from ..calibration.calib_data import load_calibration_inputs

    if isinstance(images, np.ndarray):
        init_names = {t.name for t in model.graph.initializer}
        names = [i.name for i in model.graph.input if i.name not in init_names]
        if len(names) != 1:
            raise ValueError(f"the model has {len(names)} inputs; pass images as {{input name: array}}")
        images = {names[0]: images}
    return load_calibration_inputs(images, model)


class Batches:
    """Indices of the next batch: a fresh seeded permutation each epoch, wrapping across epochs."""

    def __init__(self, count: int, batch_size: int, rng):
        self.count, self.size, self.rng = count, min(batch_size, count), rng
        self.pool = np.empty(0, dtype=np.int64)

    def next(self):
        import torch

        while len(self.pool) < self.size:
            self.pool = np.concatenate([self.pool, self.rng.permutation(self.count)])
        index, self.pool = self.pool[:self.size], self.pool[self.size:]
        return torch.from_numpy(np.sort(index))


def augment(batch: dict, rng, zoom, max_shift, flip, prob) -> dict:
    """Random zoom/shift/flip of a sample with probability ``prob`` (the same on every 4-D float
    input); the other samples, and inputs of other ranks, unchanged."""
    import torch
    import torch.nn.functional as F

    n = len(next(iter(batch.values())))
    scale = rng.uniform(zoom[0], zoom[1], n)
    slack = np.abs(1.0 - scale) + 2.0 * max_shift  # normalized coordinates span 2 per side
    tx, ty = rng.uniform(-1.0, 1.0, (2, n)) * slack
    sign = np.where(rng.random(n) < 0.5, -1.0, 1.0) if flip else np.ones(n)
    plain = rng.random(n) >= prob
    scale[plain], tx[plain], ty[plain], sign[plain] = 1.0, 0.0, 0.0, 1.0
    theta = np.zeros((n, 2, 3), dtype=np.float32)
    theta[:, 0, 0], theta[:, 0, 2] = scale * sign, tx
    theta[:, 1, 1], theta[:, 1, 2] = scale, ty
    theta = torch.from_numpy(theta)
    out = {}
    for name, x in batch.items():
        if x.dim() == 4 and x.is_floating_point():
            grid = F.affine_grid(theta, list(x.shape), align_corners=False)
            x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
        out[name] = x.contiguous()
    return out
