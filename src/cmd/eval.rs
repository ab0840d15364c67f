//! `reg-ddp eval`: FID, sFID, Inception Score, precision and recall of generated images
//! against an ADM reference batch, with the FID Inception-v3, on GPU or CPU, split over
//! ranks under mpirun.

use anyhow::Result;
use reg::bail_input;
use reg::dist::{Collectives, Launch};
use reg::encoders::inception::Inception;
use reg::eval::features::{features_of, ImageSet};
use reg::eval::precision_recall;
use reg::eval::reference::{Reference, Scores};
use std::path::PathBuf;

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

pub fn run(a: Args) -> Result<()> {
    super::set_threads(a.threads);
    if a.batch <= 0 {
        bail_input!("--batch: must be positive");
    }
    // Features travel between ranks through host memory: MPI on the CPU suffices.
    let Launch { device, comm } = Launch::start(&a.device, Collectives::OnHost)?;
    // The samples' header is cheap to check; the network is not.
    let samples = ImageSet::open(&a.samples)?;
    let net = Inception::load(&a.inception, device)?;
    let reference = Reference::load(&a.reference, &net, &a.inception, a.batch, comm.as_ref())?;
    let started = std::time::Instant::now();
    let out = features_of(&samples, &net, a.batch, comm.as_ref())?;
    let secs = started.elapsed().as_secs_f64();
    let Some(reference) = reference else { return Ok(()) };
    let rfile = a.reference.display().to_string();
    let Scores { fid, sfid, inception_score: is, inception_score_std: is_std } = reference.scores(&out);
    let pr = reference.pool.as_ref().map(|r| precision_recall(r, &out.pool, 3));
    let n = samples.len();
    eprintln!(
        "reg-ddp eval: Inception features of {n} images in {secs:.1} s ({:.0} images/s over {} ranks)",
        n as f64 / secs,
        comm.world()
    );
    let result = serde_json::json!({
        "samples": a.samples.display().to_string(), "reference": rfile, "images": n, "feature_seconds": secs,
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
