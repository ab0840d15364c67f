//! `reg-ddp train-encoder`: trains the shapes set's representation encoder (a small DINOv2-layout ViT) and writes it in transformers' layout for `prepare --encoder` / `data.encoder_path`.

use anyhow::Result;
use reg::shapes::encoder::{read_set, EncoderSize, ShapeEncoder, TrainOptions};
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Training images: a set written by `demo-images --captioned --split encoder`
    /// (its `attributes.jsonl` gives the labels).
    #[arg(long)]
    pub images: PathBuf,
    /// Held-out images of the same kind (`--split heldout`): the heads' accuracy on them is reported.
    #[arg(long)]
    pub heldout: Option<PathBuf>,
    /// Output model folder: `config.json` + `model.safetensors` (transformers' `Dinov2Model`).
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, default_value_t = 600)]
    pub steps: i64,
    #[arg(long, default_value_t = 64)]
    pub batch: i64,
    /// Peak learning rate (AdamW; warm-up, then cosine to zero).
    #[arg(long, default_value_t = 2e-3)]
    pub lr: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: i64,
    #[arg(long, default_value_t = 64)]
    pub hidden: i64,
    #[arg(long, default_value_t = 4)]
    pub layers: i64,
    #[arg(long, default_value_t = 4)]
    pub heads: i64,
    #[arg(long, default_value_t = 4)]
    pub patch: i64,
    /// Image side (the images must have it); the encoder's `image_size`.
    #[arg(long, default_value_t = 32)]
    pub resolution: i64,
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
}

pub fn run(a: Args) -> Result<()> {
    super::set_threads(a.threads);
    let size = EncoderSize { hidden: a.hidden, layers: a.layers, heads: a.heads, patch: a.patch, resolution: a.resolution };
    let config = size.config()?;
    let data = read_set(&a.images, a.resolution, a.patch)?;
    let heldout = a.heldout.as_ref().map(|d| read_set(d, a.resolution, a.patch)).transpose()?;
    // One seed decides the initial weights and the batch order.
    tch::manual_seed(a.seed);
    let mut enc = ShapeEncoder::new(config)?;
    let opts = TrainOptions { steps: a.steps, batch: a.batch, lr: a.lr };
    eprintln!(
        "reg-ddp train-encoder: {} images, ViT {} parameters ({} layers x {} wide, patch {}, {} px), {} steps of {}",
        data.len(),
        enc.parameters(),
        a.layers,
        a.hidden,
        a.patch,
        a.resolution,
        a.steps,
        a.batch
    );
    let every = (a.steps / 10).max(1);
    let report = enc.train(&data, &opts, |step, loss| {
        if (step + 1) % every == 0 {
            eprintln!("step {:>6}  loss {loss:.4}", step + 1);
        }
    })?;
    let train_acc = enc.evaluate(&data, 256);
    let held = heldout.as_ref().map(|h| enc.evaluate(h, 256));
    enc.save(&a.out)?;
    let out = serde_json::json!({
        "out": a.out.display().to_string(),
        "images": data.len(),
        "parameters": enc.parameters(),
        "tokens": enc.model.num_tokens(),
        "hidden_size": enc.model.hidden_size(),
        "size": size,
        "train": opts,
        "seed": a.seed,
        "loss_start": report.loss_start,
        "loss_end": report.loss_end,
        "seconds": report.seconds,
        "train_accuracy": train_acc,
        "heldout_accuracy": held,
    });
    // Beside the weights, what made them (transformers ignores other files).
    std::fs::write(a.out.join("train_encoder.json"), serde_json::to_string_pretty(&out)? + "\n")?;
    println!("{out}");
    Ok(())
}
