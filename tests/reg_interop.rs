//! Every claim of compatibility with the original REG code, checked against files that
//! code wrote or read (tests/data/reg_interop, made by tools/golden/reg_interop.py from
//! REG's own train.py, models/sit.py and evaluations/evaluator.py).

mod common;

use common::{bin, golden, ok, rel, repo};
use reg::config::Config;
use reg::formats::{torchfile, weights};
use reg::model::build_sit;
use std::collections::HashMap;
use tch::{Kind, Tensor};

fn data(name: &str) -> std::path::PathBuf {
    repo().join("tests/data/reg_interop").join(name)
}

#[test]
fn a_checkpoint_saved_by_reg_train_py_imports_exactly() {
    // REG's save call: model, ema, opt (a real AdamW state), args (its argparse.Namespace), steps.
    let expected = golden("reg_interop/reg_train_expected.safetensors");
    let tmp = tempfile::tempdir().unwrap();
    for key in ["model", "ema"] {
        let out = tmp.path().join(format!("{key}.safetensors"));
        ok(bin().arg("import").arg(data("reg_train.pt")).arg("--out").arg(&out).args(["--key", key]));
        let got = weights::read_map(&out).unwrap();
        let want: HashMap<&str, &Tensor> = expected.iter().filter_map(|(k, v)| Some((k.strip_prefix(&format!("{key}."))?, v))).collect();
        let mut names: Vec<&str> = got.keys().map(String::as_str).collect();
        names.sort();
        let mut want_names: Vec<&str> = want.keys().copied().collect();
        want_names.sort();
        assert_eq!(names, want_names, "{key}");
        for (name, t) in &got {
            assert!(t.kind() == want[name.as_str()].kind() && t.equal(want[name.as_str()]), "{key}: {name} differs");
        }
    }
    // The rest of the checkpoint comes through as data: REG's own args and step count.
    let root = torchfile::read(&data("reg_train.pt")).unwrap();
    assert!(matches!(root.get("steps"), Some(torchfile::Value::Int(2))));
    let args = root.get("args").unwrap();
    assert!(matches!(args, torchfile::Value::Record { class, .. } if class == "argparse.Namespace"));
    assert!(matches!(args.get("exp_name"), Some(torchfile::Value::Str(s)) if s == "tiny"));
    assert!(matches!(args.get("learning_rate"), Some(torchfile::Value::Float(x)) if *x == 1e-4));
    assert!(matches!(root.get("opt").and_then(|o| o.get("state")), Some(torchfile::Value::Dict(s)) if !s.is_empty()));
}

#[test]
fn our_export_loads_strictly_into_reg_sit_and_computes_the_same() {
    let tmp = tempfile::tempdir().unwrap();
    let exported = tmp.path().join("export.safetensors");
    ok(bin().current_dir(repo()).args(["export", "--ckpt", "tests/data/ckpt_v0/step-0000002", "--out"]).arg(&exported));
    // The names and shapes REG's load_state_dict(strict=True) accepted.
    let reg_names: HashMap<String, Vec<i64>> = serde_json::from_slice(&std::fs::read(data("reg_state_dict.json")).unwrap()).unwrap();
    let ours: HashMap<String, Vec<i64>> = weights::read(&exported).unwrap().into_iter().map(|(n, t)| (n, t.size())).collect();
    assert_eq!(ours, reg_names);
    // REG's forward of those weights, against ours (1e-5 relative, f32 on the CPU).
    let cfg = Config::load(&repo().join("configs/demo.yaml"), &[]).unwrap();
    let (model, params) = build_sit(&cfg.dims(), tch::Device::Cpu, 0).unwrap();
    params.load_file(&exported).unwrap();
    let g = golden("reg_interop/reg_export_forward.safetensors");
    let _ng = tch::no_grad_guard();
    let out = model.forward(&g["in.x"], &g["in.t"], &g["in.y"], &g["in.cls"], Kind::Float);
    for (name, a, b) in [("x", &out.x, &g["out.x"]), ("zs0", &out.zs, &g["out.zs0"]), ("cls", &out.cls, &g["out.cls"])] {
        let r = rel(a, b);
        assert!(r <= 1e-5, "out.{name}: relative difference {r:e}");
    }
}

#[test]
fn our_sample_npz_is_framed_as_reg_evaluator_read_it() {
    // REG's evaluator streamed arr_0 of an .npz made by these arguments; ours must carry
    // the same framing (zip and npy headers, layout) around the same shape of pixels.
    let seen: serde_json::Value = serde_json::from_slice(&std::fs::read(data("reg_npz_read.json")).unwrap()).unwrap();
    assert_eq!(seen["reader"], "StreamingNpzArrayReader");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("samples");
    // Its arguments name files relative to the repository.
    let args: Vec<&str> = seen["sample_args"].as_array().unwrap().iter().map(|a| a.as_str().unwrap()).collect();
    ok(bin().current_dir(repo()).args(&args).arg("--out").arg(&out));
    let raw = std::fs::read(out.with_extension("npz")).unwrap();
    let mut z = zip::ZipArchive::new(std::io::Cursor::new(&raw)).unwrap();
    let e = z.by_name("arr_0.npy").unwrap();
    assert_eq!(e.compression(), zip::CompressionMethod::Stored);
    let start = e.data_start() as usize;
    let npy = &raw[start..start + e.size() as usize];
    let header_len = 10 + u16::from_le_bytes([npy[8], npy[9]]) as usize;
    let header = String::from_utf8_lossy(&npy[..header_len]);
    let shape: Vec<String> = seen["shape"].as_array().unwrap().iter().map(|d| d.to_string()).collect();
    assert!(header.contains(&format!("'shape': ({})", shape.join(", "))) && header.contains("'|u1'"), "{header}");
    let pixels = start + header_len..start + npy.len();
    assert_eq!(pixels.len(), 5 * 64 * 64 * 3);
    let framing = [&raw[..pixels.start], &raw[pixels.end..]].concat();
    assert_eq!(weights::sha256_hex(&framing), seen["framing_sha256"].as_str().unwrap());
}
