//! `reg-ddp export`: one safetensors file with the REG parameter names from a sharded
//! checkpoint (loads with `strict=True` into the original PyTorch model).

use anyhow::Result;
use reg::formats::weights;
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
    let named = checkpoint::read_named(&a.ckpt, &m, a.ema)?;
    weights::write(&a.out, &named, None)?;
    eprintln!("reg-ddp: wrote {} ({} tensors, step {}{})", a.out.display(), named.len(), m.step, if a.ema { ", EMA" } else { "" });
    Ok(())
}
