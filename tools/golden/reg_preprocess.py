"""Test data for `prepare --from-reg` made by REG's own preprocessing (tests/prepare.rs).

Runs REG's `preprocessing/dataset_tools.py` (github.com/Martinser/REG, checked with
commit 021ea2e) exactly as its README says, on a small JPEG tree of three classes,
with the small random diffusers VAE of tests/data/vae_tiny, and writes its outputs to
tests/data/reg_preprocessed/:

    folder/imagenet_256_vae/, folder/vae-sd/     --dest as folders
    zip/imagenet_256_vae.zip, zip/vae-sd.zip     --dest as .zip (EDM2's form)
    nolabels/imagenet_256_vae/, nolabels/vae-sd/ a flat folder: "labels": null

The only change to REG's code: `encode` moves the pixels to 'cuda' in one line; that
line is patched to 'cpu' (this machine has no GPU). Everything else runs unmodified
from a copy of its preprocessing/ folder.

    python3 -m venv /tmp/goldvenv
    # the constraints of tools/golden/vae.py plus click==8.5.1
    /tmp/goldvenv/bin/pip install -c /tmp/gold-constraints.txt torch diffusers safetensors numpy Pillow click tqdm
    /tmp/goldvenv/bin/python tools/golden/reg_preprocess.py /path/to/REG   # from the repository root

Deterministic: the JPEGs come from a seeded generator, the VAE is the committed one.
"""

import pathlib
import shutil
import subprocess
import sys
import tempfile

import numpy as np
from PIL import Image

REPO = pathlib.Path(__file__).resolve().parents[2]
OUT = REPO / "tests/data/reg_preprocessed"
VAE = REPO / "tests/data/vae_tiny"
CUDA_LINE = "img_tensor = torch.tensor(image.img).to('cuda').permute(2, 0, 1).unsqueeze(0)"


def jpeg_tree(root: pathlib.Path, classes: int, per_class: int, flat: bool = False) -> None:
    """Photos of varied sizes and aspect ratios, `classes` folders (or one flat folder)."""
    rng = np.random.default_rng(0)
    sizes = [(80, 60), (45, 90), (64, 64), (100, 37), (33, 70)]
    for c in range(classes):
        d = root if flat else root / f"n{c:08d}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            w, h = sizes[(c * per_class + i) % len(sizes)]
            yy, xx = np.mgrid[0:h, 0:w]
            base = rng.integers(0, 256, size=3)
            img = np.stack([(xx * 3 + base[0]) % 256, (yy * 5 + base[1]) % 256, ((xx + yy) * 2 + base[2]) % 256], -1)
            img = (img + rng.integers(0, 24, size=img.shape)).clip(0, 255).astype(np.uint8)
            Image.fromarray(img).save(d / f"c{c}_img{i}.JPEG", quality=90)


def run(tools: pathlib.Path, *args: str) -> None:
    subprocess.run([sys.executable, str(tools / "dataset_tools.py"), *args], check=True, cwd=tools)


def preprocess(tools: pathlib.Path, src: pathlib.Path, dest: pathlib.Path, ext: str) -> None:
    """REG's two commands: convert (center-crop-dhariwal), then encode."""
    images, moments = dest / f"imagenet_256_vae{ext}", dest / f"vae-sd{ext}"
    run(tools, "convert", f"--source={src}", f"--dest={images}", "--resolution=32x32", "--transform=center-crop-dhariwal")
    run(tools, "encode", f"--model-url={VAE}", f"--source={images}", f"--dest={moments}")


def main() -> None:
    reg = pathlib.Path(sys.argv[1]).resolve()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        tools = tmp / "preprocessing"
        shutil.copytree(reg / "preprocessing", tools)
        script = tools / "dataset_tools.py"
        text = script.read_text()
        assert text.count(CUDA_LINE) == 1, "REG's encode changed: check the patched line"
        script.write_text(text.replace(CUDA_LINE, CUDA_LINE.replace("'cuda'", "'cpu'")))
        jpeg_tree(tmp / "photos", classes=3, per_class=3)
        jpeg_tree(tmp / "flat", classes=1, per_class=2, flat=True)
        shutil.rmtree(OUT, ignore_errors=True)
        preprocess(tools, tmp / "photos", OUT / "folder", "")
        preprocess(tools, tmp / "photos", OUT / "zip", ".zip")
        preprocess(tools, tmp / "flat", OUT / "nolabels", "")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
