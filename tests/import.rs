//! `reg-ddp import` against files written by PyTorch itself: REG checkpoints come out exactly, and hostile,
//! truncated or corrupt files are refused with one line (exit 2) without running anything.

mod common;

use common::assert_bad_input;

use reg::formats::{torchfile, weights};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use tch::{Kind, Tensor};

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_reg-ddp"));
    for v in ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "SLURM_NTASKS"] {
        c.env_remove(v);
    }
    c
}

fn python(script: &str, dir: &Path) {
    let py = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
    let out = Command::new(&py).arg("-c").arg(script).arg(dir).output().expect("run .venv python (./launch/setup.sh installs it)");
    assert!(out.status.success(), "fixture script failed: {}", String::from_utf8_lossy(&out.stderr));
}

/// What a torch.save reader meets beyond REG's own checkpoints (tests/reg_interop.rs reads one written by REG's
/// train.py): views sharing storage, every dtype, prefixes, memoized dicts, pickle protocols 2, 4 and 5, the legacy
/// format, a bare state dict; and the expected values of every tensor as JSON.
const FIXTURES: &str = r#"
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

fn kind_name(k: Kind) -> &'static str {
    match k {
        Kind::Float => "torch.float32",
        Kind::Double => "torch.float64",
        Kind::Half => "torch.float16",
        Kind::BFloat16 => "torch.bfloat16",
        Kind::Int64 => "torch.int64",
        Kind::Bool => "torch.bool",
        _ => "other",
    }
}

/// The written file holds exactly the expected tensors: names, shapes, dtypes and every value bit for bit.
fn assert_same(written: &Path, expected: &serde_json::Value) {
    let got: HashMap<String, Tensor> = weights::read_map(written).unwrap();
    let want = expected.as_object().unwrap();
    let mut names: Vec<&String> = got.keys().collect();
    names.sort();
    let mut want_names: Vec<&String> = want.keys().collect();
    want_names.sort();
    assert_eq!(names, want_names);
    for (name, w) in want {
        let t = &got[name];
        let shape: Vec<i64> = w[0].as_array().unwrap().iter().map(|d| d.as_i64().unwrap()).collect();
        assert_eq!(t.size(), shape, "{name}");
        assert_eq!(kind_name(t.kind()), w[1].as_str().unwrap(), "{name}");
        // Python wrote the bits of each value as a float64, so the comparison is exact.
        let values: Vec<f64> = Vec::try_from(t.to_kind(Kind::Double).flatten(0, -1)).unwrap();
        let want_values: Vec<f64> = w[2].as_array().unwrap().iter().map(|x| f64::from_bits(x.as_i64().unwrap() as u64)).collect();
        assert_eq!(values.len(), want_values.len(), "{name}");
        for (i, (a, b)) in values.iter().zip(&want_values).enumerate() {
            assert_eq!(a.to_bits(), b.to_bits(), "{name}[{i}]: {a} vs {b}");
        }
    }
}

fn import(file: &Path, out: &Path, key: Option<&str>) -> Output {
    let mut c = bin();
    c.arg("import").arg(file).arg("--out").arg(out);
    if let Some(k) = key {
        c.args(["--key", k]);
    }
    c.output().unwrap()
}

/// Exit code 2, and stderr is exactly one line containing every `needle`.
/// The fixtures, made once per test run (Python with torch takes seconds to start) in a folder that each run
/// overwrites. Tests write their outputs into their own temporary folders.
fn fixtures() -> &'static (PathBuf, serde_json::Value) {
    static FIXTURES_DIR: OnceLock<(PathBuf, serde_json::Value)> = OnceLock::new();
    FIXTURES_DIR.get_or_init(|| {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("import-fixtures");
        std::fs::create_dir_all(&dir).unwrap();
        python(FIXTURES, &dir);
        let expected = serde_json::from_slice(&std::fs::read(dir.join("expected.json")).unwrap()).unwrap();
        (dir, expected)
    })
}

#[test]
fn torch_save_variants_import_exactly() {
    let (src, expected) = fixtures();
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    for file in ["reg.pt", "reg-p4.pt", "reg-p5.pt", "reg-legacy.pt"] {
        let out = d.join(format!("{file}.model.safetensors"));
        let run = import(&src.join(file), &out, None);
        let err = String::from_utf8_lossy(&run.stderr);
        assert!(run.status.success(), "{file}: {err}");
        assert!(err.contains("step 1234") && err.lines().count() == 1, "{err}");
        assert_same(&out, &expected["model"]);

        let out = d.join(format!("{file}.ema.safetensors"));
        assert!(import(&src.join(file), &out, Some("ema")).status.success(), "{file}");
        assert_same(&out, &expected["ema"]);
    }
    let out = d.join("again.safetensors");
    assert!(import(&src.join("reg.pt"), &out, Some("again")).status.success());
    assert_same(&out, &expected["model"]);

    let out = d.join("bare.safetensors");
    let run = import(&src.join("bare.pt"), &out, None);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    assert_same(&out, &expected["bare"]);

    // The rest of the checkpoint comes through as plain data.
    let root = torchfile::read(&src.join("reg.pt")).unwrap();
    assert!(matches!(root.get("steps"), Some(torchfile::Value::Int(1234))));
    let args = root.get("args").unwrap();
    assert!(matches!(args, torchfile::Value::Record { class, .. } if class == "argparse.Namespace"));
    assert!(matches!(args.get("model"), Some(torchfile::Value::Str(s)) if s == "SiT-XL/2"));
    assert!(matches!(args.get("lr"), Some(torchfile::Value::Float(x)) if *x == 1e-4));
    assert!(matches!(args.get("flag"), Some(torchfile::Value::Bool(true))));
    assert!(matches!(args.get("nothing"), Some(torchfile::Value::None)));
    assert!(matches!(args.get("betas"), Some(torchfile::Value::List(b)) if b.len() == 2));
    let state = root.get("opt").and_then(|o| o.get("state")).unwrap();
    assert!(matches!(state, torchfile::Value::Dict(s) if !s.is_empty()));
}

#[test]
fn missing_or_wrong_key_names_it() {
    let (src, _) = fixtures();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("x.safetensors");
    assert_bad_input(&import(&src.join("reg.pt"), &out, Some("nothere")), &["reg.pt", "nothere", "model, ema"]);
    assert_bad_input(&import(&src.join("reg.pt"), &out, Some("opt")), &["reg.pt", "'opt'", "not a name -> tensor mapping"]);
    assert_bad_input(&import(&src.join("reg.pt"), &out, Some("steps")), &["reg.pt", "'steps'", "int"]);
    assert_bad_input(&import(&src.join("bare.pt"), &out, Some("ema")), &["bare.pt", "'ema'"]);
    assert_bad_input(&import(&tmp.path().join("missing.pt"), &out, None), &["missing.pt", "cannot open"]);
    assert!(!out.exists());
}

#[test]
fn code_in_the_pickle_is_refused_not_run() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let script = r#"
import os, sys, builtins, torch
d = sys.argv[1]
marker = os.path.join(d, "MARKER")
class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > " + marker,))
class Eval:
    def __reduce__(self):
        return (builtins.eval, ("open(%r, 'w').write('pwned')" % marker,))
torch.save({"model": {"w": torch.zeros(2)}, "x": Evil()}, os.path.join(d, "system.pt"))
torch.save({"model": Evil()}, os.path.join(d, "system-p4.pt"), pickle_protocol=4)
torch.save({"model": Eval()}, os.path.join(d, "eval.pt"))
torch.save({"model": {"w": torch.zeros(2)}, "x": Evil()}, os.path.join(d, "legacy.pt"), _use_new_zipfile_serialization=False)
"#;
    python(script, d);
    let out = d.join("x.safetensors");
    for (file, global) in [("system.pt", "system"), ("system-p4.pt", "system"), ("eval.pt", "eval"), ("legacy.pt", "system")] {
        assert_bad_input(&import(&d.join(file), &out, None), &[file, "refuses to load global", global]);
        assert!(!d.join("MARKER").exists(), "{file} ran code");
    }
    assert!(!out.exists());
}

/// A legacy-format file cut short anywhere in its storages, or with a foreign magic number, is an input error.
#[test]
fn damaged_legacy_files_are_input_errors() {
    let (src, _) = fixtures();
    let tmp = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(src.join("reg-legacy.pt")).unwrap();
    let out = tmp.path().join("x.safetensors");
    for cut in [bytes.len() - 1, bytes.len() - 200, bytes.len() / 2, 40] {
        let f = tmp.path().join(format!("cut{cut}.pt"));
        std::fs::write(&f, &bytes[..cut]).unwrap();
        let name = f.file_name().unwrap().to_str().unwrap().to_string();
        assert_bad_input(&import(&f, &out, None), &[&name]);
    }
    let mut foreign = bytes.clone();
    foreign[5] ^= 0xFF;
    let f = tmp.path().join("foreign.pt");
    std::fs::write(&f, &foreign).unwrap();
    assert_bad_input(&import(&f, &out, None), &["foreign.pt", "not a torch.save checkpoint"]);
    assert!(!out.exists());
}

#[test]
fn archives_rewritten_by_other_zip_writers() {
    let (src, expected) = fixtures();
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    std::fs::copy(src.join("reg.pt"), d.join("reg.pt")).unwrap();
    // Python's zipfile rewrites the archive: stored as is, stored with the view w1 (size 2x4) grown to 9x4 past
    // the end of its storage, and deflated.
    let script = r#"
import os, sys, zipfile
d = sys.argv[1]
def rewrite(name, method, patch=lambda n, b: b):
    with zipfile.ZipFile(os.path.join(d, "reg.pt")) as src, zipfile.ZipFile(os.path.join(d, name), "w", method) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, patch(info.filename, src.read(info.filename)))
def grow(name, b):
    if name.endswith("data.pkl"):
        assert b.count(b"QK\x04K\x02K\x04\x86") == 1
        b = b.replace(b"QK\x04K\x02K\x04\x86", b"QK\x04K\x09K\x04\x86")
    return b
rewrite("stored.pt", zipfile.ZIP_STORED)
rewrite("past.pt", zipfile.ZIP_STORED, grow)
rewrite("deflated.pt", zipfile.ZIP_DEFLATED)
"#;
    python(script, d);
    let out = d.join("x.safetensors");
    assert!(import(&d.join("stored.pt"), &out, None).status.success());
    assert_same(&out, &expected["model"]);
    std::fs::remove_file(&out).unwrap();
    assert_bad_input(&import(&d.join("past.pt"), &out, None), &["past.pt", "runs past its storage of 24 elements"]);
    assert_bad_input(&import(&d.join("deflated.pt"), &out, None), &["deflated.pt", "compressed"]);
    assert!(!out.exists());
}

#[test]
fn truncated_files_exit_2_with_one_line() {
    let (src, _) = fixtures();
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let bytes = std::fs::read(src.join("reg.pt")).unwrap();
    let n = bytes.len();
    let cut = d.join("cut.pt");
    // Through the binary at a few points: the header, the pickle, the tensor data, the directory.
    for len in [0, 3, 40, 300, n / 3, n / 2, n - 100, n - 22, n - 1] {
        std::fs::write(&cut, &bytes[..len]).unwrap();
        assert_bad_input(&import(&cut, &d.join("x.safetensors"), None), &["cut.pt"]);
    }
    // In process at every length: always an input error, never a panic.
    for len in 0..n {
        std::fs::write(&cut, &bytes[..len]).unwrap();
        let e = torchfile::read(&cut).and_then(|v| torchfile::state_dict(&cut, &v, None)).err();
        let e = e.unwrap_or_else(|| panic!("a file cut at {len} of {n} bytes was read"));
        assert!(reg::error::is_input_error(&e), "cut at {len}: {e:#}");
        assert!(format!("{e:#}").contains("cut.pt"), "cut at {len}: {e:#}");
    }
}

#[test]
fn corrupt_bytes_never_panic() {
    let (src, _) = fixtures();
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    for file in ["reg.pt", "reg-legacy.pt"] {
        mutate(&src.join(file), d);
    }
}

fn mutate(file: &Path, d: &Path) {
    let bytes = std::fs::read(file).unwrap();
    let bad = d.join("bad.pt");
    let mut seed = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let (mut refused, mut read) = (0, 0);
    for i in 0..3000 {
        let mut b = bytes.clone();
        // Most mutations go to the pickle near the start; the rest anywhere (tensor data, zip directory,
        // legacy storage headers).
        for _ in 0..1 + next() % 3 {
            let pos = if i % 2 == 0 { (next() % 4096) as usize % b.len() } else { (next() % b.len() as u64) as usize };
            b[pos] = next() as u8;
        }
        std::fs::write(&bad, &b).unwrap();
        let result = torchfile::read(&bad).and_then(|v| {
            torchfile::state_dict(&bad, &v, Some("model"))?;
            torchfile::state_dict(&bad, &v, Some("ema"))
        });
        match result {
            Ok(_) => read += 1,
            Err(e) => {
                assert!(reg::error::is_input_error(&e), "mutation {i}: {e:#}");
                assert!(!format!("{e:#}").contains('\n'), "mutation {i}: {e:#}");
                refused += 1;
            }
        }
    }
    assert!(refused > 100 && read > 100, "{}: refused {refused}, read {read}", file.display());
}
