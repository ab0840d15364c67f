"""Golden outputs for src/encoders/inception.rs (checked by tests/inception.rs).

Builds pytorch-fid's FID Inception-v3 (`pytorch_fid.inception.InceptionV3([3], resize_input=True,
normalize_input=True)`, i.e. `fid_inception_v3()`: torchvision's Inception3 with 1008 classes and
the FID blocks FIDInceptionA/C/E_1/E_2) WITHOUT downloading its weights: `load_state_dict_from_url`
is replaced by a function returning deterministic weights that the Rust test rebuilds by the same
formula (the real weights are ~95 MB, too big to commit). For the tensor with index j in sorted
name order (BatchNorm's num_batches_tracked left out) and element k of its flattened storage:

    v = frac(sin(0.37 * k + 0.11 * j) * 43758.5453)       in float64, in (-1, 1)
    conv weight   v * sqrt(12 / fan_in)                   fan_in = in * kh * kw (He uniform, gain 2:
                                                          the fixed BN statistics do not renormalise)
    bn.weight     1 + 0.1 * v
    bn.bias       0.05 * v
    running_mean  0.05 * v
    running_var   1 + 0.5 * |v|
    fc.weight     0.05 * v * sqrt(3 / 2048)         (logits of a few units: probs not one-hot)
    fc.bias       0.05 * v

then cast to float32 (`frac` is torch's: x - trunc(x)).

Writes tests/data/inception_golden.safetensors:

  in.images      u8  [4, 64, 48, 3]  random pixels, NHWC like the ADM .npz (non-square: exercises the resize)
  out.pool       f32 [4, 2048]       InceptionV3 block 3 (after the adaptive average pool), flattened
  out.spatial    f32 [4, 2023]       Mixed_6d output (forward hook), channels [:7], NHWC order, flattened:
                                     the ADM evaluator's `mixed_6/conv:0[..., :7]` (TF mixed_6 = Mixed_6d,
                                     its `conv` = branch1x1 = the first 192 channels of the block output)
  out.probs      f32 [4, 1008]       softmax(fc(pool)) with the same model's fc

and in the metadata `params` a JSON list of [name, shape] in sorted name order (what the test must build).

The model runs in float64 (weights are the float32 values, widened), so the golden is the exact answer
rounded once to float32.

Set-up, in a separate virtualenv (never the project's .venv), torch pinned:

    printf 'torch==2.11.0\\nnumpy==2.4.6\\n' > /tmp/fidconstraints.txt
    /tmp/goldvenv/bin/pip install --no-deps -c /tmp/fidconstraints.txt pytorch-fid==0.3.0 torchvision==0.26.0
    /tmp/goldvenv/bin/pip install -c /tmp/fidconstraints.txt scipy==1.16.3

Run from the repository root:

    /tmp/goldvenv/bin/python tools/golden/inception.py
"""

import json
import math

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import pytorch_fid.inception as pfi

GOLDEN = "tests/data/inception_golden.safetensors"


def pattern(n: int, j: int) -> torch.Tensor:
    k = torch.arange(n, dtype=torch.float64)
    return torch.frac(torch.sin(0.37 * k + 0.11 * j) * 43758.5453)


def make_weights(template: dict) -> dict:
    names = sorted(n for n in template if not n.endswith("num_batches_tracked"))
    out = {}
    for j, name in enumerate(names):
        shape = template[name].shape
        v = pattern(math.prod(shape), j).reshape(shape)
        if name.endswith("conv.weight"):
            fan_in = math.prod(shape[1:])
            t = v * math.sqrt(12.0 / fan_in)
        elif name.endswith("bn.weight"):
            t = 1.0 + 0.1 * v
        elif name.endswith("bn.bias") or name.endswith("running_mean") or name == "fc.bias":
            t = 0.05 * v
        elif name.endswith("running_var"):
            t = 1.0 + 0.5 * v.abs()
        elif name == "fc.weight":
            t = 0.05 * v * math.sqrt(3.0 / 2048)
        else:
            raise ValueError(f"unexpected parameter {name}")
        out[name] = t.to(torch.float32)
    # num_batches_tracked is in the published state dict too; the forward pass ignores it.
    for name in template:
        if name.endswith("num_batches_tracked"):
            out[name] = template[name].clone()
    return out


def fid_layout() -> dict:
    """The state-dict layout of `fid_inception_v3()`, built as it builds it (no download)."""
    inc = pfi._inception_v3(num_classes=1008, aux_logits=False, weights=None)
    inc.Mixed_5b = pfi.FIDInceptionA(192, pool_features=32)
    inc.Mixed_5c = pfi.FIDInceptionA(256, pool_features=64)
    inc.Mixed_5d = pfi.FIDInceptionA(288, pool_features=64)
    inc.Mixed_6b = pfi.FIDInceptionC(768, channels_7x7=128)
    inc.Mixed_6c = pfi.FIDInceptionC(768, channels_7x7=160)
    inc.Mixed_6d = pfi.FIDInceptionC(768, channels_7x7=160)
    inc.Mixed_6e = pfi.FIDInceptionC(768, channels_7x7=192)
    inc.Mixed_7b = pfi.FIDInceptionE_1(1280)
    inc.Mixed_7c = pfi.FIDInceptionE_2(2048)
    return inc.state_dict()


def main() -> None:
    weights = make_weights(fid_layout())
    # fid_inception_v3() loads with strict load_state_dict, so every name and shape must match.
    pfi.load_state_dict_from_url = lambda *a, **k: {n: t.clone() for n, t in weights.items()}
    model = pfi.InceptionV3([3], resize_input=True, normalize_input=True).eval().double()

    # The fc layer is not part of InceptionV3's blocks: rebuild it from the same weights.
    fc_w = weights["fc.weight"].double()
    fc_b = weights["fc.bias"].double()

    mixed_6d = model.blocks[2][6]
    assert isinstance(mixed_6d, pfi.FIDInceptionC) and mixed_6d.branch1x1.conv.out_channels == 192
    captured = {}
    mixed_6d.register_forward_hook(lambda m, i, o: captured.__setitem__("x", o))

    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (4, 64, 48, 3), generator=gen, dtype=torch.uint8)
    with torch.no_grad():
        x = images.permute(0, 3, 1, 2).double() / 255.0  # pytorch-fid takes [0, 1]
        pool = model(x)[0].flatten(1)
        spatial = captured["x"][:, :7].permute(0, 2, 3, 1).reshape(4, -1)
        probs = F.softmax(F.linear(pool, fc_w, fc_b), dim=1)
    print("pool", pool.shape, pool.abs().max().item(), pool.std(0).mean().item())
    print("spatial", spatial.shape, spatial.abs().max().item(), spatial.std(0).mean().item())
    print("probs", probs.shape, probs.max().item(), probs.min().item())
    params = [[n, list(weights[n].shape)] for n in sorted(weights) if not n.endswith("num_batches_tracked")]
    save_file(
        {
            "in.images": images.contiguous(),
            "out.pool": pool.float().contiguous(),
            "out.spatial": spatial.float().contiguous(),
            "out.probs": probs.float().contiguous(),
        },
        GOLDEN,
        metadata={"params": json.dumps(params)},
    )
    print("wrote", GOLDEN, len(params), "parameter tensors")


if __name__ == "__main__":
    main()
