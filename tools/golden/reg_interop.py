"""Interop test data made by REG's own code (tests/import.rs, tests/sample.rs, tests/golden.rs).

Each claim of compatibility with the original code is checked against what that
code itself produced or read (github.com/Martinser/REG, checked with commit 021ea2e):

1. `reg_train.pt`: a checkpoint written by the save call of REG's `train.py`: a
   tiny SiT + REG (REG's `models/sit.py`, `TRAIN_DIMS`) trained two steps
   with REG's `SILoss`, `torch.optim.AdamW` set up as `train.py` sets it up, REG's
   `update_ema`, `args` from REG's own `parse_args`, and the dictionary `train.py`
   saves. `reg_train_expected.safetensors` holds its `model.*` and `ema.*` tensors.
2. `reg_export_forward.safetensors`: our `reg-ddp export` of tests/data/ckpt_v0 loaded
   with `load_state_dict(strict=True)` into REG's `SiT`, and its forward (`in.*`,
   `out.x`, `out.zs0`, `out.cls`) on a seeded input; `reg_state_dict.json`, the names and
   shapes that strict load accepted.
3. `reg_npz_read.json`: our `reg-ddp sample` `.npz` of tests/data/ckpt_v0, read by the
   reading code of REG's `evaluations/evaluator.py` (`open_npz_array`, streaming):
   the shape and dtype it saw and the SHA-256 of the file outside the pixel bytes (the
   zip and npy framing our writer produces), so a change of format fails the test.

`train.py` and `evaluator.py` import training and TensorFlow stacks at module level;
the functions used here (`parse_args`, `update_ema`, `open_npz_array` and its
helpers) are taken from their source with `ast` and run unchanged.

Needs the binary (`cargo build --release`) and the golden virtualenv of
tools/golden/reg_preprocess.py plus timm and torchvision (constraints: timm==1.0.31,
torchvision==0.26.0):

    /tmp/goldvenv/bin/python tools/golden/reg_interop.py /path/to/REG   # from the repository root
"""

import ast
import copy
import hashlib
import io
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import zipfile
from collections import OrderedDict

import numpy as np
import torch
from safetensors.torch import load_file, save_file

REPO = pathlib.Path(__file__).resolve().parents[2]
OUT = REPO / "tests/data/reg_interop"
BIN = REPO / "target/release/reg-ddp"
CKPT = REPO / "tests/data/ckpt_v0/step-0000002"
# The demo preset (configs/demo.yaml) in REG's constructor terms.
DIMS = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, decoder_hidden_size=64, encoder_depth=2, depth=4,
            num_heads=4, num_classes=10, class_dropout_prob=0.1, z_dims=[32], projector_dim=64, path_type="linear",
            fused_attn=False, qk_norm=False)
# Smaller still for the training checkpoint (its optimizer state is stored too).
TRAIN_DIMS = dict(DIMS, hidden_size=32, decoder_hidden_size=32, depth=2, num_heads=2, encoder_depth=1, z_dims=[16], projector_dim=32)


def functions_from(path: pathlib.Path, names: list[str], env: dict) -> dict:
    """The top-level functions (and classes) `names` of a source file, run in `env`."""
    tree = ast.parse(path.read_text())
    keep = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name in names]
    assert {n.name for n in keep} == set(names), f"{path}: not all of {names} found"
    exec(compile(ast.Module(body=keep, type_ignores=[]), str(path), "exec"), env)
    return env


def train_checkpoint(reg: pathlib.Path, SiT) -> None:
    from loss import SILoss
    import argparse
    env = functions_from(reg / "train.py", ["parse_args", "update_ema"], {"argparse": argparse, "OrderedDict": OrderedDict, "torch": torch})
    args = env["parse_args"](["--exp-name", "tiny", "--model", "SiT-B/2", "--num-classes", "10", "--encoder-depth", "1"])
    torch.manual_seed(0)
    model = SiT(**TRAIN_DIMS)
    ema = copy.deepcopy(model)
    for p in ema.parameters():
        p.requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                  weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)
    scale = torch.tensor([0.18215] * 4).view(1, 4, 1, 1)
    loss_fn = SILoss(prediction=args.prediction, path_type=args.path_type, encoders=[], accelerator=None,
                     latents_scale=scale, latents_bias=torch.zeros(1, 4, 1, 1), weighting=args.weighting)
    model.train()
    for _ in range(2):
        x = torch.randn(3, 4, 8, 8) * scale
        zs = [torch.randn(3, 17, 16)]
        y = torch.randint(0, 10, (3,))
        loss1, proj_loss1, _, _, loss2 = loss_fn(model, x, dict(y=y), zs=zs, cls_token=zs[0][:, 0], time_input=None, noises=None)
        loss = loss1.mean() + proj_loss1.mean() * args.proj_coeff + loss2.mean() * args.cls
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        env["update_ema"](ema, model)
    global_step = 2
    # train.py's save call (model.module is the unwrapped model there).
    checkpoint = {
        "model": model.state_dict(),
        "ema": ema.state_dict(),
        "opt": optimizer.state_dict(),
        "args": args,
        "steps": global_step,
    }
    torch.save(checkpoint, OUT / "reg_train.pt")
    expected = {f"model.{k}": v.contiguous() for k, v in model.state_dict().items()}
    expected.update({f"ema.{k}": v.contiguous() for k, v in ema.state_dict().items()})
    save_file(expected, OUT / "reg_train_expected.safetensors")


def export_forward(tmp: pathlib.Path, SiT) -> None:
    exported = tmp / "export.safetensors"
    subprocess.run([BIN, "export", "--ckpt", CKPT, "--out", exported], check=True)
    model = SiT(**DIMS)
    model.load_state_dict(load_file(exported), strict=True)
    model.eval()
    g = torch.Generator().manual_seed(1)
    inp = {"in.x": torch.randn(3, 4, 8, 8, generator=g), "in.t": torch.rand(3, generator=g),
           "in.y": torch.tensor([0, 7, 10]), "in.cls": torch.randn(3, 32, generator=g)}
    with torch.no_grad():
        x, zs, cls = model(inp["in.x"], inp["in.t"], inp["in.y"], cls_token=inp["in.cls"])
    save_file({**inp, "out.x": x.contiguous(), "out.zs0": zs[0].contiguous(), "out.cls": cls.contiguous()},
              OUT / "reg_export_forward.safetensors")
    # What load_state_dict(strict=True) accepted: REG's own names and shapes.
    json.dump({k: list(v.shape) for k, v in model.state_dict().items()}, open(OUT / "reg_state_dict.json", "w"), indent=0)


def npz_read(reg: pathlib.Path, tmp: pathlib.Path) -> None:
    from contextlib import contextmanager
    from abc import ABC, abstractmethod
    from typing import Iterable, Optional
    names = ["NpzArrayReader", "BatchIterator", "StreamingNpzArrayReader", "MemoryNpzArrayReader", "open_npz_array",
             "_read_bytes", "_open_npy_file"]
    env = functions_from(reg / "evaluations/evaluator.py", names, {
        "np": np, "io": io, "zipfile": zipfile, "contextmanager": contextmanager, "ABC": ABC, "abstractmethod": abstractmethod,
        "Iterable": Iterable, "Optional": Optional})
    out = tmp / "samples"
    args = ["sample", "--ckpt", CKPT, "--ema", "--vae", REPO / "tests/data/vae_tiny", "--num", "5", "--steps", "4",
            "--batch", "2", "--device", "cpu", "--threads", "1", "--out", out]
    subprocess.run([BIN, *args], check=True)
    npz = out.with_suffix(".npz")
    with env["open_npz_array"](str(npz), "arr_0") as reader:
        streaming = type(reader).__name__
        arr = np.concatenate(list(reader.read_batches(2)))
    data = arr.tobytes()
    raw = npz.read_bytes()
    at = raw.find(data)
    assert at > 0 and raw.count(data) == 1, "the pixel bytes are stored once, uncompressed"
    framing = raw[:at] + raw[at + len(data):]
    json.dump({"reader": streaming, "shape": list(arr.shape), "dtype": str(arr.dtype),
               "framing_sha256": hashlib.sha256(framing).hexdigest(),
               "sample_args": [os.path.relpath(a, REPO) if isinstance(a, pathlib.Path) else a for a in args[:-2]]},
              open(OUT / "reg_npz_read.json", "w"), indent=1)


def main() -> None:
    reg = pathlib.Path(sys.argv[1]).resolve()
    sys.path.insert(0, str(reg))
    from models.sit import SiT
    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        train_checkpoint(reg, SiT)
        export_forward(tmp, SiT)
        npz_read(reg, tmp)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
