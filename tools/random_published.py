#!/usr/bin/env python3
"""Random-weight model folders in the published layouts, for timing `prepare` where the
published weights cannot be fetched (a GPU machine without network): diffusers'
`AutoencoderKL` (stabilityai/sd-vae-ft-ema) and transformers' `Dinov2Model`
(facebook/dinov2-base), at their published sizes or as small as the test folders.

  python3 tools/random_published.py --vae OUT/vae --encoder OUT/dinov2            # published sizes
  python3 tools/random_published.py --vae OUT/vae --encoder OUT/dinov2 --small    # tests/data sizes
  python3 tools/random_published.py --check      # the small layouts equal tests/data's, name and shape

The tensor names and shapes follow from each config the way diffusers and transformers
build the modules; `--check` compares them with the folders those libraries wrote
(tests/data/vae_tiny, tests/data/dinov2_tiny). Weights are N(0, 0.02), biases zero,
norms one: numbers for timing, not a model. Needs numpy only.
"""

import argparse
import json
import struct
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]

VAE_PUBLISHED = {
    "_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
    "sample_size": 256, "scaling_factor": 0.18215,
}
DINOV2_PUBLISHED = {
    "model_type": "dinov2", "architectures": ["Dinov2Model"], "hidden_size": 768, "num_hidden_layers": 12,
    "num_attention_heads": 12, "mlp_ratio": 4, "patch_size": 14, "image_size": 518, "num_channels": 3,
    "hidden_act": "gelu", "layer_norm_eps": 1e-6, "layerscale_value": 1.0, "qkv_bias": True, "use_swiglu_ffn": False,
}


def vae_shapes(c):
    """AutoencoderKL's state dict: name -> shape."""
    s = {}
    chs, lpb, lat = c["block_out_channels"], c["layers_per_block"], c["latent_channels"]

    def conv(n, o, i, k):
        s[f"{n}.weight"], s[f"{n}.bias"] = [o, i, k, k], [o]

    def norm(n, ch):
        s[f"{n}.weight"], s[f"{n}.bias"] = [ch], [ch]

    def resnet(n, i, o):
        norm(f"{n}.norm1", i)
        conv(f"{n}.conv1", o, i, 3)
        norm(f"{n}.norm2", o)
        conv(f"{n}.conv2", o, o, 3)
        if i != o:
            conv(f"{n}.conv_shortcut", o, i, 1)

    def mid(n, ch):
        resnet(f"{n}.resnets.0", ch, ch)
        norm(f"{n}.attentions.0.group_norm", ch)
        for p in ["to_q", "to_k", "to_v", "to_out.0"]:
            s[f"{n}.attentions.0.{p}.weight"], s[f"{n}.attentions.0.{p}.bias"] = [ch, ch], [ch]
        resnet(f"{n}.resnets.1", ch, ch)

    conv("encoder.conv_in", chs[0], c["in_channels"], 3)
    prev = chs[0]
    for b, ch in enumerate(chs):
        for r in range(lpb):
            resnet(f"encoder.down_blocks.{b}.resnets.{r}", prev if r == 0 else ch, ch)
        prev = ch
        if b < len(chs) - 1:
            conv(f"encoder.down_blocks.{b}.downsamplers.0.conv", ch, ch, 3)
    mid("encoder.mid_block", chs[-1])
    norm("encoder.conv_norm_out", chs[-1])
    conv("encoder.conv_out", 2 * lat, chs[-1], 3)
    conv("quant_conv", 2 * lat, 2 * lat, 1)
    conv("post_quant_conv", lat, lat, 1)
    conv("decoder.conv_in", chs[-1], lat, 3)
    mid("decoder.mid_block", chs[-1])
    prev = chs[-1]
    for b, ch in enumerate(reversed(chs)):
        for r in range(lpb + 1):
            resnet(f"decoder.up_blocks.{b}.resnets.{r}", prev if r == 0 else ch, ch)
        prev = ch
        if b < len(chs) - 1:
            conv(f"decoder.up_blocks.{b}.upsamplers.0.conv", ch, ch, 3)
    norm("decoder.conv_norm_out", chs[0])
    conv("decoder.conv_out", c["out_channels"], chs[0], 3)
    return s


def dinov2_shapes(c):
    """Dinov2Model's state dict: name -> shape."""
    d, p = c["hidden_size"], c["patch_size"]
    grid = c["image_size"] // p
    m = int(d * c["mlp_ratio"])
    s = {"embeddings.cls_token": [1, 1, d], "embeddings.mask_token": [1, d],
         "embeddings.position_embeddings": [1, grid * grid + 1, d],
         "embeddings.patch_embeddings.projection.weight": [d, c["num_channels"], p, p],
         "embeddings.patch_embeddings.projection.bias": [d],
         "layernorm.weight": [d], "layernorm.bias": [d]}
    for i in range(c["num_hidden_layers"]):
        n = f"encoder.layer.{i}"
        for part in ["norm1", "norm2"]:
            s[f"{n}.{part}.weight"], s[f"{n}.{part}.bias"] = [d], [d]
        for part in ["attention.attention.query", "attention.attention.key", "attention.attention.value",
                     "attention.output.dense"]:
            s[f"{n}.{part}.weight"], s[f"{n}.{part}.bias"] = [d, d], [d]
        s[f"{n}.layer_scale1.lambda1"], s[f"{n}.layer_scale2.lambda1"] = [d], [d]
        s[f"{n}.mlp.fc1.weight"], s[f"{n}.mlp.fc1.bias"] = [m, d], [m]
        s[f"{n}.mlp.fc2.weight"], s[f"{n}.mlp.fc2.bias"] = [d, m], [d]
    return s


def header_shapes(path):
    b = path.read_bytes()
    n = struct.unpack("<Q", b[:8])[0]
    h = json.loads(b[8:8 + n])
    h.pop("__metadata__", None)
    return {k: v["shape"] for k, v in h.items()}


def write(folder, weights_name, config, shapes, seed):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    rng = np.random.default_rng(seed)
    header, blobs, at = {}, [], 0
    for name in sorted(shapes):
        shape = shapes[name]
        if name.endswith(".bias") or name.endswith("mask_token"):
            a = np.zeros(shape, np.float32)
        elif len(shape) == 1 and ("norm" in name or "lambda" in name):
            a = np.ones(shape, np.float32)
        else:
            a = (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float32)
        raw = a.tobytes()
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [at, at + len(raw)]}
        blobs.append(raw)
        at += len(raw)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(folder / weights_name, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for raw in blobs:
            f.write(raw)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vae")
    ap.add_argument("--encoder")
    ap.add_argument("--small", action="store_true", help="the sizes of tests/data's folders")
    ap.add_argument("--check", action="store_true")
    a = ap.parse_args()
    tiny_vae = json.loads((REPO / "tests/data/vae_tiny/config.json").read_text())
    tiny_dino = json.loads((REPO / "tests/data/dinov2_tiny/config.json").read_text())
    if a.check:
        for what, shapes, path in [
            ("vae", vae_shapes(tiny_vae), REPO / "tests/data/vae_tiny/diffusion_pytorch_model.safetensors"),
            ("dinov2", dinov2_shapes(tiny_dino), REPO / "tests/data/dinov2_tiny/model.safetensors")]:
            want = header_shapes(path)
            if shapes != want:
                diff = sorted(set(shapes) ^ set(want))[:5]
                bad = [k for k in shapes if k in want and shapes[k] != want[k]][:5]
                raise SystemExit(f"{what}: the layout differs from {path}: names {diff}, shapes {bad}")
        print(json.dumps({"check": "ok"}))
    vae_cfg = tiny_vae if a.small else VAE_PUBLISHED
    dino_cfg = tiny_dino if a.small else DINOV2_PUBLISHED
    if a.vae:
        write(Path(a.vae), "diffusion_pytorch_model.safetensors", vae_cfg, vae_shapes(vae_cfg), 0)
    if a.encoder:
        write(Path(a.encoder), "model.safetensors", dino_cfg, dinov2_shapes(dino_cfg), 1)


if __name__ == "__main__":
    main()
