//! Pillow goldens for the ADM center crop and resize (regenerate: tools/golden/crop.py).

use std::path::PathBuf;

use image::RgbImage;
use reg::formats::pillow_resample::{center_crop_adm, resize, Filter};

fn data(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/crop").join(name)
}

fn load(name: &str) -> RgbImage {
    image::open(data(name)).unwrap_or_else(|e| panic!("open {name}: {e}")).to_rgb8()
}

/// Max absolute per-channel difference and number of pixels that differ at all.
fn compare(what: &str, got: &RgbImage, want: &RgbImage) -> (u8, usize) {
    assert_eq!(got.dimensions(), want.dimensions(), "{what}: size");
    let mut max = 0u8;
    let mut differing = 0usize;
    for (g, w) in got.pixels().zip(want.pixels()) {
        let d = g.0.iter().zip(&w.0).map(|(a, b)| a.abs_diff(*b)).max().unwrap();
        max = max.max(d);
        differing += usize::from(d > 0);
    }
    let n = got.width() as usize * got.height() as usize;
    println!("{what}: max diff {max}, {differing}/{n} pixels off by 1");
    // Pillow's rounding is reproduced, so anything above one grey level is a bug.
    assert!(max <= 1, "{what}: max diff {max} > 1 ({differing} pixels differ)");
    (max, differing)
}

const CROPS: &[(&str, u32)] = &[
    ("smooth_517x389", 256),
    ("smooth_517x389", 64),
    ("tall_300x700", 256),
    ("wide_1031x613", 256),
    ("small_260x255", 256),
    ("small_260x255", 64),
    ("thin_64x999", 64),
    ("thin_64x999", 256),
];

#[test]
fn center_crop_matches_pillow() {
    for &(name, size) in CROPS {
        let img = load(&format!("{name}.png"));
        let want = load(&format!("{name}.expected{size}.png"));
        let got = center_crop_adm(&img, size);
        compare(&format!("crop {name} @{size}"), &got, &want);
    }
}

#[test]
fn resize_matches_pillow() {
    let cases = [
        ("small_260x255", Filter::Bicubic, "bicubic", 397, 301),
        ("smooth_517x389", Filter::Bicubic, "bicubic", 123, 77),
        ("tall_300x700", Filter::Bicubic, "bicubic", 300, 233),
        ("smooth_517x389", Filter::Box, "box", 258, 194),
    ];
    for (name, filter, tag, w, h) in cases {
        let img = load(&format!("{name}.png"));
        let want = load(&format!("{name}.{tag}{w}x{h}.png"));
        let got = resize(&img, w, h, filter);
        compare(&format!("resize {name} -> {tag} {w}x{h}"), &got, &want);
    }
}

/// The crop computes only the central window of the bicubic resize; it must equal
/// resizing everything and cutting afterwards, in both pass orders (tall_300x700 at
/// 256 and 200 runs the vertical pass first, the others horizontal first). Sizes stay
/// above half the short side so that no BOX halving happens.
#[test]
fn windowed_crop_equals_full_resize_then_crop() {
    for (name, sizes) in [("tall_300x700", [256, 200, 151]), ("smooth_517x389", [256, 200, 195])] {
        let img = load(&format!("{name}.png"));
        let (w, h) = img.dimensions();
        for size in sizes {
            let scale = f64::from(size) / f64::from(w.min(h));
            let nw = (f64::from(w) * scale).round_ties_even() as u32;
            let nh = (f64::from(h) * scale).round_ties_even() as u32;
            let full = resize(&img, nw, nh, Filter::Bicubic);
            let (x0, y0) = ((nw - size) / 2, (nh - size) / 2);
            let want = image::imageops::crop_imm(&full, x0, y0, size, size).to_image();
            assert_eq!(center_crop_adm(&img, size), want, "{name} @{size}");
        }
    }
}

#[test]
fn same_size_resize_is_identity() {
    let img = load("small_260x255.png");
    for filter in [Filter::Box, Filter::Bicubic] {
        assert_eq!(resize(&img, 260, 255, filter), img);
    }
}
