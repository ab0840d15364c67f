#!/usr/bin/env python3
"""Writes N random 256 px images in one class folder for timing `prepare`: JPEGs through
torchvision's encoder when it is importable, else PNGs (stdlib zlib). Noise with smooth
colour fields, so that the JPEG decoder does the work of a photograph of that size.

  python3 tools/bench_images.py --out /tmp/images --num 512
"""
import argparse
import struct
import zlib
from pathlib import Path

import numpy as np


def png(path, rgb):
    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[y].tobytes() for y in range(h))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--num", type=int, default=256)
    ap.add_argument("--size", type=int, default=256)
    a = ap.parse_args()
    folder = Path(a.out) / "class0"
    folder.mkdir(parents=True, exist_ok=True)
    try:
        import torch
        from torchvision.io import encode_jpeg
    except ImportError:
        encode_jpeg = None
    rng = np.random.default_rng(0)
    n = a.size
    yy, xx = np.mgrid[0:n, 0:n] / n
    for i in range(a.num):
        base = [np.sin(6.28 * (f * xx + g * yy) + p) for f, g, p in rng.uniform(0, 4, (3, 3))]
        img = np.stack(base, -1) * 80 + 128 + rng.normal(0, 20, (n, n, 3))
        rgb = np.clip(img, 0, 255).astype(np.uint8)
        if encode_jpeg is not None:
            data = encode_jpeg(torch.from_numpy(rgb).permute(2, 0, 1).contiguous(), quality=90)
            (folder / f"img{i:05d}.jpg").write_bytes(bytes(data.numpy()))
        else:
            png(folder / f"img{i:05d}.png", rgb)
    print(folder)


if __name__ == "__main__":
    main()
