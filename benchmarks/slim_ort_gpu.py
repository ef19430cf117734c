"""Make ``.ort/ort_slim.tar.xz``: onnxruntime-gpu small enough to travel to a lent GPU in one call.

Why: a device call carries at most 64 MiB with the working tree; the onnxruntime-gpu 1.31.1 cp312
wheel is 255 MB, and the shared note's recipe (xz of the wheel without ``libonnxruntime.so``)
still needs three calls, each of which must come within the machine's 30-second warm window.
Most of the CUDA provider library is GPU code for other chips: its fatbins hold cubins for
sm_75, 80, 86, 89, 90 and 120 (no PTX). An H100/H200 loads only the sm_90 ones, so the others'
payloads are zeroed in place (headers and offsets untouched), and the archive compresses to
60 MB. Dropped too: ``libonnxruntime.so.*`` (the C API; Python does not load it) and the TensorRT
provider. Measured on the 2026-11-27 run: the CUDA EP loads and runs (sanity Conv equal to the
CPU's to 1e-5), every model timed.

    python benchmarks/slim_ort_gpu.py WHEEL .ort/ort_slim.tar.xz [--keep-arch 90]

Get WHEEL with ``pip download --no-deps --only-binary=:all: --python-version 3.12
--implementation cp --platform manylinux_2_28_x86_64 onnxruntime-gpu==1.31.1``.
"""

from __future__ import annotations

import argparse
import io
import lzma
import struct
import tarfile
import zipfile

FATBIN_MAGIC = struct.pack("<I", 0xBA55ED50)
PROVIDER = "onnxruntime/capi/libonnxruntime_providers_cuda.so"
DROPPED = ("onnxruntime/capi/libonnxruntime.so", "onnxruntime/capi/libonnxruntime_providers_tensorrt.so")


def zero_other_archs(data: bytearray, keep: int) -> tuple[int, int]:
    """Zero every fatbin entry's payload whose arch is not ``keep``; returns (zeroed, kept) bytes.

    Fatbin layout: a 16-byte header (magic, version 1, header size 16, size of the entries), then
    entries, each a header (kind u16, u16, header size u32, payload size u64, ..., arch u32 at
    offset 28) followed by its payload."""
    pos = zeroed = kept = 0
    while (i := data.find(FATBIN_MAGIC, pos)) >= 0:
        version, header, size = struct.unpack_from("<HHQ", data, i + 4)
        if version != 1 or header != 16:
            pos = i + 4
            continue
        entry, end = i + 16, i + 16 + size
        while entry < end:
            _, _, entry_header, payload = struct.unpack_from("<HHIQ", data, entry)
            arch = struct.unpack_from("<I", data, entry + 28)[0]
            start = entry + entry_header
            if arch != keep:
                data[start:start + payload] = bytes(payload)
                zeroed += payload
            else:
                kept += payload
            entry = start + payload
        pos = end
    return zeroed, kept


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("wheel")
    ap.add_argument("out")
    ap.add_argument("--keep-arch", type=int, default=90, help="the GPU's SM version (90: H100/H200)")
    args = ap.parse_args()
    with zipfile.ZipFile(args.wheel) as wheel, lzma.open(args.out, "wb", preset=9 | lzma.PRESET_EXTREME) as xz:
        with tarfile.open(fileobj=xz, mode="w|") as tar:
            for info in sorted(wheel.infolist(), key=lambda i: i.filename):
                if info.is_dir() or info.filename.startswith(DROPPED):
                    continue
                data = bytearray(wheel.read(info))
                if info.filename == PROVIDER:
                    zeroed, kept = zero_other_archs(data, args.keep_arch)
                    print(f"{PROVIDER}: {zeroed / 1e6:.0f} MB of other GPUs' code zeroed, {kept / 1e6:.0f} MB kept")
                entry = tarfile.TarInfo(info.filename)
                entry.size, entry.mode = len(data), 0o755 if info.filename.endswith(".so") else 0o644
                tar.addfile(entry, io.BytesIO(bytes(data)))


if __name__ == "__main__":
    main()
