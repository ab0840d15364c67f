//! `reg-ddp demo-images`: a small built-in image set (procedural shapes and colours,
//! one folder per class) for the demo and the pipeline tests; with `--captioned`, the
//! captioned attribute set of `data::shapes` for the text-conditioning study.

use anyhow::Result;
use reg::data::shapes::{self, hash, Attribute, SetSpec, Split, Wanted};
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

/// Class `c` is a shape (disc, square, ring, stripes, cross) in a class colour on a
/// varying background; position, size and the exact colours vary per image. Sizes vary
/// too (not square, larger than the crop), so the ADM crop has work to do.
pub fn render(c: u32, k: u32, seed: u64) -> image::RgbImage {
    let r = |i: u64| hash(seed ^ ((c as u64) << 32) ^ ((k as u64) << 8) ^ i);
    let (w, h) = (80 + (r(1) % 60) as u32, 72 + (r(2) % 60) as u32);
    // A hue per class: three phase-shifted sines around the colour wheel.
    let a = std::f32::consts::TAU * c as f32 / 10.0;
    let col = [0.0f32, 2.1, 4.2].map(|phase| (a + phase).sin() * 0.5 + 0.5);
    let bg = [(r(3) % 80) as f32 / 255.0, (r(4) % 80) as f32 / 255.0, (r(5) % 80) as f32 / 255.0];
    let (cx, cy) = (w as f32 * (0.35 + (r(6) % 30) as f32 / 100.0), h as f32 * (0.35 + (r(7) % 30) as f32 / 100.0));
    let size = w.min(h) as f32 * (0.2 + (r(8) % 15) as f32 / 100.0);
    image::RgbImage::from_fn(w, h, |x, y| {
        let (dx, dy) = (x as f32 - cx, y as f32 - cy);
        let d = (dx * dx + dy * dy).sqrt();
        let inside = match c % 5 {
            0 => d < size,
            1 => dx.abs() < size && dy.abs() < size,
            2 => (d - size).abs() < size * 0.3,
            3 => ((x as f32 / (size * 0.3)) as i64) % 2 == 0 && d < size * 1.5,
            _ => (dx.abs() < size * 0.3 || dy.abs() < size * 0.3) && d < size * 1.3,
        };
        let noise = (hash(r(9) ^ ((x as u64) << 16) ^ y as u64) % 20) as f32 / 255.0;
        let p = if inside { col } else { bg };
        image::Rgb([0, 1, 2].map(|i| ((p[i] + noise).min(1.0) * 255.0) as u8))
    })
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
            render(c, k, a.seed).save(dir.join(format!("img{k:04}.png")))?;
        }
    }
    eprintln!("reg-ddp: wrote {} images in {} classes to {}", classes * a.per_class, classes, a.out.display());
    Ok(())
}
