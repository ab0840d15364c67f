"""Golden vectors for the VAE (src/encoders/vae.rs) from diffusers' own AutoencoderKL.

Builds a tiny random AutoencoderKL (four blocks, so it is a true f8 like the
Stable Diffusion VAE, with channel changes so the shortcut convs are exercised),
saves it with `save_pretrained` into tests/data/vae_tiny/ and its inputs and
outputs (CPU, float32) into tests/data/vae_tiny_golden.safetensors:

    in.pixels   u8  [2, 3, 32, 32]  random pixels
    out.moments f32 [2, 8, 4, 4]    latent_dist mean then std of encode(pixels / 127.5 - 1)
    in.latents  f32 [2, 4, 4, 4]    random latents, unscaled (no scaling_factor)
    out.decoded f32 [2, 3, 32, 32]  decode(in.latents).sample

It needs its own virtualenv (never the project's .venv, whose torch tch links
against). The constraints pin torch to the project's version so pip does not
upgrade it:

    python3 -m venv /tmp/goldvenv
    cat > /tmp/gold-constraints.txt <<'END'
    torch==2.11.0
    diffusers==0.42.1
    transformers==5.24.0
    accelerate==1.15.0
    safetensors==0.8.0
    numpy==2.4.6
    Pillow==13.0.0
    END
    /tmp/goldvenv/bin/pip install -c /tmp/gold-constraints.txt \
        torch diffusers transformers accelerate safetensors numpy Pillow
    /tmp/goldvenv/bin/python tools/golden/vae.py    # from the repository root

Runs in a few seconds on a CPU; the outputs are deterministic for a given
torch/diffusers pair.
"""

import json
import pathlib

import torch
from diffusers import AutoencoderKL
from safetensors.torch import save_file

ROOT = pathlib.Path(__file__).resolve().parents[2]
MODEL_DIR = ROOT / "tests" / "data" / "vae_tiny"
GOLDEN = ROOT / "tests" / "data" / "vae_tiny_golden.safetensors"

CONFIG = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    block_out_channels=[8, 16, 16, 16],
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    layers_per_block=1,
    norm_num_groups=4,
    sample_size=32,
    scaling_factor=0.18215,
)


def perturb(vae: AutoencoderKL, gen: torch.Generator) -> None:
    """Moves every parameter off its init, so no norm hides behind weight 1 / bias 0."""
    with torch.no_grad():
        for _, p in sorted(vae.named_parameters()):
            noise = torch.randn(p.shape, generator=gen)
            if p.dim() > 1:
                p.add_(0.5 * p.std() * noise)
            else:
                p.add_(0.1 * noise)


def main() -> None:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1234)
    vae = AutoencoderKL(**CONFIG).eval()
    perturb(vae, gen)

    MODEL_DIR.mkdir(parents=True, exist_ok=True)
    vae.save_pretrained(MODEL_DIR, safe_serialization=True)

    pixels = torch.randint(0, 256, (2, 3, 32, 32), generator=gen, dtype=torch.uint8)
    latents = torch.randn(2, CONFIG["latent_channels"], 4, 4, generator=gen)
    with torch.no_grad():
        dist = vae.encode(pixels.float() / 127.5 - 1.0).latent_dist
        moments = torch.cat([dist.mean, dist.std], dim=1)
        decoded = vae.decode(latents).sample

    save_file(
        {
            "in.pixels": pixels.contiguous(),
            "out.moments": moments.contiguous(),
            "in.latents": latents.contiguous(),
            "out.decoded": decoded.contiguous(),
        },
        str(GOLDEN),
    )
    print(json.dumps({
        "moments": list(moments.shape),
        "decoded": list(decoded.shape),
        "decoded_range": [decoded.min().item(), decoded.max().item()],
        "std_range": [dist.std.min().item(), dist.std.max().item()],
        "params": sum(p.numel() for p in vae.parameters()),
    }))


if __name__ == "__main__":
    main()
