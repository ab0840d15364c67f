//! `reg-ddp import` against files written by PyTorch itself: REG checkpoints come out exactly, and hostile,
//! truncated or corrupt files are refused with one line (exit 2) without running anything. (Random damage
//! anywhere in these files: tests/hostile_files.rs.)

mod common;

use common::torch_saves::fixtures;
use common::{assert_bad_input, bin, ok, python};

use reg::formats::{torchfile, weights};
use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use tch::{Kind, Tensor};

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

/// `reg-ddp import FILE --out OUT [--key KEY]`.
fn import(file: &Path, out: &Path, key: Option<&str>) -> Command {
    let mut c = bin();
    c.arg("import").arg(file).arg("--out").arg(out);
    if let Some(k) = key {
        c.args(["--key", k]);
    }
    c
}

#[test]
fn torch_save_variants_import_exactly() {
    let (src, expected) = fixtures();
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    for file in ["reg.pt", "reg-p4.pt", "reg-p5.pt", "reg-legacy.pt"] {
        let out = d.join(format!("{file}.model.safetensors"));
        let run = ok(&mut import(&src.join(file), &out, None));
        let err = String::from_utf8_lossy(&run.stderr);
        assert!(err.contains("step 1234") && err.lines().count() == 1, "{err}");
        assert_same(&out, &expected["model"]);

        let out = d.join(format!("{file}.ema.safetensors"));
        ok(&mut import(&src.join(file), &out, Some("ema")));
        assert_same(&out, &expected["ema"]);
    }
    let out = d.join("again.safetensors");
    ok(&mut import(&src.join("reg.pt"), &out, Some("again")));
    assert_same(&out, &expected["model"]);

    let out = d.join("bare.safetensors");
    ok(&mut import(&src.join("bare.pt"), &out, None));
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
    assert_bad_input(&import(&src.join("reg.pt"), &out, Some("nothere")).output().unwrap(), &["reg.pt", "nothere", "model, ema"]);
    assert_bad_input(
        &import(&src.join("reg.pt"), &out, Some("opt")).output().unwrap(),
        &["reg.pt", "'opt'", "not a name -> tensor mapping"],
    );
    assert_bad_input(&import(&src.join("reg.pt"), &out, Some("steps")).output().unwrap(), &["reg.pt", "'steps'", "int"]);
    assert_bad_input(&import(&src.join("bare.pt"), &out, Some("ema")).output().unwrap(), &["bare.pt", "'ema'"]);
    assert_bad_input(&import(&tmp.path().join("missing.pt"), &out, None).output().unwrap(), &["missing.pt", "cannot open"]);
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
        assert_bad_input(&import(&d.join(file), &out, None).output().unwrap(), &[file, "refuses to load global", global]);
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
        assert_bad_input(&import(&f, &out, None).output().unwrap(), &[&name]);
    }
    let mut foreign = bytes.clone();
    foreign[5] ^= 0xFF;
    let f = tmp.path().join("foreign.pt");
    std::fs::write(&f, &foreign).unwrap();
    assert_bad_input(&import(&f, &out, None).output().unwrap(), &["foreign.pt", "not a torch.save checkpoint"]);
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
    ok(&mut import(&d.join("stored.pt"), &out, None));
    assert_same(&out, &expected["model"]);
    std::fs::remove_file(&out).unwrap();
    assert_bad_input(&import(&d.join("past.pt"), &out, None).output().unwrap(), &["past.pt", "runs past its storage of 24 elements"]);
    assert_bad_input(&import(&d.join("deflated.pt"), &out, None).output().unwrap(), &["deflated.pt", "compressed"]);
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
        assert_bad_input(&import(&cut, &d.join("x.safetensors"), None).output().unwrap(), &["cut.pt"]);
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
