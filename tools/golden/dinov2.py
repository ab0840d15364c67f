"""Golden outputs for src/encoders/dinov2.rs (checked by tests/dinov2.rs).

Builds a tiny random transformers `Dinov2Model` (hidden 32, 2 layers, 2 heads, patch 14,
image_size 518 so its position table is 37x37 like facebook/dinov2-base), saves it with
`save_pretrained` to tests/data/dinov2_tiny/ (config.json + model.safetensors, published
naming), and writes tests/data/dinov2_tiny_golden.safetensors:

  in.pixels            u8  [2, 3, 64, 64]   random pixels
  in.preprocessed      f32 [2, 3, 56, 56]   x/255, ImageNet mean/std, bicubic to 56 (REG's recipe)
  pos_embed_resampled  f32 [1, 17, 32]      37x37 table -> 4x4, timm's resample_abs_pos_embed
  out.features         f32 [2, 17, 32]      last_hidden_state (after the final LayerNorm)
  swiglu.*                                  a 1-layer SwiGLU variant (use_swiglu_ffn, image_size 56):
                                            its weights under `swiglu.`, its config.json in the
                                            metadata key `swiglu.config`, and `swiglu.out.features`
                                            for the same preprocessed input

Everything is computed in float64 and stored as float32, so the golden is the exact answer
rounded once, not one f32 implementation's rounding.

Set-up, in a separate virtualenv (never the project's .venv):

    python3 -m venv /tmp/goldvenv
    printf 'torch==2.11.0\\ntransformers==5.24.0\\nsafetensors==0.8.0\\nnumpy==2.4.6\\n' > /tmp/dinov2-constraints.txt
    /tmp/goldvenv/bin/pip install -c /tmp/dinov2-constraints.txt torch transformers safetensors numpy

Run from the repository root:

    /tmp/goldvenv/bin/python tools/golden/dinov2.py
"""

import json
import os
import tempfile

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import Dinov2Config, Dinov2Model

OUT_DIR = "tests/data/dinov2_tiny"
GOLDEN = "tests/data/dinov2_tiny_golden.safetensors"
INPUT_SIZE = 56  # grid 4x4 from patch 14
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def randomise(model: Dinov2Model, gen: torch.Generator) -> None:
    """Weights large enough that every part of the block matters (HF's init leaves
    LayerNorms at 1/0 and layer scales at one constant, which would hide mistakes)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=gen, dtype=p.dtype)
            if name.endswith("lambda1"):
                p.copy_(0.5 + 0.5 * torch.rand(p.shape, generator=gen, dtype=p.dtype))
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * r)
            elif name.endswith("bias"):
                p.copy_(0.1 * r)
            elif name in ("embeddings.cls_token", "embeddings.mask_token", "embeddings.position_embeddings"):
                p.copy_(r)
            else:
                # Linear / conv weights: unit-variance outputs.
                p.copy_(r / p[0].numel() ** 0.5)
        # A position table with spatial structure (plus noise), so resampling errors show.
        pe = model.embeddings.position_embeddings
        g = int((pe.shape[1] - 1) ** 0.5)
        yy, xx = torch.meshgrid(torch.linspace(-1, 1, g, dtype=pe.dtype), torch.linspace(-1, 1, g, dtype=pe.dtype), indexing="ij")
        freq = torch.rand(pe.shape[2], 2, generator=gen, dtype=pe.dtype) * 6.0
        wave = torch.sin(xx[..., None] * freq[:, 0] + yy[..., None] * freq[:, 1])  # [g, g, D]
        pe[0, 1:] = wave.reshape(g * g, -1) + 0.3 * pe[0, 1:]


def resample_abs_pos_embed(table: torch.Tensor, grid: int) -> torch.Tensor:
    """timm.layers.resample_abs_pos_embed with num_prefix_tokens=1, antialias=True."""
    d = table.shape[-1]
    old = int((table.shape[1] - 1) ** 0.5)
    prefix, patches = table[:, :1], table[:, 1:]
    patches = patches.reshape(1, old, old, d).permute(0, 3, 1, 2)
    patches = F.interpolate(patches, size=(grid, grid), mode="bicubic", antialias=True, align_corners=False)
    patches = patches.permute(0, 2, 3, 1).reshape(1, grid * grid, d)
    return torch.cat([prefix, patches], dim=1)


def preprocess(pixels: torch.Tensor) -> torch.Tensor:
    """REG's preprocess_raw_image for dinov2, at INPUT_SIZE instead of 224."""
    x = pixels.to(torch.float64) / 255.0
    mean = torch.tensor(MEAN, dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor(STD, dtype=torch.float64).view(1, 3, 1, 1)
    x = (x - mean) / std
    return F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bicubic", align_corners=False)


def run(model: Dinov2Model, x: torch.Tensor) -> torch.Tensor:
    """last_hidden_state in float64. The position table must already be at x's grid:
    transformers then adds it as is (interpolate_pos_encoding returns early), which is
    checked here rather than assumed."""
    emb = model.embeddings
    n_pos = emb.position_embeddings.shape[1]
    assert n_pos == 1 + (x.shape[-1] // 14) ** 2
    probe = torch.zeros(1, n_pos, emb.position_embeddings.shape[2], dtype=x.dtype)
    assert torch.equal(emb.interpolate_pos_encoding(probe, x.shape[-2], x.shape[-1]), emb.position_embeddings)
    with torch.no_grad():
        return model(pixel_values=x).last_hidden_state


def tiny_model(gen: torch.Generator, **overrides) -> Dinov2Model:
    cfg = dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        mlp_ratio=4,
        patch_size=14,
        image_size=518,
        layer_norm_eps=1e-6,
        hidden_act="gelu",
        layerscale_value=1.0,
        use_swiglu_ffn=False,
    )
    cfg.update(overrides)
    # Eager attention: the textbook softmax(QK^T/sqrt(d))V as the reference.
    model = Dinov2Model._from_config(Dinov2Config(**cfg), attn_implementation="eager").eval()
    assert model.config._attn_implementation == "eager"
    randomise(model, gen)
    return model


def main() -> None:
    gen = torch.Generator().manual_seed(20240607)

    model = tiny_model(gen)
    os.makedirs(OUT_DIR, exist_ok=True)
    model.save_pretrained(OUT_DIR)  # f32, published naming
    with safe_open(os.path.join(OUT_DIR, "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "encoder.layer.0.attention.attention.query.weight" in keys, sorted(keys)

    pixels = torch.randint(0, 256, (2, 3, 64, 64), generator=gen, dtype=torch.uint8)
    x = preprocess(pixels)

    model = model.double()
    table = model.embeddings.position_embeddings.detach().clone()
    resampled = resample_abs_pos_embed(table, INPUT_SIZE // 14)
    model.embeddings.position_embeddings = torch.nn.Parameter(resampled)
    model.config.image_size = INPUT_SIZE
    features = run(model, x)

    # SwiGLU variant (dinov2-giant's feed-forward), at its own resolution: no resampling.
    sw = tiny_model(gen, use_swiglu_ffn=True, num_hidden_layers=1, image_size=INPUT_SIZE)
    with tempfile.TemporaryDirectory() as sw_dir:
        sw.save_pretrained(sw_dir)
        with safe_open(os.path.join(sw_dir, "model.safetensors"), "pt") as f:
            sw_state = {f"swiglu.{k}": f.get_tensor(k) for k in f.keys()}
        with open(os.path.join(sw_dir, "config.json")) as f:
            sw_config = f.read()
    assert "swiglu.encoder.layer.0.mlp.weights_in.weight" in sw_state, sorted(sw_state)
    sw_features = run(sw.double(), x)

    out = {
        "in.pixels": pixels,
        "in.preprocessed": x.float(),
        "pos_embed_resampled": resampled.float(),
        "out.features": features.float(),
        "swiglu.out.features": sw_features.float(),
        **{k: v.float() for k, v in sw_state.items()},
    }
    save_file({k: v.contiguous() for k, v in out.items()}, GOLDEN, metadata={"swiglu.config": sw_config})
    with open(os.path.join(OUT_DIR, "config.json")) as f:
        cfg = json.load(f)
    print(f"wrote {OUT_DIR} (hidden {cfg['hidden_size']}, grid {cfg['image_size'] // cfg['patch_size']}) and {GOLDEN}")
    print("features", tuple(features.shape), "max", features.abs().max().item())


if __name__ == "__main__":
    main()
