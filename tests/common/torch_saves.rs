//! torch.save files written by PyTorch itself (the project's .venv), for the readers' tests: tests/import.rs
//! imports them exactly; tests/hostile_files.rs damages them.

use super::python;
use std::path::PathBuf;
use std::sync::OnceLock;

/// What a torch.save reader meets beyond REG's own checkpoints (tests/reg_interop.rs reads one written by REG's
/// train.py): views sharing storage, every dtype, prefixes, memoized dicts, pickle protocols 2, 4 and 5, the legacy
/// format, a bare state dict; and the expected values of every tensor as JSON.
const SCRIPT: &str = r#"
import argparse, json, os, struct, sys
from collections import OrderedDict
import torch, torch.nn as nn
d = sys.argv[1]
torch.manual_seed(0)

class Attn(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(8, 24)

class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = Attn()

class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.x_embedder = nn.Module()
        self.x_embedder.proj = nn.Conv2d(4, 8, 2, 2)
        self.blocks = nn.ModuleList([Block(), Block()])
        self.pos_embed = nn.Parameter(torch.randn(1, 5, 8), requires_grad=False)

model = Tiny()
opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
model.blocks[0].attn.qkv(torch.randn(3, 8)).square().sum().backward()
opt.step()

sd = model.state_dict()  # an OrderedDict with _metadata, as REG saves it
a = torch.randn(6, 4)
sd["w1"] = a[1:3]        # views sharing one storage, one of them not contiguous
sd["w2"] = a.t()
sd["w3"] = a[:, 1]
sd["counts"] = torch.arange(-3, 9, dtype=torch.int64).reshape(3, 4)
sd["half_bf16"] = torch.randn(2, 3).to(torch.bfloat16)
sd["mask"] = torch.tensor([True, False, True])
sd["scalar"] = torch.tensor(2.5, dtype=torch.float64)
sd["empty"] = torch.zeros(0, 3)
ema = OrderedDict(("module." + k, v.float() * 0.5 if v.is_floating_point() else v) for k, v in sd.items())
ema["_orig_mod.module.extra"] = torch.ones(2, dtype=torch.float16)
ck = {
    "model": sd,
    "ema": ema,
    "opt": opt.state_dict(),
    "args": argparse.Namespace(lr=1e-4, model="SiT-XL/2", cfg_prob=0.1, betas=[0.9, 0.999], flag=True, nothing=None),
    "steps": 1234,
    "again": sd,  # memoized when empty, then filled: a reader must see the filled dict here
}
torch.save(ck, os.path.join(d, "reg.pt"))
torch.save(ck, os.path.join(d, "reg-p4.pt"), pickle_protocol=4)
torch.save(ck, os.path.join(d, "reg-p5.pt"), pickle_protocol=5)
# The format of torch < 1.6 (pytorch-fid's Inception weights are in it).
torch.save(ck, os.path.join(d, "reg-legacy.pt"), _use_new_zipfile_serialization=False)
bare = {"x_embedder.proj.weight": nn.Parameter(torch.randn(8, 4, 2, 2)), "module.y": torch.arange(4)}
torch.save(bare, os.path.join(d, "bare.pt"))

def expect(m):
    out = {}
    for k, v in m.items():
        while k.startswith(("module.", "_orig_mod.")):
            k = k.split(".", 1)[1]
        out[k] = [list(v.shape), str(v.dtype), [struct.unpack("<q", struct.pack("<d", x))[0] for x in v.detach().flatten().double().tolist()]]
    return out

json.dump({"model": expect(sd), "ema": expect(ema), "bare": expect(bare)}, open(os.path.join(d, "expected.json"), "w"))
"#;

/// The folder of the files SCRIPT writes (`reg.pt`, `reg-p4.pt`, `reg-p5.pt`, `reg-legacy.pt`, `bare.pt`) and
/// their expected tensors (`expected.json`: `model`, `ema`, `bare`). Made once per test binary (Python with
/// torch takes seconds to start) in a folder of its own that each run overwrites; tests write their outputs
/// into their own temporary folders.
pub fn fixtures() -> &'static (PathBuf, serde_json::Value) {
    static FIXTURES: OnceLock<(PathBuf, serde_json::Value)> = OnceLock::new();
    FIXTURES.get_or_init(|| {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(concat!("torch-saves-", env!("CARGO_CRATE_NAME")));
        std::fs::create_dir_all(&dir).unwrap();
        python(SCRIPT, &dir);
        let expected = serde_json::from_slice(&std::fs::read(dir.join("expected.json")).unwrap()).unwrap();
        (dir, expected)
    })
}
