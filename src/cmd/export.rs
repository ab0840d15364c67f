//! `reg-ddp export`: one safetensors file with the REG parameter names from a sharded
//! checkpoint (loads with `strict=True` into the original PyTorch model).

use anyhow::Result;
use reg::model::{sit::pos_embed_2d, weights};
use reg::train::checkpoint;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// A checkpoint folder (`.../step-NNNNNNN`).
    #[arg(long)]
    pub ckpt: PathBuf,
    /// Export the EMA weights instead of the live ones.
    #[arg(long)]
    pub ema: bool,
    #[arg(long)]
    pub out: PathBuf,
}

pub fn run(a: Args) -> Result<()> {
    let m = checkpoint::verify(&a.ckpt)?;
    let dims = m.config.model.dims(&a.ckpt.join("manifest.json").display().to_string())?;
    let flat = checkpoint::read_full(&a.ckpt, &m, if a.ema { "ema" } else { "weights" })?;
    let mut named: Vec<(String, tch::Tensor)> =
        m.layout.iter().map(|e| (e.name.clone(), flat.narrow(0, e.offset, e.shape.iter().product()).view(e.shape.as_slice()))).collect();
    named.push(("pos_embed".into(), pos_embed_2d(dims.hidden_size, dims.input_size / dims.patch_size)));
    weights::write(&a.out, &named, None)?;
    eprintln!("reg-ddp: wrote {} ({} tensors, step {}{})", a.out.display(), named.len(), m.step, if a.ema { ", EMA" } else { "" });
    Ok(())
}
