"""Golden outputs for src/encoders/clip_image.rs and reg::eval::clip_score (checked by tests/clip_score.rs).

Writes five test images (smooth patterns with a little noise, so the PNGs stay small) of
different sizes: non-square landscape and portrait, smaller than 224 on the short side
(upscaled), larger (downscaled), exactly 224 square:

  tests/data/clip_image/{i}_{w}x{h}.png
  tests/data/clip_image_golden.safetensors
    crop224.u8        u8  [5, 224, 224, 3]  transformers' PIL-backend `CLIPImageProcessorPil` with
                                            openai's defaults (shortest edge 224, bicubic, center crop
                                            224) and do_rescale/do_normalize off: the resized, cropped
                                            pixels (so the 224 case is checked exactly without storing
                                            2.4 MB of floats)
    px56.pixel_values f32 [5, 3, 56, 56]    `CLIPImageProcessorPil.from_pretrained` of a folder whose
                                            preprocessor_config.json (metadata `px56.config`) says shortest
                                            edge 64, crop 56, other mean/std: the whole pipeline, read
                                            from the json
    px32.pixel_values f32 [5, 3, 32, 32]    openai's mean/std, size and crop 32: what the tiny model of
                                            tests/data/clip_tiny (vision image_size 32, no
                                            preprocessor_config.json) gets
    image_embeds      f32 [5, 24]           CLIPModel.get_image_features(px32) (float64, stored as f32)
    text_embeds       f32 [5, 24]           CLIPModel.get_text_features of the captions (metadata `captions`)
    scores            f64 [5]               100 * max(cos(image_embeds_i, text_embeds_i), 0)
    clip_score        f64 []                mean of `scores` (CLIPScore of Hessel et al. 2021 with w = 100)
  metadata: `captions` (JSON array), `px56.config`, `torchvision_max_abs_diff` (max |pixel_values|
  difference at 224 between transformers 5's default torchvision-backed `CLIPImageProcessor` and
  the PIL one: documented, not tested), `torchmetrics_clip_score` (clamp of the mean instead of
  the mean of clamps, as torchmetrics' CLIPScore computes it).

Set-up: the venv of tools/golden/clip.py (/tmp/clipvenv: transformers==5.24.0, torch 2.11.0,
pillow 13.0.0, torchvision 0.26.0). Run from the repository root, after clip.py:

    /tmp/clipvenv/bin/python tools/golden/clip_image.py
"""

import json
import os
import sys
import tempfile

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import CLIPImageProcessor, CLIPImageProcessorPil, CLIPModel, CLIPTokenizer

IMAGES = "tests/data/clip_image"
GOLDEN = "tests/data/clip_image_golden.safetensors"
MODEL = "tests/data/clip_tiny"
SIZES = [(300, 200), (97, 150), (50, 50), (224, 224), (60, 333)]
CAPTIONS = [
    "a photo of a cat",
    "a red cube on top of a blue sphere",
    "",
    "a painting of a sunset over mountains, with a small boat on the river",
    "a dog",
]


def make_image(i: int, w: int, h: int, rng: np.random.Generator) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    f = 2 * np.pi / max(w, h)
    chans = [
        128 + 100 * np.sin(f * (3 + i) * x + 0.5 * c) * np.cos(f * (2 + c) * y)
        + rng.normal(0, 6, (h, w))
        for c in range(3)
    ]
    img = np.stack(chans, -1)
    # A hard edge and saturated corners, so that overshoot of the bicubic taps is clipped.
    img[: h // 3, : w // 4] = [255, 0, 255]
    img[h // 2 :, w // 2 : w // 2 + 3] = 0
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def main() -> None:
    rng = np.random.default_rng(20240612)
    os.makedirs(IMAGES, exist_ok=True)
    for f in os.listdir(IMAGES):
        os.remove(os.path.join(IMAGES, f))
    images = []
    for i, (w, h) in enumerate(SIZES):
        arr = make_image(i, w, h, rng)
        Image.fromarray(arr).save(os.path.join(IMAGES, f"{i}_{w}x{h}.png"), optimize=True)
        images.append(Image.open(os.path.join(IMAGES, f"{i}_{w}x{h}.png")).convert("RGB"))

    # 224, openai's defaults, resized and cropped pixels only.
    pil224 = CLIPImageProcessorPil()
    assert pil224.size == {"shortest_edge": 224} and pil224.crop_size == {"height": 224, "width": 224}
    crops = [pil224(img, do_rescale=False, do_normalize=False, return_tensors="np")["pixel_values"][0] for img in images]
    for c in crops:
        assert np.array_equal(c, np.round(c)), "the PIL path rounds to u8 after the resize"
    crop224 = torch.from_numpy(np.stack(crops)).permute(0, 2, 3, 1).round().to(torch.uint8)
    full_pil = torch.from_numpy(pil224(images, return_tensors="np")["pixel_values"])
    full_tv = CLIPImageProcessor()(images, return_tensors="pt")["pixel_values"]
    tv_diff = float((full_pil - full_tv).abs().max())

    # 56 from a preprocessor_config.json with its own mean/std and size != crop.
    with tempfile.TemporaryDirectory() as d:
        CLIPImageProcessorPil(
            size={"shortest_edge": 64}, crop_size={"height": 56, "width": 56},
            image_mean=[0.5, 0.25, 0.75], image_std=[0.2, 0.3, 0.4],
        ).save_pretrained(d)
        with open(os.path.join(d, "preprocessor_config.json")) as f:
            px56_config = f.read()
        px56 = CLIPImageProcessorPil.from_pretrained(d)(images, return_tensors="pt")["pixel_values"]

    # 32: the tiny model's image_size, openai's mean/std.
    px32 = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})(images, return_tensors="pt")["pixel_values"]

    model = CLIPModel.from_pretrained(MODEL, attn_implementation="eager").double().eval()
    tok = CLIPTokenizer.from_pretrained(MODEL)
    ids = tok(CAPTIONS, padding="max_length", truncation=True, max_length=77, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        img = model.get_image_features(pixel_values=px32.double()).pooler_output
        txt = model.get_text_features(input_ids=ids).pooler_output
    cos = torch.nn.functional.cosine_similarity(img, txt, dim=-1)
    scores = 100 * cos.clamp(min=0)
    clip_score = scores.mean()
    torchmetrics_like = (100 * cos).mean().clamp(min=0)
    assert (cos < 0).any() and (cos > 0).any(), f"the clamp should matter for some rows: {cos}"

    out = {
        "crop224.u8": crop224,
        "px56.pixel_values": px56.float(),
        "px32.pixel_values": px32.float(),
        "image_embeds": img.float(),
        "text_embeds": txt.float(),
        "scores": scores,
        "clip_score": clip_score,
    }
    meta = {
        "captions": json.dumps(CAPTIONS),
        "px56.config": px56_config,
        "torchvision_max_abs_diff": repr(tv_diff),
        "torchmetrics_clip_score": repr(float(torchmetrics_like)),
    }
    save_file({k: v.contiguous() for k, v in out.items()}, GOLDEN, metadata=meta)
    total = sum(os.path.getsize(os.path.join(IMAGES, f)) for f in os.listdir(IMAGES)) + os.path.getsize(GOLDEN)
    print(f"wrote {IMAGES} ({sorted(os.listdir(IMAGES))}) and {GOLDEN}: {total} bytes")
    print(f"cos {cos.tolist()}\nclip_score {float(clip_score)} (torchmetrics-style {float(torchmetrics_like)})")
    print(f"torchvision CLIPImageProcessor vs PIL CLIPImageProcessorPil at 224: max |diff| {tv_diff}")
    assert total < 1_500_000, total


if __name__ == "__main__":
    sys.exit(main())
