//! `reg-ddp import`: one safetensors file from a PyTorch checkpoint of the original REG code, read by the
//! restricted reader in `formats::torchfile` (the pickle is interpreted, never executed).

use anyhow::Result;
use reg::bail_input;
use reg::formats::{torchfile, weights};
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// A `torch.save` file: REG's `{"model", "ema", "opt", "args", "steps"}` checkpoint, or a bare state dict.
    pub file: PathBuf,
    #[arg(long)]
    pub out: PathBuf,
    /// Which state dict of a checkpoint to write: `model` (the default) or `ema`.
    #[arg(long)]
    pub key: Option<String>,
}

pub fn run(a: Args) -> Result<()> {
    let root = torchfile::read(&a.file)?;
    let named = torchfile::state_dict(&a.file, &root, a.key.as_deref())?;
    // Our safetensors writer covers every dtype of a model but int16; say so before writing half a file.
    if let Some((name, t)) = named.iter().find(|(_, t)| t.kind() == tch::Kind::Int16) {
        bail_input!("{}: tensor {name}: dtype {:?} is not written to safetensors here", a.file.display(), t.kind());
    }
    weights::write(&a.out, &named, None)?;
    let what = match (a.key.as_deref(), root.get("model")) {
        (Some(k), _) => k.to_string(),
        (None, Some(_)) if root.as_tensor_map().is_none() => "model".into(),
        (None, _) => "state dict".into(),
    };
    let step = match root.get("steps") {
        Some(torchfile::Value::Int(s)) => format!(", step {s}"),
        _ => String::new(),
    };
    eprintln!("reg-ddp: wrote {} ({} tensors, {what}{step})", a.out.display(), named.len());
    Ok(())
}
