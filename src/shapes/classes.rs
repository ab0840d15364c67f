//! The default demo set (`demo-images` without `--captioned`): one procedural shape per
//! class folder. It is kept apart from the captioned set's renderer because its images
//! vary in size and aspect (the ADM crop of `prepare` has work to do), which the
//! captioned set, drawn at the model's side, must not.

use super::hash;

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
