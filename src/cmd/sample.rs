//! `reg-ddp sample`: generates N images (PNG per image, then an ADM-evaluator `.npz`),
//! split over MPI ranks by global index, resumable; a text model from prompts or from
//! evaluation captions (written beside the images as `captions.json`).

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use reg::bail_input;
use reg::config::Config;
use reg::diffusion::generate::{latents, to_images, Labels, SampleSpec};
use reg::diffusion::sampler::{Guidance, Sampler, SamplerMode};
use reg::dist::{Collectives, Launch};
use reg::encoders::decoder::Decoder;
use reg::encoders::text::TextEncoder;
use reg::formats::npy::NpzWriter;
use reg::formats::weights;
use reg::model::build_sit;
use reg::train::checkpoint;
use std::path::{Path, PathBuf};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Weights under the REG names (needs --config for the architecture).
    #[arg(long, conflicts_with = "ckpt", required_unless_present = "ckpt")]
    pub weights: Option<PathBuf>,
    /// A checkpoint folder (`.../step-NNNNNNN`); its manifest has the config.
    #[arg(long)]
    pub ckpt: Option<PathBuf>,
    /// With --ckpt: sample from the EMA weights.
    #[arg(long)]
    pub ema: bool,
    /// The run config (model section) for --weights.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// SD-VAE model folder (diffusers layout) to decode the latents, or `identity` /
    /// `identity:K` for a model trained on pixels (`prepare --vae identity`).
    #[arg(long)]
    pub vae: String,
    /// Images to generate (default: 50,000; with --prompts one per prompt; with
    /// --captions 30,000).
    #[arg(long)]
    pub num: Option<i64>,
    /// `sde` (the paper's sampler) or `ode`.
    #[arg(long, default_value = "sde")]
    pub mode: String,
    /// With --mode ode: Heun instead of Euler.
    #[arg(long)]
    pub heun: bool,
    #[arg(long, default_value_t = 250)]
    pub steps: i64,
    #[arg(long, default_value_t = 2.3)]
    pub cfg: f64,
    /// Guidance scale of the REG token (0: conditional drift only).
    #[arg(long = "cls-cfg", default_value_t = 2.3)]
    pub cls_cfg: f64,
    /// Guidance interval `low,high` in t.
    #[arg(long, default_value = "0,0.85")]
    pub interval: String,
    /// `random`, `balanced` or a comma-separated list of classes.
    #[arg(long, default_value = "random")]
    pub labels: String,
    /// A text model's prompts, one per line: image `i` draws prompt `i % count`.
    #[arg(long, conflicts_with = "captions")]
    pub prompts: Option<PathBuf>,
    /// A text model's evaluation captions: COCO's `captions_val2014.json` (or a JSON array
    /// of strings); `--num` of them are drawn without replacement, seeded by `--seed`
    /// (the U-ViT / REPA protocol: 30K captions of COCO val).
    #[arg(long)]
    pub captions: Option<PathBuf>,
    /// CLIP folder of a text model (default: the config's `data.text_encoder_path`).
    #[arg(long = "text-encoder")]
    pub text_encoder: Option<PathBuf>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, default_value_t = 64)]
    pub batch: usize,
    #[arg(long)]
    pub out: PathBuf,
    /// Also write `<out>.grid.png`: all the images, this many a row.
    #[arg(long, default_value_t = 0)]
    pub grid: u32,
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Compute precision of SiT and the VAE decoder: `fp32` by default, as REG's
    /// `generate.py` samples (no autocast); `bf16` or `auto` (bf16 on CUDA) for speed.
    #[arg(long, default_value = "fp32")]
    pub precision: reg::config::Precision,
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
}

fn png_name(g: u64) -> String {
    format!("{g:06}.png")
}

/// Writes the `n` PNGs of `dir` as `arr_0` `[N, H, W, 3]` u8 of an `.npz` (what the ADM evaluator reads).
fn write_npz(path: &Path, dir: &Path, n: u64, h: u32, w: u32) -> Result<()> {
    let mut z = NpzWriter::create(path, &[n, h as u64, w as u64, 3])?;
    for g in 0..n {
        let p = dir.join(png_name(g));
        let img = image::open(&p).with_context(|| format!("{}: cannot read", p.display()))?.to_rgb8();
        z.write(img.as_raw())?;
    }
    z.finish()
}

/// `--prompts`: the non-empty lines of a UTF-8 file.
fn read_prompts(path: &Path) -> Result<Vec<String>> {
    let bytes = std::fs::read(path).map_err(|e| reg::error::bad_input(format!("{}: cannot read: {e}", path.display())))?;
    let text = String::from_utf8(bytes).map_err(|e| reg::error::bad_input(format!("{}: not UTF-8 text ({e})", path.display())))?;
    let prompts: Vec<String> = text.lines().map(str::trim).filter(|l| !l.is_empty()).map(String::from).collect();
    if prompts.is_empty() {
        bail_input!("{}: no prompts (one per line)", path.display());
    }
    Ok(prompts)
}

/// `--captions`: `num` captions drawn without replacement by a `seed`ed shuffle, from
/// COCO's annotations (`annotations[].caption`) or a JSON array of strings.
fn draw_captions(path: &Path, num: i64, seed: u64) -> Result<Vec<String>> {
    #[derive(serde::Deserialize)]
    struct Annotation {
        caption: String,
    }
    #[derive(serde::Deserialize)]
    #[serde(untagged)]
    enum File {
        List(Vec<String>),
        Coco { annotations: Vec<Annotation> },
    }
    let file = path.display();
    let text = std::fs::read_to_string(path).map_err(|e| reg::error::bad_input(format!("{file}: cannot read: {e}")))?;
    let all: Vec<String> = match serde_json::from_str::<File>(&text) {
        Ok(File::List(v)) => v,
        Ok(File::Coco { annotations }) => annotations.into_iter().map(|a| a.caption).collect(),
        Err(_) => bail_input!("{file}: expected COCO captions (annotations[].caption) or a JSON array of strings"),
    };
    let all: Vec<String> = all.into_iter().map(|c| c.trim().to_string()).filter(|c| !c.is_empty()).collect();
    if (all.len() as i64) < num {
        bail_input!("{file}: {} captions, fewer than --num {num}", all.len());
    }
    let mut order: Vec<usize> = (0..all.len()).collect();
    let mut rng = reg::rng::SplitMix(reg::rng::step_seed(seed, 0, reg::rng::stream::EVAL_CAPTIONS) as u64);
    for i in (1..order.len()).rev() {
        order.swap(i, rng.below(i as u64 + 1) as usize);
    }
    Ok(order[..num as usize].iter().map(|&i| all[i].clone()).collect())
}

pub fn run(a: Args) -> Result<()> {
    super::set_threads(a.threads);
    let prompts = a.prompts.as_deref().map(read_prompts).transpose()?;
    let num = a.num.unwrap_or(match (&prompts, &a.captions) {
        (Some(p), _) => p.len() as i64,
        (None, Some(_)) => 30_000,
        _ => 50_000,
    });
    if num <= 0 {
        bail_input!("--num: must be positive, got {num}");
    }
    let captions = match (prompts, &a.captions) {
        (Some(p), _) => Some(p),
        (None, Some(path)) => Some(draw_captions(path, num, a.seed)?),
        _ => None,
    };
    let iv: Vec<f64> = a
        .interval
        .split(',')
        .map(|x| x.trim().parse::<f64>())
        .collect::<Result<_, _>>()
        .map_err(|_| reg::error::bad_input(format!("--interval: {:?} is not low,high", a.interval)))?;
    if iv.len() != 2 {
        bail_input!("--interval: {:?} must be low,high with 0 <= low < high <= 1", a.interval);
    }
    let mode = match a.mode.as_str() {
        "sde" => SamplerMode::Sde,
        "ode" => SamplerMode::Ode,
        m => bail_input!("--mode: {m:?} (sde or ode)"),
    };
    let sampler = Sampler {
        mode,
        heun: a.heun,
        steps: a.steps,
        guidance: Guidance { cfg: a.cfg, cls_cfg: a.cls_cfg, low: iv[0], high: iv[1], force_doubled: false },
    };
    sampler.check().map_err(|e| reg::error::bad_input(format!("--{e}")))?;
    // The model: from a checkpoint (its manifest has the config) or weights + config.
    let (cfg, named) = match (&a.ckpt, &a.weights) {
        (Some(dir), _) => {
            let m = checkpoint::verify(dir)?;
            let named = checkpoint::read_named(dir, &m, a.ema)?.into_iter().collect();
            (m.config, (named, dir.display().to_string()))
        }
        (None, Some(w)) => {
            let c = a.config.as_ref().ok_or_else(|| reg::error::bad_input("--config: needed with --weights (the model's architecture)"))?;
            (Config::load(c, &[])?, (weights::read_map(w)?, w.display().to_string()))
        }
        _ => unreachable!("clap requires one"),
    };
    let dims = cfg.dims();
    // Images travel through files; the ranks only meet at the end (MPI on the host).
    let Launch { device, comm } = Launch::start(&a.device, Collectives::OnHost)?;
    let (labels, text) = match (dims.text_dim > 0, captions) {
        (true, Some(c)) => {
            let dir =
                a.text_encoder.clone().or(cfg.data.text_encoder_path.as_ref().map(PathBuf::from)).ok_or_else(|| {
                    reg::error::bad_input("--text-encoder: needed (a CLIP folder; the config has no data.text_encoder_path)")
                })?;
            let enc = TextEncoder::load(&dir, device)?;
            if (enc.hidden_size(), enc.max_length()) != (dims.text_dim, dims.text_len) {
                bail_input!(
                    "{}: {} tokens of width {}, the model takes {} of width {}",
                    dir.display(),
                    enc.max_length(),
                    enc.hidden_size(),
                    dims.text_len,
                    dims.text_dim
                );
            }
            (Labels::Captions(c), Some(enc))
        }
        (true, None) => bail_input!("--prompts or --captions: needed (the model is conditioned on text)"),
        (false, Some(_)) => bail_input!("--prompts / --captions: the model is conditioned on classes (use --labels)"),
        (false, None) => (Labels::parse(&a.labels, dims.num_classes).map_err(|e| reg::error::bad_input(format!("--labels: {e}")))?, None),
    };
    let (model, params) = build_sit(&dims, device, 0)?;
    let (mut named, source) = named;
    // The position table is fixed: a weights file written without it still loads.
    named.entry("pos_embed".into()).or_insert_with(|| model.pos_embed.to_device(tch::Device::Cpu));
    params.load_into(&params.flat, &named, &source)?;
    let vae = Decoder::load(&a.vae, device)?;
    if vae.latent_channels() != dims.in_channels {
        bail_input!("--vae {}: latent_channels {} but the model has {} input channels", a.vae, vae.latent_channels(), dims.in_channels);
    }
    let kind = a.precision.kind_on(device);
    let spec = SampleSpec { sampler, param: cfg.loss.parameterization(), seed: a.seed, labels, kind };
    std::fs::create_dir_all(&a.out)?;
    let (rank, world) = (comm.rank(), comm.world());
    if let (Labels::Captions(c), 0) = (&spec.labels, rank) {
        // Caption `i` of `captions.json` is the one image `i` was asked for (`eval --clip`).
        let list: Vec<&str> = (0..num as usize).map(|g| c[g % c.len()].as_str()).collect();
        weights::write_atomic(&a.out.join("captions.json"), serde_json::to_string(&list)?.as_bytes())?;
    }
    // Image g belongs to rank g % world; finished PNGs are kept (resume).
    let todo: Vec<u64> =
        (0..num as u64).filter(|g| (*g % world as u64) as i64 == rank).filter(|g| !a.out.join(png_name(*g)).exists()).collect();
    if rank == 0 {
        eprintln!(
            "reg-ddp sample: {} images ({} to do on rank 0), {world} ranks on {device:?}, {} {} steps, cfg {} / token {}",
            num,
            todo.len(),
            a.mode,
            a.steps,
            a.cfg,
            a.cls_cfg
        );
    }
    let bar = if rank == 0 { ProgressBar::new(todo.len() as u64) } else { ProgressBar::hidden() };
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} images  {per_sec}  [{elapsed_precise} < {eta_precise}]")
            .expect("static template"),
    );
    let started = std::time::Instant::now();
    for chunk in todo.chunks(a.batch.max(1)) {
        let x = latents(&model, chunk, &spec, text.as_ref(), device)?;
        let imgs = to_images(&x, Some(&vae), kind);
        let (h, w) = (imgs.size()[1] as u32, imgs.size()[2] as u32);
        for (i, &g) in chunk.iter().enumerate() {
            let data = Vec::<u8>::try_from(imgs.get(i as i64).flatten(0, -1))?;
            let img = image::RgbImage::from_raw(w, h, data).expect("h x w x 3 bytes");
            // Written under a temporary name first: a killed run leaves no half PNG.
            let tmp = a.out.join(format!(".{}.tmp.png", png_name(g)));
            img.save(&tmp)?;
            std::fs::rename(&tmp, a.out.join(png_name(g)))?;
        }
        bar.inc(chunk.len() as u64);
    }
    bar.finish();
    let ips = todo.len() as f64 / started.elapsed().as_secs_f64();
    comm.barrier()?;
    if rank == 0 {
        let first = image::open(a.out.join(png_name(0)))?;
        let npz = a.out.with_extension("npz");
        write_npz(&npz, &a.out, num as u64, first.height(), first.width())?;
        eprintln!("reg-ddp sample: wrote {} ({num} images; {ips:.2} images/s on rank 0)", npz.display());
        if a.grid > 0 {
            let images: Vec<image::RgbImage> =
                (0..num as u64).map(|g| image::open(a.out.join(png_name(g))).map(|i| i.to_rgb8())).collect::<Result<_, _>>()?;
            let path = a.out.with_extension("grid.png");
            reg::diffusion::generate::save_grid(&images, a.grid, 4, &path)?;
            eprintln!("reg-ddp sample: wrote {} ({} a row, scaled 4x)", path.display(), a.grid);
        }
        println!("{}", serde_json::json!({"images": num, "images_per_s_rank0": ips, "npz": npz.display().to_string()}));
    }
    Ok(())
}
