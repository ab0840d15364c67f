//! `reg-ddp prepare`: an ImageNet-style tree (or REG/EDM2's preprocessed layout, or
//! captioned images: COCO's captions JSON or `.txt` sidecars) to a dataset folder of shards, on the GPU when there is one, split over MPI ranks,
//! resumable shard by shard.

use anyhow::Result;
use indicatif::{ProgressBar, ProgressStyle};
use reg::data::captions::{read_coco, read_sidecars, CaptionEncoder};
use reg::data::prepare::{finish, make_shard, read_moments, shard_done, Encoders, Options};
use reg::data::sources::{image_size, list_image_tree, list_reg};
use reg::dist::{Collectives, Launch};
use reg::encoders::{decoder::Decoder, dinov2::Dinov2};
use std::path::{Path, PathBuf};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// ImageNet-style tree: one folder per class (class index = sorted folder names). With
    /// --captions, COCO's image folder; with --caption-files, a flat folder or a class tree.
    #[arg(long, conflicts_with = "from_reg", required_unless_present = "from_reg")]
    pub images: Option<PathBuf>,
    /// COCO annotations JSON (`captions_train2017.json`): images are read from
    /// `--images/file_name`; every caption of an image is kept; labels are all 0.
    #[arg(long, conflicts_with = "caption_files", requires = "images")]
    pub captions: Option<PathBuf>,
    /// Every image `name.ext` under --images has `name.txt` beside it, one caption a line.
    #[arg(long, requires = "images")]
    pub caption_files: bool,
    /// CLIP folder (transformers layout) whose tokenizer turns captions into token ids;
    /// needed with captions.
    #[arg(long)]
    pub text_encoder: Option<PathBuf>,
    /// Also run the CLIP text tower and store its hidden states and pooled token.
    #[arg(long, requires = "text_encoder")]
    pub text_precomputed: bool,
    /// REG/EDM2 preprocessed data, as `dataset_tools.py convert` / `encode` write it:
    /// `imagenet_256_vae/` and `vae-sd/`, each a folder or a `.zip`; reuses its VAE moments.
    #[arg(long = "from-reg")]
    pub from_reg: Option<PathBuf>,
    /// Output dataset folder.
    #[arg(long)]
    pub out: PathBuf,
    /// SD-VAE model folder (diffusers layout), or `identity` / `identity:K` for the
    /// pixel-space path (latents = pixels in [-1, 1], space-to-depth by K, std 0); needed with --images.
    #[arg(long)]
    pub vae: Option<String>,
    /// DINOv2 model folder (transformers layout); needed unless --no-features.
    #[arg(long)]
    pub encoder: Option<PathBuf>,
    /// Side the encoder sees the images at (default: resolution * 224 / 256, REG's 224 for
    /// 256 px with DINOv2/14). Its tokens, (side / encoder patch)^2 + 1, must be the SiT
    /// model's patches + 1: 32 for a patch-4 `train-encoder` model on 32 px images gives 65.
    #[arg(long, requires = "encoder")]
    pub encoder_resolution: Option<u32>,
    /// Image side after the ADM center crop (256 or 512 for ImageNet; default 256). With
    /// --from-reg, the side of its images unless given.
    #[arg(long)]
    pub resolution: Option<u32>,
    #[arg(long, default_value_t = 4096)]
    pub shard_size: usize,
    /// Images per encoder batch.
    #[arg(long, default_value_t = 64)]
    pub batch: usize,
    /// Store latents in bf16 (half the size) instead of f32.
    #[arg(long)]
    pub latent_bf16: bool,
    /// Also store the cropped images (for `model.encoder: online`).
    #[arg(long)]
    pub store_images: bool,
    /// Do not compute encoder features (then --store-images is needed).
    #[arg(long)]
    pub no_features: bool,
    /// Fail when more than this fraction of the images cannot be read.
    #[arg(long, default_value_t = 0.001)]
    pub max_bad_fraction: f64,
    /// `auto`, `cpu`, `cuda` (each rank uses `cuda:{local rank}`).
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Compute precision of the VAE encoder and DINOv2: `fp32` by default, as REG's
    /// preprocessing encodes; `bf16` or `auto` (bf16 on CUDA) for speed.
    #[arg(long, default_value = "fp32")]
    pub precision: reg::config::Precision,
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
}

fn folder_name(p: &Path) -> String {
    p.canonicalize().unwrap_or(p.to_path_buf()).file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default()
}

pub fn run(a: Args) -> Result<()> {
    super::set_threads(a.threads);
    if a.no_features && !a.store_images {
        reg::bail_input!("--no-features: a dataset needs features or --store-images");
    }
    // Shards travel through files; the ranks only meet at the end (MPI on the host).
    let Launch { device, comm } = Launch::start(&a.device, Collectives::OnHost)?;
    let kind = a.precision.kind_on(device);
    let captioned = a.captions.is_some() || a.caption_files;
    let mut uncaptioned = 0;
    let ((classes, entries), from_reg) = match (&a.images, &a.from_reg) {
        (Some(dir), _) if captioned => {
            let c = match &a.captions {
                Some(json) => read_coco(dir, json)?,
                None => read_sidecars(dir)?,
            };
            uncaptioned = c.uncaptioned;
            if c.entries.is_empty() {
                reg::bail_input!("{}: no captioned images", a.captions.as_deref().unwrap_or(dir).display());
            }
            ((c.classes, c.entries), false)
        }
        (Some(dir), _) => (list_image_tree(dir)?, false),
        (None, Some(dir)) => (list_reg(dir)?, true),
        _ => unreachable!("clap requires one"),
    };
    let text = match (&a.text_encoder, captioned) {
        (Some(dir), true) => Some(CaptionEncoder::load(dir, &folder_name(dir), a.text_precomputed, device)?),
        (None, true) => reg::bail_input!("--text-encoder: needed with captions (a CLIP folder with its tokenizer)"),
        (Some(_), false) => reg::bail_input!("--text-encoder: given without --captions or --caption-files"),
        (None, false) => None,
    };
    let resolution = match (a.resolution, entries.first()) {
        (Some(r), _) => r,
        (None, Some(first)) if from_reg => match image_size(&first.image)? {
            (w, h) if w == h => w,
            (w, h) => reg::bail_input!("{}: {w}x{h} image; the REG layout holds square crops", first.image.name()),
        },
        _ => 256,
    };
    if !resolution.is_multiple_of(32) {
        reg::bail_input!("--resolution: {resolution} is not a multiple of 32");
    }
    let vae = match (&a.vae, from_reg) {
        (Some(v), _) => Some(Decoder::load(v, device)?),
        (None, false) => reg::bail_input!("--vae: needed to encode images (a diffusers AutoencoderKL folder)"),
        (None, true) => None,
    };
    if let Some(d) = vae.as_ref().filter(|d| resolution as i64 % d.downsampling() != 0) {
        reg::bail_input!(
            "--vae: {} needs a resolution divisible by {}, got {resolution}",
            a.vae.as_deref().unwrap_or("?"),
            d.downsampling()
        );
    }
    let encoder = match (&a.encoder, a.no_features) {
        (_, true) => None,
        (Some(e), false) => {
            let side = a.encoder_resolution.unwrap_or(resolution * 224 / 256) as i64;
            Some((folder_name(e), Dinov2::load(e, device, side)?))
        }
        (None, false) => reg::bail_input!("--encoder: needed for features (a transformers Dinov2Model folder), or --no-features"),
    };
    let latent_shape = match (&vae, entries.first().and_then(|e| e.moments.as_ref())) {
        // The stored moments say their own shape.
        (None, Some(first)) => read_moments(first)?.size(),
        _ => {
            let c = vae.as_ref().map(|v| v.latent_channels()).unwrap_or(4);
            let s = resolution as i64 / vae.as_ref().map(|v| v.downsampling()).unwrap_or(8);
            vec![2 * c, s, s]
        }
    };
    let vae_name = match (&a.vae, &vae) {
        (Some(spec), Some(Decoder::Identity { .. })) => spec.clone(),
        (Some(dir), _) => folder_name(Path::new(dir)),
        (None, _) => "from-reg:vae-sd".into(),
    };
    let models = Encoders { vae, encoder, text, device, kind };
    let opts = Options {
        resolution,
        latent_bf16: a.latent_bf16,
        store_features: !a.no_features,
        store_images: a.store_images,
        batch: a.batch.max(1),
    };
    std::fs::create_dir_all(&a.out)?;
    let (rank, world) = (comm.rank(), comm.world());
    let shards = entries.len().div_ceil(a.shard_size.max(1));
    let mine: Vec<usize> = (0..shards).filter(|i| *i as i64 % world == rank).collect();
    let todo: Vec<usize> = mine.iter().copied().filter(|&i| shard_done(&a.out, i).is_none()).collect();
    let images: usize = todo.iter().map(|&i| entries[i * a.shard_size..((i + 1) * a.shard_size).min(entries.len())].len()).sum();
    if rank == 0 {
        eprintln!(
            "reg-ddp prepare: {} images{} in {} classes{} -> {} shards in {} ({} already done); {world} ranks on {device:?}",
            entries.len(),
            if captioned { format!(" with {} captions", entries.iter().map(|e| e.captions.len()).sum::<usize>()) } else { String::new() },
            classes.len(),
            if uncaptioned > 0 { format!(" ({uncaptioned} images without a caption skipped)") } else { String::new() },
            shards,
            a.out.display(),
            mine.len() - todo.len()
        );
    }
    let bar = if rank == 0 { ProgressBar::new(images as u64) } else { ProgressBar::hidden() };
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} images  {per_sec}  [{elapsed_precise} < {eta_precise}]")
            .expect("static template"),
    );
    for i in todo {
        let part = &entries[i * a.shard_size..((i + 1) * a.shard_size).min(entries.len())];
        make_shard(&a.out, i, part, &models, &opts, &|n| bar.inc(n as u64))?;
    }
    bar.finish();
    comm.barrier()?;
    if rank == 0 {
        let index = finish(&a.out, shards, entries.len(), classes, &models, &opts, latent_shape, &vae_name, a.max_bad_fraction)?;
        eprintln!(
            "reg-ddp prepare: wrote {} ({} records, {} unreadable images{}{})",
            a.out.join("index.json").display(),
            index.records(),
            index.bad_images,
            index.text.as_ref().map(|t| format!(", {} captions", t.captions)).unwrap_or_default(),
            if uncaptioned > 0 { format!(", {uncaptioned} images without a caption skipped") } else { String::new() }
        );
    }
    Ok(())
}
