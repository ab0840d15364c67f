//! The VAE reproduces diffusers' AutoencoderKL on the tiny random model in
//! tests/data/vae_tiny (made by tools/golden/vae.py), and bad folders are input errors.

mod common;

use common::{golden, rel};
use reg::encoders::vae::Vae;
use reg::error::is_input_error;
use reg::formats::weights;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

/// f32 on CPU must match diffusers this closely (max |a - b| / max |b|).
const TOL_F32: f64 = 1e-4;
/// bf16 only has to stay near the f32 answer.
const TOL_BF16: f64 = 5e-2;

fn model_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/vae_tiny")
}

/// diffusers' outputs on the tiny model (tests/data).
const GOLDEN: &str = "vae_tiny_golden.safetensors";

fn load() -> Vae {
    Vae::load(&model_dir(), Device::Cpu).unwrap()
}

/// A copy of the tiny model folder in a temporary directory, with config.json and the
/// weights passed through the given edits.
fn edited_copy(
    edit_config: impl FnOnce(&mut serde_json::Value),
    edit_weights: impl FnOnce(&mut Vec<(String, Tensor)>),
) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(model_dir().join("config.json")).unwrap()).unwrap();
    edit_config(&mut cfg);
    std::fs::write(dir.path().join("config.json"), serde_json::to_string_pretty(&cfg).unwrap()).unwrap();
    let mut w = weights::read(&model_dir().join("diffusion_pytorch_model.safetensors")).unwrap();
    edit_weights(&mut w);
    weights::write(&dir.path().join("diffusion_pytorch_model.safetensors"), &w, None).unwrap();
    dir
}

/// The error of loading `dir`, which must be an input error.
fn load_error(dir: &Path) -> String {
    let e = Vae::load(dir, Device::Cpu).err().expect("loading must fail");
    eprintln!("{e:#}");
    assert!(is_input_error(&e), "not an input error: {e:#}");
    format!("{e:#}")
}

#[test]
fn config_fields_are_read() {
    let vae = load();
    assert_eq!(vae.latent_channels(), 4);
    assert!((vae.scaling_factor() - 0.18215).abs() < 1e-12);
}

#[test]
fn encode_matches_diffusers_f32() {
    let g = golden(GOLDEN);
    let m = load().encode_moments(&g["in.pixels"], Kind::Float);
    assert_eq!(m.kind(), Kind::Float);
    assert_eq!(m.size(), g["out.moments"].size());
    let r = rel(&m, &g["out.moments"]);
    eprintln!("f32 moments rel {r:e}");
    assert!(r < TOL_F32, "moments rel {r:e}");
}

#[test]
fn decode_raw_matches_diffusers_f32() {
    let g = golden(GOLDEN);
    let d = load().decode_raw(&g["in.latents"], Kind::Float);
    assert_eq!(d.kind(), Kind::Float);
    assert_eq!(d.size(), g["out.decoded"].size());
    let r = rel(&d, &g["out.decoded"]);
    eprintln!("f32 decoded rel {r:e}");
    assert!(r < TOL_F32, "decoded rel {r:e}");
}

#[test]
fn decode_scales_and_quantises() {
    let g = golden(GOLDEN);
    let vae = load();
    let px = vae.decode(&(&g["in.latents"] * vae.scaling_factor()), Kind::Float);
    assert_eq!(px.kind(), Kind::Uint8);
    assert_eq!(px.size(), g["out.decoded"].size());
    let want = ((&g["out.decoded"] + 1.0) / 2.0).clamp(0.0, 1.0) * 255.0;
    let want = want.round();
    let diff = (px.to_kind(Kind::Float) - &want).abs().max().double_value(&[]);
    assert!(diff <= 1.0, "decoded pixels differ by {diff} grey levels");
    // The golden output leaves [-1, 1] on both sides, so the clamp was exercised.
    let (lo, hi) = (px.min().int64_value(&[]), px.max().int64_value(&[]));
    assert_eq!((lo, hi), (0, 255));
}

#[test]
fn bf16_is_finite_and_close() {
    let g = golden(GOLDEN);
    let vae = load();
    let m = vae.encode_moments(&g["in.pixels"], Kind::BFloat16);
    assert_eq!(m.kind(), Kind::Float);
    assert!(m.isfinite().all().int64_value(&[]) == 1, "bf16 moments not finite");
    let r = rel(&m, &g["out.moments"]);
    eprintln!("bf16 moments rel {r:e}");
    assert!(r < TOL_BF16, "bf16 moments rel {r:e}");
    let d = vae.decode_raw(&g["in.latents"], Kind::BFloat16);
    assert_eq!(d.kind(), Kind::Float);
    assert!(d.isfinite().all().int64_value(&[]) == 1, "bf16 decode not finite");
    let r = rel(&d, &g["out.decoded"]);
    eprintln!("bf16 decoded rel {r:e}");
    assert!(r < TOL_BF16, "bf16 decoded rel {r:e}");
}

#[test]
fn legacy_attention_names_load_the_same() {
    let g = golden(GOLDEN);
    // Older checkpoints (sd-vae-ft-ema) name the mid-block attention query/key/value/proj_attn.
    let dir = edited_copy(
        |_| {},
        |w| {
            for (name, _) in w.iter_mut() {
                for (new, old) in [(".to_q.", ".query."), (".to_k.", ".key."), (".to_v.", ".value."), (".to_out.0.", ".proj_attn.")] {
                    *name = name.replace(new, old);
                }
            }
            assert!(w.iter().any(|(n, _)| n == "encoder.mid_block.attentions.0.proj_attn.weight"));
        },
    );
    let vae = Vae::load(dir.path(), Device::Cpu).unwrap();
    let r = rel(&vae.decode_raw(&g["in.latents"], Kind::Float), &g["out.decoded"]);
    assert!(r < TOL_F32, "decoded rel {r:e}");
    let r = rel(&vae.encode_moments(&g["in.pixels"], Kind::Float), &g["out.moments"]);
    assert!(r < TOL_F32, "moments rel {r:e}");
}

#[test]
fn model_safetensors_is_accepted() {
    let dir = edited_copy(|_| {}, |_| {});
    let p = dir.path();
    std::fs::rename(p.join("diffusion_pytorch_model.safetensors"), p.join("model.safetensors")).unwrap();
    Vae::load(p, Device::Cpu).unwrap();
}

#[test]
fn broken_config_field_is_an_input_error() {
    let dir = edited_copy(|c| c["norm_num_groups"] = serde_json::json!("eight"), |_| {});
    let msg = load_error(dir.path());
    assert!(msg.contains("config.json") && msg.contains("norm_num_groups"), "{msg}");

    let dir = edited_copy(|c| c["block_out_channels"] = serde_json::json!([8, 16, -1, 16]), |_| {});
    let msg = load_error(dir.path());
    assert!(msg.contains("config.json") && msg.contains("block_out_channels"), "{msg}");

    let dir = edited_copy(|c| c["up_block_types"] = serde_json::json!(["UpDecoderBlock2D"]), |_| {});
    let msg = load_error(dir.path());
    assert!(msg.contains("config.json") && msg.contains("up_block_types"), "{msg}");

    let dir = edited_copy(|_| {}, |_| {});
    std::fs::write(dir.path().join("config.json"), "{ not json").unwrap();
    let msg = load_error(dir.path());
    assert!(msg.contains("config.json"), "{msg}");
}

#[test]
fn missing_tensor_is_an_input_error() {
    let gone = "decoder.mid_block.attentions.0.to_q.weight";
    let dir = edited_copy(|_| {}, |w| w.retain(|(n, _)| n != gone));
    let msg = load_error(dir.path());
    assert!(msg.contains("diffusion_pytorch_model.safetensors") && msg.contains(gone), "{msg}");
}

#[test]
fn misshaped_tensor_is_an_input_error() {
    let bad = "encoder.conv_in.weight";
    let dir = edited_copy(
        |_| {},
        |w| {
            let t = w.iter_mut().find(|(n, _)| n == bad).unwrap();
            t.1 = Tensor::zeros([8, 3, 5, 5], (Kind::Float, Device::Cpu));
        },
    );
    let msg = load_error(dir.path());
    assert!(msg.contains("diffusion_pytorch_model.safetensors") && msg.contains(bad) && msg.contains("shape"), "{msg}");
}

#[test]
fn config_that_disagrees_with_the_weights_is_an_input_error() {
    // Fewer layers than stored: the extra resnets must not be silently ignored.
    let dir = edited_copy(|c| c["mid_block_add_attention"] = serde_json::json!(false), |_| {});
    let msg = load_error(dir.path());
    assert!(msg.contains("diffusion_pytorch_model.safetensors") && msg.contains("attentions.0"), "{msg}");
}

#[test]
fn missing_folder_is_an_input_error() {
    let dir = tempfile::tempdir().unwrap();
    let msg = load_error(&dir.path().join("nope"));
    assert!(msg.contains("config.json"), "{msg}");
}

/// On a GPU (when there is one) the same numbers come out; TF32 convolutions and
/// other kernels allow a looser bound than the CPU's.
#[test]
#[ignore = "needs a CUDA device: cargo test --release --test vae -- --ignored on a GPU machine"]
fn cuda_matches_when_available() {
    assert!(tch::Cuda::is_available(), "no CUDA device");
    let g = golden(GOLDEN);
    let vae = Vae::load(&model_dir(), Device::Cuda(0)).unwrap();
    let m = vae.encode_moments(&g["in.pixels"].to_device(Device::Cuda(0)), Kind::Float);
    assert_eq!(m.device(), Device::Cuda(0));
    let r = rel(&m.to_device(Device::Cpu), &g["out.moments"]);
    assert!(r < 1e-2, "cuda moments rel {r:e}");
    let d = vae.decode_raw(&g["in.latents"].to_device(Device::Cuda(0)), Kind::Float);
    let r = rel(&d.to_device(Device::Cpu), &g["out.decoded"]);
    assert!(r < 1e-2, "cuda decoded rel {r:e}");
    // bf16 kernels differ from the CPU's: twice the CPU bound.
    let d = vae.decode_raw(&g["in.latents"].to_device(Device::Cuda(0)), Kind::BFloat16);
    let r = rel(&d.to_device(Device::Cpu), &g["out.decoded"]);
    assert!(r < 2.0 * TOL_BF16, "cuda bf16 decoded rel {r:e}");
}
