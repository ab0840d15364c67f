"""JPEG corpus for `src/data/decode.rs` (tests/jpeg.rs): real encoders, Pillow's pixels.

REG's preprocessing opens every image with `PIL.Image.open(f).convert('RGB')` (no EXIF
transpose), so Pillow's decoded pixels are the reference. This writes small JPEGs made
by four encoders to tests/data/jpeg/, and `pillow_rgb.npz`: for each `<name>.jpg` an
array `<name>` [H, W, 3] u8, exactly what `Image.open(f).convert('RGB')` returns, plus
`cases.json` (per file: encoder, settings, and `pillow` = "ok" or Pillow's error).

Encoders: Pillow 13.0.0 (its bundled libjpeg-turbo 3.2), Debian 12's `cjpeg` and
`libturbojpeg.so.0` (libjpeg-turbo 2.1.5; the latter for a YCCK file, as Photoshop
writes CMYK), and `guetzli` 1.0.1 (Google's encoder, its own quantisation and DCT).

    apt-get install libjpeg-turbo-progs guetzli
    [ -x /tmp/goldvenv/bin/python ] || python3 -m venv /tmp/goldvenv
    /tmp/goldvenv/bin/pip install Pillow==13.0.0 numpy       # keep torch pinned if present
    /tmp/goldvenv/bin/python tools/golden/jpeg.py            # from the repository root

Deterministic for a given set of encoder versions (the images come from crop.py's
seeded generator); it prints the versions it used.
"""

import ctypes
import io
import json
import os
import pathlib
import subprocess
import sys
import tempfile

import numpy as np
import PIL
from PIL import Image, features

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from crop import make_image  # noqa: E402  (same folder; its seeded test pictures)

REPO = pathlib.Path(__file__).resolve().parents[2]
OUT = REPO / "tests/data/jpeg"


def pillow(img, **kw):
    b = io.BytesIO()
    img.save(b, "JPEG", **kw)
    return b.getvalue()


def cjpeg(img, *flags):
    """Debian's cjpeg (libjpeg-turbo 2.1.5) on a PPM/PGM of `img`."""
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "in.pnm")
        img.save(src)
        return subprocess.run(["cjpeg", *flags, src], check=True, capture_output=True).stdout


def guetzli(img, quality):
    with tempfile.TemporaryDirectory() as d:
        src, dst = os.path.join(d, "in.png"), os.path.join(d, "out.jpg")
        img.save(src)
        subprocess.run(["guetzli", "--quality", str(quality), src, dst], check=True, capture_output=True)
        return pathlib.Path(dst).read_bytes()


def turbojpeg_cmyk(img, quality):
    """A YCCK JPEG with an Adobe marker: libturbojpeg's tjCompress2 from CMYK pixels."""
    tj = ctypes.CDLL("libturbojpeg.so.0")
    tj.tjInitCompress.restype = ctypes.c_void_p
    h = tj.tjInitCompress()
    cmyk = np.ascontiguousarray(np.asarray(img.convert("CMYK")))
    hgt, wid = cmyk.shape[:2]
    buf, size = ctypes.POINTER(ctypes.c_ubyte)(), ctypes.c_ulong(0)
    TJPF_CMYK, TJSAMP_420 = 11, 2
    rc = tj.tjCompress2(
        ctypes.c_void_p(h), cmyk.ctypes.data_as(ctypes.c_void_p), wid, wid * 4, hgt, TJPF_CMYK,
        ctypes.byref(buf), ctypes.byref(size), TJSAMP_420, quality, 0,
    )
    assert rc == 0, "tjCompress2 failed"
    out = ctypes.string_at(buf, size.value)
    tj.tjFree(buf)
    tj.tjDestroy(ctypes.c_void_p(h))
    return out


def with_orientation(img, value, **kw):
    exif = Image.Exif()
    exif[0x0112] = value
    return pillow(img, exif=exif, **kw)


def cases():
    """(name, settings, bytes). Sizes are not multiples of 16 (partial MCUs) except one."""
    a = make_image(45, 35, 11, 10.0)
    b = make_image(37, 50, 12, 18.0)
    c = make_image(48, 32, 13, 6.0)
    yield "pil_444_q95", "Pillow, 4:4:4, quality 95", pillow(a, quality=95, subsampling=0)
    yield "pil_422_q75", "Pillow, 4:2:2, quality 75", pillow(a, quality=75, subsampling=1)
    yield "pil_420_q50", "Pillow, 4:2:0, quality 50", pillow(b, quality=50, subsampling=2)
    yield "pil_420_q90_prog", "Pillow, 4:2:0, quality 90, progressive", pillow(b, quality=90, progressive=True)
    yield "pil_420_q20_opt_48x32", "Pillow, 4:2:0, quality 20, optimised Huffman, whole MCUs", pillow(
        c, quality=20, optimize=True
    )
    yield "pil_gray_q80", "Pillow, grayscale, quality 80", pillow(a.convert("L"), quality=80)
    yield "pil_cmyk_q85", "Pillow, CMYK (Adobe marker, no transform), quality 85", pillow(b.convert("CMYK"), quality=85)
    yield "pil_exif_orient6", "Pillow, 4:2:0, quality 85, EXIF orientation 6 (rotate 90)", with_orientation(
        b, 6, quality=85
    )
    yield "cjpeg_420_q85_float", "cjpeg 2.1.5, 4:2:0, quality 85, float DCT", cjpeg(b, "-quality", "85", "-dct", "float")
    yield "cjpeg_422_prog_restart", "cjpeg 2.1.5, 4:2:2, quality 70, progressive, restart every row", cjpeg(
        a, "-quality", "70", "-sample", "2x1", "-progressive", "-restart", "1"
    )
    yield "cjpeg_440_q80", "cjpeg 2.1.5, 4:4:0 (1x2), quality 80", cjpeg(a, "-quality", "80", "-sample", "1x2")
    yield "cjpeg_411_q80", "cjpeg 2.1.5, 4:1:1 (4x1), quality 80", cjpeg(b, "-quality", "80", "-sample", "4x1")
    yield "cjpeg_mixed_sampling", "cjpeg 2.1.5, Y 2x2, Cb 1x2, Cr 1x1 (no named subsampling), quality 80", cjpeg(
        b, "-quality", "80", "-sample", "2x2,1x2,1x1"
    )
    yield "cjpeg_arith_q75", "cjpeg 2.1.5, 4:2:0, quality 75, arithmetic coding", cjpeg(a, "-quality", "75", "-arithmetic")
    yield "cjpeg_rgb_q90", "cjpeg 2.1.5, RGB colour space (no YCbCr), quality 90", cjpeg(b, "-quality", "90", "-rgb")
    yield "turbojpeg_ycck_q80", "libturbojpeg 2.1.5, CMYK -> YCCK 4:2:0 with Adobe marker, quality 80", turbojpeg_cmyk(
        a, 80
    )
    yield "guetzli_q90", "guetzli 1.0.1, quality 90", guetzli(a, 90)
    # Damaged files: libjpeg warns on the first three; Pillow ignores its warnings but
    # refuses a file that ends early, and a frame over its pixel limit.
    good = pillow(b, quality=85)
    yield "broken_extraneous", "Pillow q85 + 3 junk bytes before EOI (libjpeg warning)", good[:-2] + b"\x00\x01\x02" + good[-2:]
    # Junk before the frame header: libjpeg warns while reading the header.
    sof = good.index(b"\xff\xc0")
    yield "broken_junk_in_header", "Pillow q85 + 2 junk bytes before SOF0", good[:sof] + b"\x12\x34" + good[sof:]
    yield "broken_truncated", "Pillow q85 cut at 80% of its bytes", good[: len(good) * 4 // 5]
    # Header says 15000x12000 (180M pixels): over Pillow's decompression-bomb limit.
    bomb = good[: sof + 5] + (12000).to_bytes(2, "big") + (15000).to_bytes(2, "big") + good[sof + 9 :]
    yield "broken_bomb", "Pillow q85 with a 15000x12000 frame header", bomb


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    for f in OUT.iterdir():
        f.unlink()
    versions = {
        "Pillow": PIL.__version__,
        "Pillow libjpeg-turbo": features.version("libjpeg_turbo"),
        "cjpeg": subprocess.run(["cjpeg", "-version"], capture_output=True, text=True).stderr.strip(),
    }
    print(versions)
    arrays, meta = {}, {}
    for name, what, data in cases():
        (OUT / f"{name}.jpg").write_bytes(data)
        try:
            with Image.open(OUT / f"{name}.jpg") as im:
                arrays[name] = np.asarray(im.convert("RGB"))
            meta[name] = {"encoder": what, "pillow": "ok"}
        except (OSError, Image.DecompressionBombError) as e:
            meta[name] = {"encoder": what, "pillow": f"error: {e}"}
        print(f"{name}: {len(data)} bytes, {meta[name]['pillow']}")
    np.savez_compressed(OUT / "pillow_rgb.npz", **arrays)
    (OUT / "cases.json").write_text(json.dumps({"versions": versions, "cases": meta}, indent=1) + "\n")
    total = sum(f.stat().st_size for f in OUT.iterdir())
    jpgs = sum(f.stat().st_size for f in OUT.glob("*.jpg"))
    print(f"wrote {len(list(OUT.iterdir()))} files, {total / 1e3:.1f} kB ({jpgs / 1e3:.1f} kB of JPEG) to {OUT}")


if __name__ == "__main__":
    main()
