//! `reg-ddp score-shapes`: reads generated images of the captioned shapes set with the
//! analytic attribute reader and prints one JSON line: accuracy against what each image
//! was asked for, which shape was read for each shape asked for, and the distance of
//! their attribute histograms from the real set's.

use anyhow::Result;
use reg::shapes::reader::{accuracy, distance, load_samples, read, read_attributes, read_wanted};
use reg::shapes::Value;
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
    // Which shape was read for each shape asked for: a model that draws blobs shows up
    // as one column here, whatever its accuracy.
    let mut confusion = std::collections::BTreeMap::<&str, std::collections::BTreeMap<&str, usize>>::new();
    for (g, w) in got.iter().zip(&wanted) {
        if let Some(asked) = w.shape {
            let seen = g.map(|a| a.shape.name()).unwrap_or("unreadable");
            *confusion.entry(asked.name()).or_default().entry(seen).or_default() += 1;
        }
    }
    let out = serde_json::json!({"accuracy": accuracy(&got, &wanted), "distance": distance(&got, &real), "shape_read_as": confusion});
    println!("{out}");
    Ok(())
}
