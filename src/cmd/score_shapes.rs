//! `reg-ddp score-shapes`: reads generated images of the captioned shapes set with the
//! analytic attribute reader and prints one JSON line: accuracy against what each image
//! was asked for, and the distance of their attribute histograms from the real set's.

use anyhow::Result;
use reg::eval::attributes::{accuracy, distance, load_samples, read, read_attributes, read_wanted};
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// A folder of PNGs (in name order) or an `.npz` with `arr_0` [N, H, W, 3] u8.
    #[arg(long)]
    pub samples: PathBuf,
    /// JSON lines, one per image in order: the attributes it was asked for (any of
    /// shape, colour, size, position; `attributes.jsonl` of a set works as is).
    #[arg(long)]
    pub attributes: PathBuf,
    /// `attributes.jsonl` of real images, for the distribution distance (default: --attributes).
    #[arg(long)]
    pub real: Option<PathBuf>,
}

pub fn run(a: Args) -> Result<()> {
    let images = load_samples(&a.samples)?;
    let wanted = read_wanted(&a.attributes)?;
    if wanted.len() != images.len() {
        reg::bail_input!("{}: {} lines for {} images in {}", a.attributes.display(), wanted.len(), images.len(), a.samples.display());
    }
    let real = read_attributes(a.real.as_ref().unwrap_or(&a.attributes))?;
    let got: Vec<_> = images.iter().map(read).collect();
    let out = serde_json::json!({"accuracy": accuracy(&got, &wanted), "distance": distance(&got, &real)});
    println!("{out}");
    Ok(())
}
