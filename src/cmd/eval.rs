//! `reg-ddp eval`: FID, sFID, Inception Score, precision and recall of generated images
//! against an ADM reference batch, with the FID Inception-v3, on GPU or CPU.

use anyhow::Result;
use reg::bail_input;
use reg::data::npy::read_npz;
use reg::error::bad_input;
use reg::eval::{frechet_distance, inception_score, precision_recall, Stats};
use reg::model::inception::Inception;
use reg::model::weights;
use reg::train::resolve_device;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Generated images: a folder of PNGs or an `.npz` with `arr_0` [N, H, W, 3] u8.
    #[arg(long)]
    pub samples: PathBuf,
    /// ADM reference batch (`VIRTUAL_imagenet256_labeled.npz`: images `arr_0` and/or
    /// `mu`, `sigma`, `mu_s`, `sigma_s`). Its statistics are cached beside it.
    #[arg(long = "ref")]
    pub reference: PathBuf,
    /// FID Inception weights (pytorch-fid's, converted: `reg-ddp import
    /// pt_inception-2015-12-05-6726825d.pth --out inception.safetensors`).
    #[arg(long)]
    pub inception: PathBuf,
    #[arg(long, default_value_t = 250)]
    pub batch: i64,
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Where to write the JSON results (default: beside the samples).
    #[arg(long)]
    pub out: Option<PathBuf>,
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
}

/// Checks an image array: [N, H, W, 3] u8.
fn check_images(t: &Tensor, what: &str) -> Result<()> {
    let s = t.size();
    if t.kind() != Kind::Uint8 || s.len() != 4 || s[3] != 3 || s[0] == 0 {
        bail_input!("{what}: arr_0: expected non-empty [N, H, W, 3] uint8 images, got {:?} {:?}", t.kind(), s);
    }
    Ok(())
}

fn images_of(path: &Path) -> Result<Tensor> {
    let file = path.display().to_string();
    if path.is_dir() {
        let mut pngs: Vec<PathBuf> =
            std::fs::read_dir(path)?.flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|x| x == "png")).collect();
        pngs.sort();
        if pngs.is_empty() {
            bail_input!("{file}: no PNG images");
        }
        let imgs: Vec<Tensor> = pngs
            .iter()
            .map(|p| {
                let img = image::open(p).map_err(|e| bad_input(format!("{}: {e}", p.display())))?.to_rgb8();
                Ok(Tensor::from_slice(img.as_raw()).view([img.height() as i64, img.width() as i64, 3]))
            })
            .collect::<Result<_>>()?;
        let size = imgs[0].size();
        if let Some(i) = imgs.iter().position(|t| t.size() != size) {
            bail_input!("{}: size {:?} differs from the first image's {:?}", pngs[i].display(), imgs[i].size(), size);
        }
        return Ok(Tensor::stack(&imgs, 0));
    }
    let arrays: HashMap<String, Tensor> = read_npz(path)?.into_iter().collect();
    let a = arrays.get("arr_0").ok_or_else(|| bad_input(format!("{file}: arr_0: missing (an ADM sample batch holds its images there)")))?;
    check_images(a, &file)?;
    Ok(a.shallow_clone())
}

/// Pool features, spatial features and softmax outputs of all images, in batches.
fn features(net: &Inception, images: &Tensor, batch: i64, device: tch::Device) -> (Tensor, Tensor, Tensor) {
    let n = images.size()[0];
    let kind = Kind::Float;
    let (mut pool, mut spatial, mut probs) = (Vec::new(), Vec::new(), Vec::new());
    for lo in (0..n).step_by(batch as usize) {
        let x = images.narrow(0, lo, batch.min(n - lo)).to_device(device);
        let o = net.features(&x, kind);
        pool.push(o.pool.to_device(tch::Device::Cpu));
        spatial.push(o.spatial.to_device(tch::Device::Cpu));
        probs.push(o.probs.to_device(tch::Device::Cpu));
    }
    (Tensor::cat(&pool, 0), Tensor::cat(&spatial, 0), Tensor::cat(&probs, 0))
}

pub fn run(a: Args) -> Result<()> {
    super::set_threads(a.threads);
    if a.batch <= 0 {
        bail_input!("--batch: must be positive");
    }
    let device = resolve_device(&a.device)?;
    let net = Inception::load(&a.inception, device)?;
    let rfile = a.reference.display().to_string();
    // Reference: cached features/statistics, or computed from its images once.
    let cache = PathBuf::from(format!("{rfile}.reg-ddp-stats.safetensors"));
    let reference: HashMap<String, Tensor> = if cache.exists() {
        weights::read_map(&cache)?
    } else {
        let arrays: HashMap<String, Tensor> = read_npz(&a.reference)?.into_iter().collect();
        let mut r: HashMap<String, Tensor> = HashMap::new();
        if let Some(img) = arrays.get("arr_0") {
            check_images(img, &rfile)?;
            let (pool, spatial, _) = features(&net, img, a.batch, device);
            let (s, ss) = (Stats::of(&pool), Stats::of(&spatial));
            r.extend([("mu".into(), s.mu), ("sigma".into(), s.sigma), ("mu_s".into(), ss.mu), ("sigma_s".into(), ss.sigma)]);
            r.insert("pool".into(), pool);
        } else {
            for k in ["mu", "sigma", "mu_s", "sigma_s"] {
                let t = arrays.get(k).ok_or_else(|| bad_input(format!("{rfile}: {k}: missing (and no arr_0 images)")))?;
                r.insert(k.into(), t.to_kind(Kind::Double));
            }
        }
        let named: Vec<(String, Tensor)> = r.iter().map(|(k, v)| (k.clone(), v.shallow_clone())).collect();
        weights::write(&cache, &named, None)?;
        r
    };
    for (m, s, d) in [("mu", "sigma", 2048), ("mu_s", "sigma_s", 2023)] {
        let (mu, sigma) = (&reference[m], &reference[s]);
        if mu.size() != [d] || sigma.size() != [d, d] {
            bail_input!("{rfile}: {m}/{s}: dimensions {:?}/{:?}, the Inception features have {d}", mu.size(), sigma.size());
        }
    }
    let images = images_of(&a.samples)?;
    let (pool, spatial, probs) = features(&net, &images, a.batch, device);
    let stats = |m: &str, s: &str| Stats { mu: reference[m].to_kind(Kind::Double), sigma: reference[s].to_kind(Kind::Double) };
    let fid = frechet_distance(&Stats::of(&pool), &stats("mu", "sigma"));
    let sfid = frechet_distance(&Stats::of(&spatial), &stats("mu_s", "sigma_s"));
    let (is, is_std) = inception_score(&probs, 10);
    let pr = reference.get("pool").map(|r| precision_recall(r, &pool, 3));
    let result = serde_json::json!({
        "samples": a.samples.display().to_string(), "reference": rfile, "images": images.size()[0],
        "fid": fid, "sfid": sfid, "inception_score": is, "inception_score_std": is_std,
        "precision": pr.map(|p| p.0), "recall": pr.map(|p| p.1),
    });
    println!("| metric | value |\n| --- | --- |");
    println!("| FID | {fid:.4} |\n| sFID | {sfid:.4} |\n| Inception Score | {is:.3} +- {is_std:.3} |");
    match pr {
        Some((p, r)) => println!("| precision | {p:.4} |\n| recall | {r:.4} |"),
        None => println!("| precision / recall | (the reference has no images) |"),
    }
    let out = a.out.unwrap_or_else(|| a.samples.with_extension("eval.json"));
    std::fs::write(&out, serde_json::to_string_pretty(&result)?)?;
    eprintln!("reg-ddp eval: wrote {}", out.display());
    Ok(())
}
