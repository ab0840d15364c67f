//! `reg-ddp demo-images`: a small built-in image set (procedural shapes and colours,
//! one folder per class) for the demo and the pipeline tests; with `--captioned`, the
//! captioned attribute set of `shapes` for the text-conditioning study.

use anyhow::Result;
use reg::shapes::{self, classes, Attribute, SetSpec, Split, Wanted};
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[arg(long)]
    pub out: PathBuf,
    /// Classes of the default set (the captioned set has one class per value of --class-attribute).
    #[arg(long)]
    pub classes: Option<u32>,
    #[arg(long, default_value_t = 24)]
    pub per_class: u32,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// The captioned set: one shape with colour, size and position per image, captions
    /// beside each PNG (`.txt`, one a line) and `attributes.jsonl`.
    #[arg(long)]
    pub captioned: bool,
    /// With --captioned: image side in pixels.
    #[arg(long, default_value_t = 32)]
    pub size: u32,
    /// With --captioned: the attribute whose values are the class folders.
    #[arg(long, value_enum, default_value = "shape")]
    pub class_attribute: Attribute,
    /// With --captioned: which disjoint part of the set to draw.
    #[arg(long, value_enum, default_value = "train")]
    pub split: Split,
    /// With --captioned: captions per image.
    #[arg(long, default_value_t = 4)]
    pub captions: u32,
    /// With --captioned: attributes every image shares, e.g. `colour=white,size=large`
    /// (captions still name them).
    #[arg(long, default_value = "")]
    pub fix: String,
}

pub fn run(a: Args) -> Result<()> {
    if a.captioned {
        if a.classes.is_some() {
            reg::bail_input!("--classes: the captioned set has one class per value of --class-attribute");
        }
        let spec = SetSpec {
            size: a.size,
            split: a.split,
            seed: a.seed,
            class_attribute: a.class_attribute,
            per_class: a.per_class,
            captions_per_image: a.captions,
            fixed: Wanted::parse_flag("--fix", &a.fix)?,
        };
        let n = shapes::write_set(&a.out, &spec)?;
        let classes = a.class_attribute.values().len();
        let (side, split, out) = (a.size, a.split, a.out.display());
        eprintln!("reg-ddp: wrote {n} captioned {side}x{side} images ({split:?} split) in {classes} classes to {out}");
        return Ok(());
    }
    if !a.fix.is_empty() {
        reg::bail_input!("--fix: only with --captioned (the default set has no attributes to fix)");
    }
    let classes = a.classes.unwrap_or(10);
    for c in 0..classes {
        let dir = a.out.join(format!("class{c:02}"));
        std::fs::create_dir_all(&dir)?;
        for k in 0..a.per_class {
            classes::render(c, k, a.seed).save(dir.join(format!("img{k:04}.png")))?;
        }
    }
    eprintln!("reg-ddp: wrote {} images in {} classes to {}", classes * a.per_class, classes, a.out.display());
    Ok(())
}
