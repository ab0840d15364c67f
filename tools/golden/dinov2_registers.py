"""Golden outputs for DINOv2 with registers in src/encoders/dinov2.rs (checked by
tests/dinov2.rs `dinov2_with_registers_matches_transformers`).

Builds a tiny random transformers `Dinov2WithRegistersModel` (hidden 32, 2 layers, 2 heads,
patch 14, 4 registers, image_size 56 so that a 56 px input needs no position resampling and
the check is of the registers alone), saves it with `save_pretrained` to
tests/data/dinov2_reg_tiny/ (config.json + model.safetensors, published naming), and writes
tests/data/dinov2_reg_tiny_golden.safetensors:

  in.preprocessed     f32 [2, 3, 56, 56]   a preprocessed input
  out.last_hidden     f32 [2, 21, 32]      last_hidden_state: class token, 4 registers, 16 patches
  out.features        f32 [2, 17, 32]      class token and patches (REG's x_norm_clstoken and
                                           x_norm_patchtokens): what the encoder gives REG

Computed in float64 and stored as float32. transformers needs no virtualenv of its own here:
    python3 -m venv /tmp/tfenv && /tmp/tfenv/bin/pip install transformers==5.25.0
    PYTHONPATH=/tmp/tfenv/lib/python3.11/site-packages .venv/bin/python tools/golden/dinov2_registers.py
(torch from the project's .venv, transformers from the other; nothing is installed into .venv).
"""

import os
import sys

import torch
from safetensors.torch import save_file
from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from dinov2 import randomise  # noqa: E402

OUT_DIR = "tests/data/dinov2_reg_tiny"
GOLDEN = "tests/data/dinov2_reg_tiny_golden.safetensors"
REGISTERS = 4


def main() -> None:
    gen = torch.Generator().manual_seed(7)
    config = Dinov2WithRegistersConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, patch_size=14,
                                       image_size=56, num_register_tokens=REGISTERS, layerscale_value=1.0)
    model = Dinov2WithRegistersModel(config).eval()
    # The same randomisation as the DINOv2 golden (every part of the block matters).
    randomise(model, gen)
    model.save_pretrained(OUT_DIR, safe_serialization=True)
    x = torch.randn(2, 3, 56, 56, generator=gen)
    with torch.no_grad():
        h = model.double()(pixel_values=x.double()).last_hidden_state
    features = torch.cat([h[:, :1], h[:, 1 + REGISTERS:]], 1)
    out = {"in.preprocessed": x.float(), "out.last_hidden": h.float(), "out.features": features.float()}
    save_file({k: v.contiguous() for k, v in out.items()}, GOLDEN)
    print("wrote", OUT_DIR, GOLDEN, tuple(h.shape))


if __name__ == "__main__":
    main()
