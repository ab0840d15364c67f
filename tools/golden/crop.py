"""Golden data for `src/data/crop.rs` (tests/crop.rs): Pillow resizes and the ADM center crop.

Run it from the repository root in a separate virtualenv, never in .venv (the trainer's
libtorch comes from there). /tmp/goldvenv may be shared with other golden scripts: reuse
it if it exists, and if torch is already installed there keep it pinned:

    [ -x /tmp/goldvenv/bin/python ] || python3 -m venv /tmp/goldvenv
    echo 'torch==2.11.0' > /tmp/goldvenv-constraints.txt   # only if torch is in the venv
    /tmp/goldvenv/bin/pip install -c /tmp/goldvenv-constraints.txt Pillow==13.0.0 numpy
    /tmp/goldvenv/bin/python tools/golden/crop.py

It writes deterministic inputs `tests/data/crop/<name>.png`, the expected ADM crops
`<name>.expected<size>.png`, and plain resizes `<name>.<filter><w>x<h>.png`. Everything is
regenerated bit-identically from the fixed seeds below. Keep Pillow pinned: 13.0
changed the order of the two resampling passes for images whose height shrinks much
more than their width, and src/data/crop.rs follows 13.0.
"""

import os

import numpy as np
import PIL
from PIL import Image

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tests", "data", "crop")


def center_crop_arr(pil_image, image_size):
    """guided-diffusion's image_datasets.center_crop_arr (ADM preprocessing), verbatim."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(
        tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC
    )
    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return arr[crop_y : crop_y + image_size, crop_x : crop_x + image_size]


def make_image(w, h, seed, noise):
    """Smooth gradients and waves, hard-edged shapes (bicubic overshoot, clipping at 0 and
    255) and a band of noise (fine detail that the antialiasing has to average)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    img = np.zeros((h, w, 3))
    for c in range(3):
        for _ in range(3):
            fx, fy = rng.uniform(0.002, 0.04, size=2)
            ph = rng.uniform(0, 2 * np.pi)
            img[..., c] += rng.uniform(20, 50) * np.sin(fx * xx + fy * yy + ph)
        img[..., c] += 128 + rng.uniform(-60, 60) * (xx / w - 0.5)
    for _ in range(6):
        x0, y0 = rng.integers(0, w), rng.integers(0, h)
        rw, rh = rng.integers(3, max(4, w // 4)), rng.integers(3, max(4, h // 4))
        img[y0 : y0 + rh, x0 : x0 + rw] = rng.choice([0, 255], size=3)
    r = min(w, h) // 6
    cx, cy = rng.integers(r, w - r + 1), rng.integers(r, h - r + 1)
    img[(xx - cx) ** 2 + (yy - cy) ** 2 < r * r] = rng.uniform(0, 255, size=3)
    # Noise only in a band, to keep the PNGs small.
    band = slice(h // 3, h // 3 + max(2, h // 6))
    img[band] += rng.normal(0, noise, size=img[band].shape)
    return Image.fromarray(np.clip(np.rint(img), 0, 255).astype(np.uint8), "RGB")


# name, (w, h), seed, noise sigma, ADM crop sizes
CASES = [
    # 389 >= 2*64: two BOX halvings with odd sizes (517x389 -> 258x194 -> 129x97).
    ("smooth_517x389", (517, 389), 1, 12.0, [256, 64]),
    # Height shrinks by more than twice the width: Pillow >= 13 runs the vertical
    # pass first (older Pillow differs here by a few grey levels).
    ("tall_300x700", (300, 700), 2, 20.0, [256]),
    # 613 >= 2*256: one BOX halving at the ImageNet size (-> 515x306).
    ("wide_1031x613", (1031, 613), 3, 8.0, [256]),
    # Short side 255 < 256: a slight bicubic upscale.
    ("small_260x255", (260, 255), 4, 30.0, [256, 64]),
    # Size 64: no resize at all (both passes skipped); size 256: 4x upscale.
    ("thin_64x999", (64, 999), 5, 25.0, [64, 256]),
]

# name of an input above, filter, target size
RESIZES = [
    ("small_260x255", "bicubic", (397, 301)),  # upscale, unequal factors
    ("smooth_517x389", "bicubic", (123, 77)),  # strong downscale
    ("tall_300x700", "bicubic", (300, 233)),  # vertical pass only
    ("smooth_517x389", "box", (258, 194)),  # BOX, non-integer factor
]

FILTERS = {"bicubic": Image.BICUBIC, "box": Image.BOX}


def main():
    os.makedirs(OUT, exist_ok=True)
    print("Pillow", PIL.__version__)
    inputs = {}
    for name, (w, h), seed, noise, sizes in CASES:
        img = make_image(w, h, seed, noise)
        img.save(os.path.join(OUT, f"{name}.png"), optimize=True)
        # Reload, so the reference sees exactly the pixels the Rust test reads.
        img = Image.open(os.path.join(OUT, f"{name}.png")).convert("RGB")
        inputs[name] = img
        for size in sizes:
            arr = center_crop_arr(img, size)
            assert arr.shape == (size, size, 3), arr.shape
            Image.fromarray(arr, "RGB").save(
                os.path.join(OUT, f"{name}.expected{size}.png"), optimize=True
            )
    for name, filt, (w, h) in RESIZES:
        out = inputs[name].resize((w, h), resample=FILTERS[filt])
        out.save(os.path.join(OUT, f"{name}.{filt}{w}x{h}.png"), optimize=True)
    total = sum(os.path.getsize(os.path.join(OUT, f)) for f in os.listdir(OUT))
    print(f"wrote {len(os.listdir(OUT))} files, {total / 1e6:.2f} MB, to {os.path.normpath(OUT)}")


if __name__ == "__main__":
    main()
