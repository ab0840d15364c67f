"""Small torch.save files that tests/hostile_files.rs mutates: every structure the restricted reader walks
(zip directory, persistent ids, a view sharing its storage, an OrderedDict with _metadata via BUILD, an
argparse.Namespace via NEWOBJ + BUILD, memo references), kept to a few KB so that hundreds of mutations
run in seconds.

Run from the repository root with the project virtualenv: .venv/bin/python tools/golden/hostile_seeds.py
"""
import argparse
import os
from collections import OrderedDict

import torch

out = os.path.join("tests", "data", "hostile")
os.makedirs(out, exist_ok=True)
torch.manual_seed(0)
w = torch.randn(2, 3)
model = torch.nn.Linear(3, 2).state_dict()  # an OrderedDict carrying _metadata
model["w"] = w
model["wt"] = w.t()  # a view of the same storage, other strides
model["h"] = torch.arange(4, dtype=torch.float16)
model["i"] = torch.tensor([1, -2], dtype=torch.int64)
ckpt = {
    "model": model,
    "ema": OrderedDict((k, v.clone()) for k, v in model.items()),
    "args": argparse.Namespace(lr=1e-4, name="tiny"),
    "steps": 7,
}
torch.save(ckpt, os.path.join(out, "tiny.pt"))
torch.save(ckpt, os.path.join(out, "tiny-legacy.pt"), _use_new_zipfile_serialization=False)
for name in ("tiny.pt", "tiny-legacy.pt"):
    print(name, os.path.getsize(os.path.join(out, name)))
