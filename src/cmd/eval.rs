//! `reg-ddp eval`: FID, sFID, Inception Score, precision and recall of generated images
//! against an ADM reference batch or a folder of real images, with the FID Inception-v3,
//! and CLIP score against captions, on GPU or CPU, split over ranks under mpirun.

use anyhow::Result;
use reg::bail_input;
use reg::dist::{Collectives, Launch};
use reg::encoders::clip::{Clip, Towers};
use reg::encoders::clip_image::ClipImageProcessor;
use reg::encoders::clip_tokenizer::ClipTokenizer;
use reg::encoders::inception::Inception;
use reg::eval::clip_score::{clip_score, read_captions};
use reg::eval::features::{features_of, ImageSet};
use reg::eval::precision_recall;
use reg::eval::reference::{Reference, Scores};
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Generated images: a folder of PNGs or an `.npz` with `arr_0` [N, H, W, 3] u8.
    #[arg(long)]
    pub samples: PathBuf,
    /// FID reference: an ADM reference batch (`VIRTUAL_imagenet256_labeled.npz`: images
    /// `arr_0` and/or `mu`, `sigma`, `mu_s`, `sigma_s`), or a folder of real JPEG/PNG
    /// images (e.g. COCO val2014), ADM-center-cropped to the samples' size. Its statistics
    /// are cached beside it. Needs --inception.
    #[arg(long = "ref", requires = "inception")]
    pub reference: Option<PathBuf>,
    /// FID Inception weights (pytorch-fid's, converted: `reg-ddp import
    /// pt_inception-2015-12-05-6726825d.pth --out inception.safetensors`).
    #[arg(long, requires = "reference")]
    pub inception: Option<PathBuf>,
    /// CLIP folder (transformers `CLIPModel`: config.json, model.safetensors, tokenizer,
    /// optional preprocessor_config.json, e.g. openai/clip-vit-large-patch14): computes
    /// the CLIP score of the samples against their captions.
    #[arg(long)]
    pub clip: Option<PathBuf>,
    /// Captions: a JSON array of strings, caption i for image i (PNGs in name order).
    /// Default: `captions.json` in the samples folder, as `reg-ddp sample` writes it.
    #[arg(long, requires = "clip")]
    pub captions: Option<PathBuf>,
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
    if a.reference.is_none() && a.clip.is_none() {
        bail_input!("nothing to compute: give --ref and --inception (FID) and/or --clip (CLIP score)");
    }
    // The samples' header and the captions are cheap to check; the networks are not.
    let samples = ImageSet::open(&a.samples)?;
    let n = samples.len();
    let captions = match &a.clip {
        None => None,
        Some(_) => {
            let path = match &a.captions {
                Some(p) => p.clone(),
                None if a.samples.is_dir() => a.samples.join("captions.json"),
                None => bail_input!("{}: --captions: required for samples in an .npz", a.samples.display()),
            };
            let c = read_captions(&path)?;
            if c.len() as i64 != n {
                bail_input!("{}: {} captions for {n} images in {}", path.display(), c.len(), a.samples.display());
            }
            Some((path, c))
        }
    };
    // Features travel between ranks through host memory: MPI on the CPU suffices.
    let Launch { device, comm } = Launch::start(&a.device, Collectives::OnHost)?;
    let root = comm.rank() == 0;
    let mut result = serde_json::json!({ "samples": a.samples.display().to_string(), "images": n });
    let mut table = vec!["| metric | value |".to_string(), "| --- | --- |".to_string()];

    if let (Some(rpath), Some(ipath)) = (&a.reference, &a.inception) {
        let net = Inception::load(ipath, device)?;
        let reference = if rpath.is_dir() {
            let (h, w) = samples.size()?;
            if h != w {
                bail_input!("{}: samples of {h}x{w} pixels: a reference folder is center-cropped to square images", a.samples.display());
            }
            Reference::load_folder(rpath, h as u32, &net, ipath, a.batch, comm.as_ref())?
        } else {
            Reference::load(rpath, &net, ipath, a.batch, comm.as_ref())?
        };
        let started = std::time::Instant::now();
        let out = features_of(&samples, &net, a.batch, comm.as_ref())?;
        let secs = started.elapsed().as_secs_f64();
        if let Some(reference) = reference {
            let Scores { fid, sfid, inception_score: is, inception_score_std: is_std } = reference.scores(&out);
            // k = 3 nearest neighbours need at least 4 images on each side.
            let enough = |t: &tch::Tensor| t.size()[0] > 3;
            let pr = reference.pool.as_ref().filter(|r| enough(r) && enough(&out.pool)).map(|r| precision_recall(r, &out.pool, 3));
            eprintln!(
                "reg-ddp eval: Inception features of {n} images in {secs:.1} s ({:.0} images/s over {} ranks)",
                n as f64 / secs,
                comm.world()
            );
            let more = serde_json::json!({
                "reference": rpath.display().to_string(), "feature_seconds": secs,
                "fid": fid, "sfid": sfid, "inception_score": is, "inception_score_std": is_std,
                "precision": pr.map(|p| p.0), "recall": pr.map(|p| p.1),
            });
            result.as_object_mut().expect("an object").extend(more.as_object().expect("an object").clone());
            table.push(format!("| FID | {fid:.4} |\n| sFID | {sfid:.4} |\n| Inception Score | {is:.3} +- {is_std:.3} |"));
            table.push(match pr {
                Some((p, r)) => format!("| precision | {p:.4} |\n| recall | {r:.4} |"),
                None if reference.pool.is_none() => "| precision / recall | (the reference has no images) |".to_string(),
                None => "| precision / recall | (needs at least 4 images on each side) |".to_string(),
            });
        }
    }

    if let (Some(dir), Some((cpath, captions))) = (&a.clip, &captions) {
        let clip = Clip::load(dir, device, Towers::All)?;
        let (Some(vision), Some(_), Some(_)) = (&clip.config.vision, &clip.visual_projection, &clip.text_projection) else {
            bail_input!("{}: CLIP score needs a CLIPModel folder (both towers and their projections)", dir.display());
        };
        let processor = ClipImageProcessor::load(dir, vision.image_size)?;
        let tokenizer = ClipTokenizer::load(dir)?;
        let started = std::time::Instant::now();
        let score = clip_score(&clip, &processor, &tokenizer, &samples, captions, a.batch, comm.as_ref())?;
        eprintln!("reg-ddp eval: CLIP score of {n} images in {:.1} s", started.elapsed().as_secs_f64());
        let more = serde_json::json!({
            "clip": dir.display().to_string(), "captions": cpath.display().to_string(), "clip_score": score,
        });
        result.as_object_mut().expect("an object").extend(more.as_object().expect("an object").clone());
        table.push(format!("| CLIP score | {score:.4} |"));
    }

    if !root {
        return Ok(());
    }
    println!("{}", table.join("\n"));
    let out = a.out.unwrap_or_else(|| a.samples.with_extension("eval.json"));
    std::fs::write(&out, serde_json::to_string_pretty(&result)?)?;
    eprintln!("reg-ddp eval: wrote {}", out.display());
    Ok(())
}
