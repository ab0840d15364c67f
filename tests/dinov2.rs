//! DINOv2 reproduces transformers' `Dinov2Model` with timm's position-table resampling on the
//! tiny model in tests/data/dinov2_tiny (goldens from tools/golden/dinov2.py), and rejects
//! broken folders with input errors.

mod common;

use common::{assert_rel, copy_model_folder, golden};

use reg::encoders::dinov2::Dinov2;
use reg::error::is_input_error;
use reg::formats::weights;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

const INPUT_SIZE: i64 = 56;

fn data() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data")
}

/// transformers' outputs on the tiny model (tests/data).
const GOLDEN: &str = "dinov2_tiny_golden.safetensors";

/// A copy of the tiny model folder that a test may break.
fn copy_model() -> tempfile::TempDir {
    copy_model_folder(&data().join("dinov2_tiny"))
}

fn load_err(dir: &Path) -> anyhow::Error {
    match Dinov2::load(dir, Device::Cpu, INPUT_SIZE) {
        Ok(_) => panic!("loading {} should fail", dir.display()),
        Err(e) => e,
    }
}

fn check_f32(device: Device, tol: f64) {
    let g = golden(GOLDEN);
    let model = Dinov2::load(&data().join("dinov2_tiny"), device, INPUT_SIZE).unwrap();
    assert_eq!(model.hidden_size(), 32);
    assert_eq!(model.num_tokens(), 17);
    let want = &g["out.features"];
    assert_rel("position table", &model.embeddings.position_embeddings, &g["pos_embed_resampled"], 1e-5);
    let out = model.forward_preprocessed(&g["in.preprocessed"], Kind::Float);
    assert_eq!(out.kind(), Kind::Float);
    assert_rel("forward_preprocessed", &out, want, tol);
    let out = model.features(&g["in.pixels"], Kind::Float);
    assert_rel("features", &out, want, tol);
}

#[test]
fn matches_transformers_f32() {
    check_f32(Device::Cpu, 1e-4);
}

#[test]
fn bf16_is_finite_and_close() {
    let g = golden(GOLDEN);
    let model = Dinov2::load(&data().join("dinov2_tiny"), Device::Cpu, INPUT_SIZE).unwrap();
    let out = model.features(&g["in.pixels"], Kind::BFloat16);
    assert_eq!(out.kind(), Kind::Float);
    assert!(out.isfinite().all().int64_value(&[]) == 1, "bf16 features are not finite");
    assert_rel("features bf16", &out, &g["out.features"], 5e-2);
}

/// The SwiGLU feed-forward of dinov2-giant (`mlp.weights_in` / `mlp.weights_out`), on a
/// one-layer model whose config is stored in the golden's metadata.
#[test]
fn swiglu_matches_transformers() {
    let path = data().join("dinov2_tiny_golden.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let config = meta.metadata().as_ref().unwrap()["swiglu.config"].clone();
    let g = golden(GOLDEN);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.json"), config).unwrap();
    let tensors: Vec<(String, Tensor)> = g
        .iter()
        .filter_map(|(k, v)| k.strip_prefix("swiglu.").map(|n| (n.to_string(), v.shallow_clone())))
        .filter(|(n, _)| n != "out.features")
        .collect();
    weights::write(&dir.path().join("model.safetensors"), &tensors, None).unwrap();
    let model = Dinov2::load(dir.path(), Device::Cpu, INPUT_SIZE).unwrap();
    let out = model.forward_preprocessed(&g["in.preprocessed"], Kind::Float);
    assert_rel("swiglu forward", &out, &g["swiglu.out.features"], 1e-4);
}

/// On a GPU: same golden, f32.
#[test]
#[ignore = "needs a CUDA device: cargo test --release --test dinov2 -- --ignored on a GPU machine"]
fn matches_transformers_cuda() {
    assert!(tch::Cuda::is_available(), "no CUDA device");
    // cuDNN may run the f32 patch convolution in TF32 (libtorch's default allows it),
    // so the bound is looser than on the CPU.
    check_f32(Device::Cuda(0), 5e-3);
}

/// A change to config.json.
type Edit = fn(&mut serde_json::Value);

#[test]
fn broken_config_is_an_input_error() {
    let cases: [(&str, Edit); 4] = [
        ("num_attention_heads", |j| j["num_attention_heads"] = "two".into()),
        ("hidden_size", |j| {
            j.as_object_mut().unwrap().remove("hidden_size");
        }),
        ("num_attention_heads", |j| j["num_attention_heads"] = 5.into()),
        ("hidden_act", |j| j["hidden_act"] = "tanh".into()),
    ];
    for (field, edit) in cases {
        let dir = copy_model();
        let cfg = dir.path().join("config.json");
        let mut j: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cfg).unwrap()).unwrap();
        edit(&mut j);
        std::fs::write(&cfg, serde_json::to_string(&j).unwrap()).unwrap();
        let e = load_err(dir.path());
        let msg = e.to_string();
        assert!(is_input_error(&e), "{msg}");
        assert!(msg.contains("config.json") && msg.contains(field), "{msg}");
        assert!(!msg.contains('\n'), "one line: {msg}");
    }

    let dir = copy_model();
    std::fs::write(dir.path().join("config.json"), "{ not json").unwrap();
    let e = load_err(dir.path());
    assert!(is_input_error(&e) && e.to_string().contains("config.json"), "{e}");

    // A grid the patch does not divide.
    let e = Dinov2::load(&data().join("dinov2_tiny"), Device::Cpu, 50).err().expect("input size 50 should fail");
    assert!(is_input_error(&e), "{e}");
}

#[test]
fn missing_or_misshaped_tensor_is_an_input_error() {
    let src = weights::read(&data().join("dinov2_tiny/model.safetensors")).unwrap();
    let cases: [(&str, bool); 3] =
        [("encoder.layer.1.mlp.fc2.weight", false), ("embeddings.position_embeddings", true), ("layernorm.bias", false)];
    for (name, reshape) in cases {
        let dir = copy_model();
        let tensors: Vec<(String, Tensor)> = src
            .iter()
            .filter(|(n, _)| reshape || n != name)
            .map(|(n, t)| {
                let t = if n == name { t.narrow(1, 0, 17) } else { t.shallow_clone() };
                (n.clone(), t)
            })
            .collect();
        let path = dir.path().join("model.safetensors");
        weights::write(&path, &tensors, None).unwrap();
        let e = load_err(dir.path());
        let msg = e.to_string();
        assert!(is_input_error(&e), "{msg}");
        assert!(msg.contains("model.safetensors") && msg.contains(name), "{msg}");
        if reshape {
            assert!(msg.contains("shape"), "{msg}");
        }
    }

    let dir = copy_model();
    std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
    let e = load_err(dir.path());
    assert!(is_input_error(&e) && e.to_string().contains("model.safetensors"), "{e}");
}

/// A `Dinov2WithRegistersModel` saved by transformers (tools/golden/dinov2_registers.py):
/// the registers sit between the class token and the patches, past the position table, and
/// the encoder gives REG the class token and the patches (registers dropped), to 1e-5.
#[test]
fn dinov2_with_registers_matches_transformers() {
    let g = golden("dinov2_reg_tiny_golden.safetensors");
    let dir = common::repo().join("tests/data/dinov2_reg_tiny");
    let model = Dinov2::load(&dir, Device::Cpu, 56).unwrap();
    assert_eq!(model.num_tokens(), 17, "class token + 16 patches");
    let got = model.forward_preprocessed(&g["in.preprocessed"], Kind::Float);
    assert_rel("registers: features", &got, &g["out.features"], 1e-5);
    // Without the registers the same weights give another answer: they are used, not skipped.
    let cfg = std::fs::read_to_string(dir.join("config.json")).unwrap();
    let plain = tempfile::tempdir().unwrap();
    std::fs::copy(dir.join("model.safetensors"), plain.path().join("model.safetensors")).unwrap();
    std::fs::write(plain.path().join("config.json"), cfg.replace("\"dinov2_with_registers\"", "\"dinov2\"")).unwrap();
    let without = Dinov2::load(plain.path(), Device::Cpu, 56).unwrap().forward_preprocessed(&g["in.preprocessed"], Kind::Float);
    assert!(common::rel(&without, &g["out.features"]) > 1e-3);
}

/// Another encoder's config is refused with one line naming its kind and the supported ones.
#[test]
fn an_unsupported_encoder_kind_is_named() {
    let dir = copy_model();
    let cfg = dir.path().join("config.json");
    let text = std::fs::read_to_string(&cfg).unwrap().replace("\"dinov2\"", "\"vit_mae\"");
    std::fs::write(&cfg, text).unwrap();
    let e = load_err(dir.path());
    let msg = e.to_string();
    assert!(is_input_error(&e) && !msg.contains('\n'), "{msg}");
    assert!(msg.contains("config.json") && msg.contains("vit_mae") && msg.contains("dinov2_with_registers"), "{msg}");
}
