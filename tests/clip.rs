//! CLIP reproduces transformers' `CLIPModel` towers, pooling and projections and its `CLIPTokenizer`
//! on the tiny model in tests/data/clip_tiny (goldens from tools/golden/clip.py), and rejects broken folders with input errors.

mod common;

use common::{assert_rel, copy_model_folder, golden, rel};

use reg::encoders::clip::{Clip, Towers};
use reg::encoders::clip_tokenizer::ClipTokenizer;
use reg::error::is_input_error;
use reg::formats::weights;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

/// Relative error bound for f32 against the float64 reference, as for DINOv2.
const TOL: f64 = 1e-4;

fn data() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data")
}

fn model_dir() -> PathBuf {
    data().join("clip_tiny")
}

/// transformers' outputs on the tiny model (tests/data).
const GOLDEN: &str = "clip_tiny_golden.safetensors";

/// A copy of the tiny model folder that a test may break.
fn copy_model() -> tempfile::TempDir {
    copy_model_folder(&model_dir())
}

fn edit_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let cfg = dir.join("config.json");
    let mut j: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cfg).unwrap()).unwrap();
    edit(&mut j);
    std::fs::write(&cfg, serde_json::to_string(&j).unwrap()).unwrap();
}

fn load_err(dir: &Path) -> anyhow::Error {
    match Clip::load(dir, Device::Cpu, Towers::All) {
        Ok(_) => panic!("loading {} should fail", dir.display()),
        Err(e) => e,
    }
}

fn check_model(device: Device, tol: f64) {
    let g = golden(GOLDEN);
    let clip = Clip::load(&model_dir(), device, Towers::All).unwrap();
    let ids = &g["in.input_ids"];
    let t = clip.encode_text(ids, Kind::Float).unwrap();
    assert_rel("text last_hidden_state", &t.last_hidden_state, &g["out.text_last_hidden"], tol);
    assert_rel("text pooled (first end token)", &t.pooled, &g["out.text_pooled"], tol);
    assert_rel("text_embeds", &clip.text_embeds(ids, Kind::Float).unwrap(), &g["out.text_embeds"], tol);
    let px = &g["in.pixel_values"];
    let v = clip.encode_image(px, Kind::Float).unwrap();
    assert_rel("vision last_hidden_state", &v.last_hidden_state, &g["out.vision_last_hidden"], tol);
    assert_rel("vision pooled", &v.pooled, &g["out.vision_pooled"], tol);
    assert_rel("image_embeds", &clip.image_embeds(px, Kind::Float).unwrap(), &g["out.image_embeds"], tol);
    assert!((clip.logit_scale.unwrap() - 2.6592).abs() < 1e-6);
}

#[test]
fn clip_model_matches_transformers_f32() {
    check_model(Device::Cpu, TOL);
}

/// Configs from before transformers PR #24773 (openai's) say eos_token_id 2 and pool at the
/// largest id; row 3 of the input has no end token, where the two rules disagree.
#[test]
fn legacy_eos_token_id_pools_at_the_largest_id() {
    let g = golden(GOLDEN);
    let dir = copy_model();
    edit_config(dir.path(), |j| j["text_config"]["eos_token_id"] = 2.into());
    let clip = Clip::load(dir.path(), Device::Cpu, Towers::Text).unwrap();
    let pooled = clip.encode_text(&g["in.input_ids"], Kind::Float).unwrap().pooled;
    assert_rel("legacy pooled", &pooled, &g["out.text_pooled_legacy"], TOL);
    assert!(rel(&g["out.text_pooled_legacy"].get(3), &g["out.text_pooled"].get(3)) > 0.1, "row 3 should tell the rules apart");
}

#[test]
fn bf16_text_is_finite_and_close() {
    let g = golden(GOLDEN);
    let clip = Clip::load(&model_dir(), Device::Cpu, Towers::Text).unwrap();
    let t = clip.encode_text(&g["in.input_ids"], Kind::BFloat16).unwrap();
    assert_eq!(t.last_hidden_state.kind(), Kind::Float);
    assert!(t.last_hidden_state.isfinite().all().int64_value(&[]) == 1);
    assert_rel("text last_hidden_state bf16", &t.last_hidden_state, &g["out.text_last_hidden"], 5e-2);
}

/// A text-only folder as transformers 5 writes a `CLIPTextModel` (no `text_model.` prefix)
/// and as published text encoders are (with it); the config is transformers' own, kept in
/// the golden's metadata. Loading only the text tower of a `CLIPModel` leaves the rest.
#[test]
fn text_only_folders_load_with_and_without_prefix() {
    let g = golden(GOLDEN);
    let bytes = std::fs::read(data().join("clip_tiny_golden.safetensors")).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let config = meta.metadata().as_ref().unwrap()["text_model.config"].clone();
    let all = weights::read(&model_dir().join("model.safetensors")).unwrap();
    let ids = &g["in.input_ids"];
    for strip in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("config.json"), &config).unwrap();
        let tensors: Vec<(String, Tensor)> = all
            .iter()
            .filter_map(|(n, t)| n.strip_prefix("text_model.").map(|s| (if strip { s.to_string() } else { n.clone() }, t.shallow_clone())))
            .collect();
        weights::write(&dir.path().join("model.safetensors"), &tensors, None).unwrap();
        let clip = Clip::load(dir.path(), Device::Cpu, Towers::All).unwrap();
        assert!(clip.vision.is_none() && clip.text_projection.is_none());
        let t = clip.encode_text(ids, Kind::Float).unwrap();
        assert_rel("text-only last_hidden_state", &t.last_hidden_state, &g["out.text_last_hidden"], TOL);
        assert_rel("text-only pooled", &t.pooled, &g["out.text_pooled"], TOL);
        assert!(clip.text_embeds(ids, Kind::Float).is_err(), "a CLIPTextModel has no projection");
    }
    let clip = Clip::load(&model_dir(), Device::Cpu, Towers::Text).unwrap();
    assert!(clip.vision.is_none() && clip.visual_projection.is_none());
    assert_rel("text tower alone: text_embeds", &clip.text_embeds(ids, Kind::Float).unwrap(), &g["out.text_embeds"], TOL);
    assert!(clip.image_embeds(&g["in.pixel_values"], Kind::Float).is_err());
}

#[test]
fn bad_model_inputs_are_refused() {
    let clip = Clip::load(&model_dir(), Device::Cpu, Towers::All).unwrap();
    let too_long = Tensor::zeros([1, 78], (Kind::Int64, Device::Cpu));
    assert!(clip.encode_text(&too_long, Kind::Float).is_err());
    let out_of_vocab = Tensor::from_slice(&[0i64, 2014]).reshape([1, 2]);
    let msg = clip.encode_text(&out_of_vocab, Kind::Float).err().unwrap().to_string();
    assert!(msg.contains("[0, 2014)"), "{msg}");
    let wrong_size = Tensor::zeros([1, 3, 64, 64], (Kind::Float, Device::Cpu));
    assert!(clip.encode_image(&wrong_size, Kind::Float).is_err());
}

/// On a GPU: same golden, f32.
#[test]
#[ignore = "needs a CUDA device: cargo test --release --test clip -- --ignored on a GPU machine"]
fn clip_model_matches_transformers_cuda() {
    assert!(tch::Cuda::is_available(), "no CUDA device");
    // cuDNN may run the f32 patch convolution in TF32, as for DINOv2.
    check_model(Device::Cuda(0), 5e-3);
}

/// A change to config.json.
type Edit = fn(&mut serde_json::Value);

#[test]
fn broken_config_is_an_input_error() {
    let cases: [(&str, Edit); 6] = [
        ("text_config.num_attention_heads", |j| j["text_config"]["num_attention_heads"] = "two".into()),
        ("text_config.num_attention_heads", |j| j["text_config"]["num_attention_heads"] = 5.into()),
        ("vision_config.hidden_act", |j| j["vision_config"]["hidden_act"] = "tanh".into()),
        ("vision_config.image_size", |j| j["vision_config"]["image_size"] = 36.into()),
        ("text_config.eos_token_id", |j| j["text_config"]["eos_token_id"] = serde_json::json!([2, 3])),
        ("model_type", |j| j["model_type"] = "dinov2".into()),
    ];
    for (field, edit) in cases {
        let dir = copy_model();
        edit_config(dir.path(), edit);
        let e = load_err(dir.path());
        let msg = e.to_string();
        assert!(is_input_error(&e), "{msg}");
        assert!(msg.contains("config.json") && msg.contains(&format!("field {field}")), "{msg}");
        assert!(!msg.contains('\n'), "one line: {msg}");
    }
    // A size the weights do not have: the tensor is named.
    let dir = copy_model();
    edit_config(dir.path(), |j| j["text_config"]["intermediate_size"] = 65.into());
    let msg = load_err(dir.path()).to_string();
    assert!(msg.contains("text_model.encoder.layers.0.mlp.fc1.weight") && msg.contains("shape"), "{msg}");
    // Fewer layers than the file holds: the leftovers are refused, not ignored.
    let dir = copy_model();
    edit_config(dir.path(), |j| j["vision_config"]["num_hidden_layers"] = 1.into());
    let msg = load_err(dir.path()).to_string();
    assert!(msg.contains("vision_model.encoder.layers.1.") && msg.contains("not part of"), "{msg}");

    let dir = copy_model();
    std::fs::write(dir.path().join("config.json"), "{ not json").unwrap();
    let e = load_err(dir.path());
    assert!(is_input_error(&e) && e.to_string().contains("config.json"), "{e}");
}

#[test]
fn missing_or_misshaped_tensor_is_an_input_error() {
    let src = weights::read(&model_dir().join("model.safetensors")).unwrap();
    let cases: [(&str, bool); 5] = [
        ("text_model.encoder.layers.1.self_attn.v_proj.bias", false),
        ("text_model.embeddings.token_embedding.weight", true),
        ("vision_model.pre_layrnorm.weight", false),
        ("vision_model.embeddings.class_embedding", false),
        ("text_projection.weight", false),
    ];
    for (name, reshape) in cases {
        let dir = copy_model();
        let tensors: Vec<(String, Tensor)> = src
            .iter()
            .filter(|(n, _)| reshape || n != name)
            .map(|(n, t)| (n.clone(), if n == name { t.narrow(0, 0, 17) } else { t.shallow_clone() }))
            .collect();
        weights::write(&dir.path().join("model.safetensors"), &tensors, None).unwrap();
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

// ---- tokenizer ----

struct Case {
    text: String,
    ids: Vec<i64>,
    padded: Vec<i64>,
}

fn token_cases() -> Vec<Case> {
    let j: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(data().join("clip_tiny_tokens.json")).unwrap()).unwrap();
    assert_eq!(j["max_length"], 77);
    let ids = |v: &serde_json::Value| v.as_array().unwrap().iter().map(|x| x.as_i64().unwrap()).collect::<Vec<_>>();
    j["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| Case { text: c["text"].as_str().unwrap().to_string(), ids: ids(&c["ids"]), padded: ids(&c["padded"]) })
        .collect()
}

fn check_tokenizer(tok: &ClipTokenizer, what: &str) {
    let cases = token_cases();
    assert!(cases.len() >= 300);
    let mut long = 0;
    for c in &cases {
        assert_eq!(tok.encode(&c.text).unwrap(), c.ids, "{what}: ids of {:?}", c.text);
        assert_eq!(tok.encode_padded(&c.text).unwrap(), c.padded, "{what}: padded ids of {:?}", c.text);
        long += usize::from(c.ids.len() > 77);
    }
    assert!(long > 0, "no case longer than 77 tokens");
    println!("{what}: {} strings equal ({long} truncated)", cases.len());
}

#[test]
fn tokenizer_json_matches_transformers() {
    check_tokenizer(&ClipTokenizer::load(&model_dir()).unwrap(), "tokenizer.json");
}

/// Stable Diffusion's tokenizer folders have only vocab.json + merges.txt.
#[test]
fn vocab_and_merges_match_transformers() {
    let dir = tempfile::tempdir().unwrap();
    for f in ["vocab.json", "merges.txt", "tokenizer_config.json"] {
        std::fs::copy(model_dir().join(f), dir.path().join(f)).unwrap();
    }
    check_tokenizer(&ClipTokenizer::load(dir.path()).unwrap(), "vocab.json + merges.txt");
}

#[test]
fn truncation_and_padding_follow_clip() {
    let tok = ClipTokenizer::load(&model_dir()).unwrap();
    let (bos, eos): (i64, i64) = (2012, 2013);
    assert_eq!(tok.max_length(), 77);
    assert_eq!(tok.pad_id(), eos, "openai's pad token is <|endoftext|>");
    let empty = tok.encode_padded("").unwrap();
    assert_eq!(empty.len(), 77);
    assert_eq!(&empty[..2], &[bos, eos]);
    assert!(empty[2..].iter().all(|&i| i == eos));
    // 100 one-token words: 75 kept between the start and end tokens.
    let long = tok.encode_padded(&"a ".repeat(100)).unwrap();
    assert_eq!(long.len(), 77);
    assert_eq!((long[0], long[76]), (bos, eos));
    assert!(long[1..76].iter().all(|&i| i == 320));
    let batch = tok.batch(&["a photo of a cat", ""]).unwrap();
    assert_eq!(batch.size(), [2, 77]);
    assert_eq!(batch.kind(), Kind::Int64);
    assert_eq!(Vec::<i64>::try_from(batch.get(1)).unwrap(), empty);

    // A pad token set in tokenizer_config.json (open_clip-derived folders pad with "!").
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(model_dir().join("tokenizer.json"), dir.path().join("tokenizer.json")).unwrap();
    std::fs::write(dir.path().join("tokenizer_config.json"), r#"{"pad_token": {"content": "!"}, "model_max_length": 8}"#).unwrap();
    let tok = ClipTokenizer::load(dir.path()).unwrap();
    assert_eq!(tok.encode_padded("a").unwrap(), [bos, 320, eos, 0, 0, 0, 0, 0]);
    assert_eq!(tok.encode_padded(&"a ".repeat(10)).unwrap(), [bos, 320, 320, 320, 320, 320, 320, eos]);
}

#[test]
fn broken_tokenizer_folder_is_an_input_error() {
    let check = |files: &[(&str, &str)], needle: &str| {
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in files {
            std::fs::write(dir.path().join(name), text).unwrap();
        }
        let e = ClipTokenizer::load(dir.path()).err().expect("should fail");
        let msg = e.to_string();
        assert!(is_input_error(&e), "{msg}");
        assert!(msg.contains(needle) && !msg.contains('\n'), "{msg}");
    };
    let json = std::fs::read_to_string(model_dir().join("tokenizer.json")).unwrap();
    check(&[], "vocab.json: missing");
    check(&[("tokenizer.json", "{ not json")], "tokenizer.json");
    check(&[("tokenizer.json", &json), ("tokenizer_config.json", r#"{"pad_token": "<|pad|>"}"#)], "field pad_token");
    check(&[("tokenizer.json", &json), ("tokenizer_config.json", r#"{"pad_token": 3}"#)], "field pad_token");
    check(&[("tokenizer.json", &json), ("tokenizer_config.json", r#"{"model_max_length": 1}"#)], "field model_max_length");
    check(&[("tokenizer.json", &json), ("tokenizer_config.json", "[1]")], "tokenizer_config.json");
    check(&[("vocab.json", r#"{"a": 0}"#), ("merges.txt", "#version: 0.2\na b\n")], "vocab.json");
}

/// transformers saves a tokenizer made without a length with `model_max_length` 1e30 (its
/// "no limit"); the length is then the text tower's positions, as a folder transformers
/// wrote shows (tools/golden/clip_unlimited.py: 16 positions).
#[test]
fn a_tokenizer_without_a_limit_takes_the_text_towers_positions() {
    let dir = common::repo().join("tests/data/clip_unlimited");
    let config = std::fs::read_to_string(dir.join("tokenizer_config.json")).unwrap();
    assert!(config.contains("\"model_max_length\": 1000000000000000019884624838656"), "{config}");
    let tok = ClipTokenizer::load(&dir).unwrap();
    let want: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    assert_eq!(tok.max_length() as u64, want["max_length"].as_u64().unwrap());
    assert_eq!(tok.max_length(), 16);
    for case in want["cases"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let ids: Vec<i64> = case["padded"].as_array().unwrap().iter().map(|v| v.as_i64().unwrap()).collect();
        assert_eq!(tok.encode_padded(text).unwrap(), ids, "{text:?}");
    }
    // Without config.json beside it: CLIP's 77.
    let alone = tempfile::tempdir().unwrap();
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(dir.join(f), alone.path().join(f)).unwrap();
    }
    assert_eq!(ClipTokenizer::load(alone.path()).unwrap().max_length(), 77);
}
