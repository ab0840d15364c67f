//! CLIP image preprocessing and CLIP score against transformers (goldens from tools/golden/clip_image.py),
//! `reg-ddp eval --clip` end to end, and FID against a folder of real images with its cache.

mod common;

use common::{bin, make_weights, ok, repo};
use reg::encoders::clip::{Clip, Towers};
use reg::encoders::clip_image::{ClipImageProcessor, ResizeTo};
use reg::encoders::clip_tokenizer::ClipTokenizer;
use reg::eval::clip_score::{clip_score, pair_scores};
use reg::eval::features::ImageSet;
use reg::eval::reference::folder_cache_path;
use reg::formats::pillow_resample::center_crop_adm;
use reg::formats::weights;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Output;
use tch::{Device, Kind, Tensor};

fn data() -> PathBuf {
    repo().join("tests/data")
}

fn clip_dir() -> PathBuf {
    data().join("clip_tiny")
}

/// transformers' pixel values, image embeddings and CLIP scores of clip_tiny (tests/data); its metadata holds
/// the captions.
const GOLDEN: &str = "clip_image_golden.safetensors";

fn golden_with_metadata() -> (HashMap<String, Tensor>, HashMap<String, String>) {
    let bytes = std::fs::read(data().join(GOLDEN)).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    (common::golden(GOLDEN), meta.metadata().clone().unwrap())
}

fn captions() -> Vec<String> {
    serde_json::from_str(&golden_with_metadata().1["captions"]).unwrap()
}

/// The golden's test images, in name order (the order of the golden's rows).
fn images() -> Vec<image::RgbImage> {
    let ImageSet::Pngs(paths) = ImageSet::open(&data().join("clip_image")).unwrap() else { panic!("a PNG folder") };
    assert_eq!(paths.len(), 5);
    paths.iter().map(|p| image::open(p).unwrap().to_rgb8()).collect()
}

fn max_abs(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    (a - b).abs().max().double_value(&[])
}

/// The resized and cropped pixels are Pillow's exactly; the floats after the rescale and
/// normalisation are numpy's f32 arithmetic, done in the same order, so they agree to the
/// last bit or so (bound 1e-6, far below one grey level, 0.0146 after the normalisation).
#[test]
fn preprocessing_matches_transformers() {
    let (g, meta) = golden_with_metadata();
    let imgs = images();
    let p224 = ClipImageProcessor::openai(224);
    for (i, img) in imgs.iter().enumerate() {
        let ours = p224.crop(img).unwrap();
        let want = g["crop224.u8"].get(i as i64);
        let ours = Tensor::from_slice(ours.as_raw()).view([224, 224, 3]);
        let diff = (ours.to_kind(Kind::Int) - want.to_kind(Kind::Int)).abs().max().int64_value(&[]);
        assert_eq!(diff, 0, "image {i} ({}x{}): resized+cropped pixels differ from Pillow's by {diff}", img.width(), img.height());
    }
    // No preprocessor_config.json in the tiny folder: OpenAI's at the vision image_size.
    let p32 = ClipImageProcessor::load(&clip_dir(), 32).unwrap();
    assert_eq!(p32, ClipImageProcessor::openai(32));
    let d32 = max_abs(&p32.batch(&imgs).unwrap(), &g["px32.pixel_values"]);
    // A preprocessor_config.json as transformers writes it: own mean/std, size 64, crop 56.
    let p56 = ClipImageProcessor::parse(&meta["px56.config"], "preprocessor_config.json", 224).unwrap();
    assert_eq!((p56.size, p56.crop_size), (ResizeTo::ShortestEdge(64), (56, 56)));
    assert_eq!((p56.image_mean, p56.image_std), ([0.5, 0.25, 0.75], [0.2, 0.3, 0.4]));
    let d56 = max_abs(&p56.batch(&imgs).unwrap(), &g["px56.pixel_values"]);
    println!(
        "pixel_values max |diff| vs transformers' PIL processor: 32 px {d32:e}, 56 px {d56:e}; \
         transformers' torchvision processor is {} from it at 224",
        meta["torchvision_max_abs_diff"]
    );
    assert!(d32 <= 1e-6 && d56 <= 1e-6, "32 px {d32}, 56 px {d56}");
}

#[test]
fn bad_preprocessor_configs_are_input_errors() {
    for (json, field) in [
        (r#"{"resample": 2}"#, "field resample"),
        (r#"{"do_center_crop": false}"#, "field do_center_crop"),
        (r#"{"crop_size": {"height": 0, "width": 3}}"#, "field crop_size.height"),
        (r#"{"size": "big"}"#, "field size"),
        (r#"{"image_mean": [0.5, 0.5]}"#, "field image_mean"),
        (r#"{"image_std": [0.5, 0, 0.5]}"#, "field image_std"),
        (r#"{"size": {"shortest_edge": 224, "longest_edge": 300}}"#, "field size.longest_edge"),
        ("[1]", "expected a JSON object"),
    ] {
        let e = ClipImageProcessor::parse(json, "preprocessor_config.json", 224).expect_err(json);
        let msg = e.to_string();
        assert!(reg::error::is_input_error(&e), "{msg}");
        assert!(msg.contains("preprocessor_config.json") && msg.contains(field) && !msg.contains('\n'), "{json}: {msg}");
    }
}

/// f32 embeddings against the float64 golden: cosines to about 1e-6, scores (x100) to 1e-3.
const SCORE_TOL: f64 = 1e-3;

#[test]
fn clip_score_matches_transformers() {
    let (g, meta) = golden_with_metadata();
    let clip = Clip::load(&clip_dir(), Device::Cpu, Towers::All).unwrap();
    let tok = ClipTokenizer::load(&clip_dir()).unwrap();
    let p = ClipImageProcessor::load(&clip_dir(), 32).unwrap();
    let caps = captions();
    let img = clip.image_embeds(&p.batch(&images()).unwrap(), Kind::Float).unwrap();
    let refs: Vec<&str> = caps.iter().map(String::as_str).collect();
    let txt = clip.text_embeds(&tok.batch(&refs).unwrap(), Kind::Float).unwrap();
    common::assert_rel("image_embeds", &img, &g["image_embeds"], 1e-4);
    common::assert_rel("text_embeds", &txt, &g["text_embeds"], 1e-4);
    let d = max_abs(&pair_scores(&img, &txt), &g["scores"]);
    assert!(d <= SCORE_TOL, "per-pair scores differ by {d}");
    // Some cosines of the random model are negative: the per-pair clamp is what is checked.
    assert!(g["scores"].eq(0.0).any().int64_value(&[]) == 1);

    // The whole path, over images of different sizes, in batches that split them unevenly.
    let set = ImageSet::open(&data().join("clip_image")).unwrap();
    let want = g["clip_score"].double_value(&[]);
    for batch in [1, 2, 5] {
        let got = clip_score(&clip, &p, &tok, &set, &caps, batch, &reg::dist::SingleComm { device: Device::Cpu }).unwrap();
        println!("batch {batch}: CLIP score {got} (transformers {want}, torchmetrics-style {})", meta["torchmetrics_clip_score"]);
        assert!((got - want).abs() <= SCORE_TOL, "batch {batch}: {got} vs {want}");
    }
}

fn reg_ddp(args: &[&str], paths: &[(&str, &Path)]) -> Output {
    let mut c = bin();
    c.arg("eval").args(args).args(["--device", "cpu", "--threads", "2"]);
    for (flag, p) in paths {
        c.arg(flag).arg(p);
    }
    c.output().unwrap()
}

fn ok_json(o: &Output, out: &Path) -> serde_json::Value {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&std::fs::read(out).unwrap()).unwrap()
}

#[test]
fn eval_cli_scores_captions_and_refuses_a_mismatch() {
    let dir = tempfile::tempdir().unwrap();
    let samples = dir.path().join("samples");
    std::fs::create_dir(&samples).unwrap();
    for e in std::fs::read_dir(data().join("clip_image")).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, samples.join(p.file_name().unwrap())).unwrap();
    }
    let caps = captions();
    std::fs::write(samples.join("captions.json"), serde_json::to_string(&caps).unwrap()).unwrap();
    let want = golden_with_metadata().0["clip_score"].double_value(&[]);
    let out = dir.path().join("e.json");

    // captions.json in the samples folder, found without --captions; no FID asked.
    let o = reg_ddp(&["--batch", "2"], &[("--samples", &samples), ("--clip", &clip_dir()), ("--out", &out)]);
    let j = ok_json(&o, &out);
    let got = j["clip_score"].as_f64().unwrap();
    assert!((got - want).abs() <= SCORE_TOL, "{got} vs {want}");
    assert!(j.get("fid").is_none(), "{j}");
    assert!(String::from_utf8_lossy(&o.stdout).contains("| CLIP score |"), "{}", String::from_utf8_lossy(&o.stdout));

    // An explicit --captions file, reversed: another score.
    let rev = dir.path().join("rev.json");
    std::fs::write(&rev, serde_json::to_string(&caps.iter().rev().collect::<Vec<_>>()).unwrap()).unwrap();
    let o = reg_ddp(&[], &[("--samples", &samples), ("--clip", &clip_dir()), ("--captions", &rev), ("--out", &out)]);
    let other = ok_json(&o, &out)["clip_score"].as_f64().unwrap();
    assert!((other - want).abs() > 0.1, "reversed captions should score differently: {other} vs {want}");

    // Mismatched count, broken file, nothing asked: exit 2 with one line.
    std::fs::write(&rev, serde_json::to_string(&caps[..4]).unwrap()).unwrap();
    let o = reg_ddp(&[], &[("--samples", &samples), ("--clip", &clip_dir()), ("--captions", &rev)]);
    common::assert_bad_input(&o, &["rev.json", "4 captions for 5 images"]);
    std::fs::write(&rev, r#"{"0": "a cat"}"#).unwrap();
    let o = reg_ddp(&[], &[("--samples", &samples), ("--clip", &clip_dir()), ("--captions", &rev)]);
    common::assert_bad_input(&o, &["rev.json", "JSON array of strings"]);
    std::fs::remove_file(samples.join("captions.json")).unwrap();
    let o = reg_ddp(&[], &[("--samples", &samples), ("--clip", &clip_dir())]);
    common::assert_bad_input(&o, &["captions.json", "cannot read"]);
    let o = reg_ddp(&[], &[("--samples", &samples)]);
    common::assert_bad_input(&o, &["nothing to compute"]);
}

/// `--ref` a folder of real images (demo-images: one folder per class, sizes 80-140 px):
/// samples that are exactly the reference's ADM crops score FID ~ 0 and precision/recall 1;
/// a second run reads the cache; touching an image recomputes it.
#[test]
fn folder_reference_is_cropped_scored_and_cached() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let real = d.join("real");
    ok(bin().args(["demo-images", "--classes", "2", "--per-class", "4", "--out"]).arg(&real));
    let files = reg::eval::reference::list_images(&real).unwrap();
    assert_eq!(files.len(), 8);
    let samples = d.join("samples");
    std::fs::create_dir(&samples).unwrap();
    for (i, f) in files.iter().enumerate() {
        let img = reg::formats::pillow_decode::decode_rgb(&std::fs::read(f).unwrap()).unwrap();
        center_crop_adm(&img, 64).save(samples.join(format!("{i:03}.png"))).unwrap();
    }
    let w = d.join("inception.safetensors");
    weights::write(&w, &make_weights(), None).unwrap();
    let out = d.join("e.json");
    let run = || reg_ddp(&["--batch", "3"], &[("--samples", &samples), ("--ref", &real), ("--inception", &w), ("--out", &out)]);

    let j = ok_json(&run(), &out);
    assert!(j["fid"].as_f64().unwrap().abs() < 1e-3, "{j}");
    assert_eq!((j["precision"].as_f64(), j["recall"].as_f64()), (Some(1.0), Some(1.0)), "{j}");
    let cache = folder_cache_path(&real, 64).unwrap();
    assert_eq!(cache, d.canonicalize().unwrap().join("real.64.reg-ddp-stats.safetensors"));
    let written = std::fs::metadata(&cache).unwrap().modified().unwrap();

    let again = ok_json(&run(), &out);
    assert_eq!(again["fid"], j["fid"]);
    assert_eq!(std::fs::metadata(&cache).unwrap().modified().unwrap(), written, "the second run recomputed the statistics");

    // Touching one image changes the listing: the statistics are computed again.
    let later = std::time::SystemTime::now() + std::time::Duration::from_secs(5);
    std::fs::File::options().write(true).open(&files[3]).unwrap().set_modified(later).unwrap();
    let third = ok_json(&run(), &out);
    assert_ne!(std::fs::metadata(&cache).unwrap().modified().unwrap(), written, "touching an image did not invalidate the cache");
    assert!((third["fid"].as_f64().unwrap() - j["fid"].as_f64().unwrap()).abs() < 1e-9);

    // Another sample size is another crop, with its own cache; non-square samples are refused.
    let small = d.join("small");
    std::fs::create_dir(&small).unwrap();
    for i in 0..3 {
        image::RgbImage::from_pixel(32, 32, image::Rgb([i * 60, 10, 200])).save(small.join(format!("{i}.png"))).unwrap();
    }
    // Three samples: too few for 3-NN precision/recall, which are left out (null).
    let j = ok_json(&reg_ddp(&[], &[("--samples", &small), ("--ref", &real), ("--inception", &w), ("--out", &out)]), &out);
    assert!(j["fid"].as_f64().unwrap() > 1.0, "{j}");
    assert!(j["precision"].is_null() && j["recall"].is_null(), "{j}");
    assert!(folder_cache_path(&real, 32).unwrap().exists());
    image::RgbImage::new(32, 16).save(small.join("0.png")).unwrap();
    for i in 1..3 {
        image::RgbImage::new(32, 16).save(small.join(format!("{i}.png"))).unwrap();
    }
    let o = reg_ddp(&[], &[("--samples", &small), ("--ref", &real), ("--inception", &w)]);
    common::assert_bad_input(&o, &["16x32", "square"]);
    let empty = d.join("empty");
    std::fs::create_dir(&empty).unwrap();
    let o = reg_ddp(&[], &[("--samples", &samples), ("--ref", &empty), ("--inception", &w)]);
    common::assert_bad_input(&o, &["empty", "no JPEG or PNG images"]);
}
