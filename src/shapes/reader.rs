//! An analytic reader of the captioned shapes set (`shapes`): shape, colour, size
//! and position recovered from pixels by thresholding and geometry, with no learned
//! network (so it shares nothing with the representation encoder it helps judge); and
//! the metrics of generated samples built on it.
//
// The reading: foreground = pixels whose brightest channel exceeds FOREGROUND (the
// background is at most 51, every colour's brightest channel at least 172); the largest
// 8-connected foreground component is the object. Position = the quadrant of its
// bounding-box centre (the shape's centre for every shape). Colour = the palette colour
// nearest its mean RGB. Shape, in order: enclosed background (a hole) = ring; centroid
// below the box centre by > 8% of the height = triangle (apex up: 1/6 below in theory);
// fill of the box > 0.88 = square (1.0), > 0.68 = disc (pi/4), else cross (0.58).
// Size = the radius implied by the box extent and the shape (the square's half-side is
// 0.9 r) against the midpoint of the two sizes' radii.

use crate::error::bad_input;
use crate::formats::npy::NpzArray;
use crate::shapes::{Attribute, Attributes, Colour, Position, Shape, Size, Value, Wanted};
use anyhow::Result;
use serde::Serialize;
use std::path::Path;

/// Brightest-channel level that separates object from background.
pub const FOREGROUND: u8 = 110;

/// The largest 8-connected component of `mask` (w x h, row-major): its pixel indices.
fn largest_component(mask: &[bool], w: usize, h: usize) -> Vec<usize> {
    let mut seen = vec![false; mask.len()];
    let mut best = Vec::new();
    for start in 0..mask.len() {
        if !mask[start] || seen[start] {
            continue;
        }
        seen[start] = true;
        let (mut comp, mut stack) = (Vec::new(), vec![start]);
        while let Some(p) = stack.pop() {
            comp.push(p);
            let (x, y) = ((p % w) as i64, (p / w) as i64);
            for (dx, dy) in [(-1, -1), (0, -1), (1, -1), (-1, 0), (1, 0), (-1, 1), (0, 1), (1, 1)] {
                let (nx, ny) = (x + dx, y + dy);
                if nx >= 0 && ny >= 0 && (nx as usize) < w && (ny as usize) < h {
                    let q = ny as usize * w + nx as usize;
                    if mask[q] && !seen[q] {
                        seen[q] = true;
                        stack.push(q);
                    }
                }
            }
        }
        if comp.len() > best.len() {
            best = comp;
        }
    }
    best
}

/// Pixels of the box [x0, x1] x [y0, y1] that are not in `inside` and cannot reach the
/// box's border through such pixels (4-connected): the component's holes.
fn hole_area(inside: &[bool], w: usize, (x0, y0, x1, y1): (usize, usize, usize, usize)) -> usize {
    let (bw, bh) = (x1 - x0 + 1, y1 - y0 + 1);
    let free = |x: usize, y: usize| !inside[(y0 + y) * w + x0 + x];
    let mut reached = vec![false; bw * bh];
    let mut stack: Vec<(usize, usize)> = Vec::new();
    for y in 0..bh {
        for x in 0..bw {
            if (x == 0 || y == 0 || x == bw - 1 || y == bh - 1) && free(x, y) {
                reached[y * bw + x] = true;
                stack.push((x, y));
            }
        }
    }
    while let Some((x, y)) = stack.pop() {
        let near = [(x.wrapping_sub(1), y), (x + 1, y), (x, y.wrapping_sub(1)), (x, y + 1)];
        for (nx, ny) in near {
            if nx < bw && ny < bh && free(nx, ny) && !reached[ny * bw + nx] {
                reached[ny * bw + nx] = true;
                stack.push((nx, ny));
            }
        }
    }
    (0..bh).flat_map(|y| (0..bw).map(move |x| (x, y))).filter(|&(x, y)| free(x, y) && !reached[y * bw + x]).count()
}

/// The attributes of the object in `img`, or `None` when no pixel is foreground.
pub fn read(img: &image::RgbImage) -> Option<Attributes> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let mask: Vec<bool> = img.pixels().map(|p| p.0.iter().copied().max().unwrap_or(0) > FOREGROUND).collect();
    let comp = largest_component(&mask, w, h);
    if comp.is_empty() {
        return None;
    }
    let mut inside = vec![false; w * h];
    let (mut x0, mut y0, mut x1, mut y1) = (w, h, 0, 0);
    let (mut sy, mut rgb) = (0f64, [0f64; 3]);
    for &p in &comp {
        inside[p] = true;
        let (x, y) = (p % w, p / w);
        (x0, y0, x1, y1) = (x0.min(x), y0.min(y), x1.max(x), y1.max(y));
        sy += y as f64 + 0.5;
        let px = img.as_raw();
        for (c, v) in rgb.iter_mut().enumerate() {
            *v += px[p * 3 + c] as f64;
        }
    }
    let n = comp.len() as f64;
    let (bw, bh) = ((x1 - x0 + 1) as f64, (y1 - y0 + 1) as f64);
    let (bx, by) = ((x0 + x1 + 1) as f64 / 2.0, (y0 + y1 + 1) as f64 / 2.0);
    let holes = hole_area(&inside, w, (x0, y0, x1, y1));
    let fill = n / (bw * bh);
    let shape = if holes as f64 >= (0.03 * bw * bh).max(2.0) {
        Shape::Ring
    } else if (sy / n - by) / bh > 0.08 {
        Shape::Triangle
    } else if fill > 0.88 {
        Shape::Square
    } else if fill > 0.68 {
        Shape::Disc
    } else {
        Shape::Cross
    };
    let mean = rgb.map(|v| v / n);
    let colour = *Colour::ALL
        .iter()
        .min_by(|a, b| {
            let d = |c: &Colour| c.rgb().iter().zip(mean).map(|(&t, m)| (t as f64 - m).powi(2)).sum::<f64>();
            d(a).total_cmp(&d(b))
        })
        .expect("colours");
    let side = w.min(h) as f64;
    let half_extent = bw.max(bh) / 2.0 / if shape == Shape::Square { 0.9 } else { 1.0 };
    let threshold = (Size::Small.radius() + Size::Large.radius()) as f64 / 2.0;
    let size = if half_extent / side > threshold { Size::Large } else { Size::Small };
    let position = Position::from_halves(bx > w as f64 / 2.0, by > h as f64 / 2.0);
    Some(Attributes { shape, colour, size, position })
}

/// Fractions of images whose read attribute matches the wanted one, each over the
/// images that want it (`None` when none does); `all`: every wanted attribute right;
/// `readable`: an object was found at all (an unreadable image counts as wrong).
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Accuracy {
    pub n: usize,
    pub shape: Option<f64>,
    pub colour: Option<f64>,
    pub size: Option<f64>,
    pub position: Option<f64>,
    pub all: f64,
    pub readable: f64,
}

/// Scores `read` attributes (one per image, `None` = unreadable) against what was wanted.
pub fn accuracy(read: &[Option<Attributes>], wanted: &[Wanted]) -> Accuracy {
    assert_eq!(read.len(), wanted.len(), "one wanted set per image");
    let frac = |f: &dyn Fn(&Option<Attributes>, &Wanted) -> Option<bool>| {
        let v: Vec<bool> = read.iter().zip(wanted).filter_map(|(r, w)| f(r, w)).collect();
        (!v.is_empty()).then(|| v.iter().filter(|&&b| b).count() as f64 / v.len() as f64)
    };
    fn check<T: PartialEq>(got: Option<T>, want: Option<T>) -> Option<bool> {
        want.map(|w| got == Some(w))
    }
    let ok = |r: &Option<Attributes>, w: &Wanted| {
        [
            check(r.map(|a| a.shape), w.shape),
            check(r.map(|a| a.colour), w.colour),
            check(r.map(|a| a.size), w.size),
            check(r.map(|a| a.position), w.position),
        ]
    };
    Accuracy {
        n: read.len(),
        shape: frac(&|r, w| ok(r, w)[0]),
        colour: frac(&|r, w| ok(r, w)[1]),
        size: frac(&|r, w| ok(r, w)[2]),
        position: frac(&|r, w| ok(r, w)[3]),
        all: frac(&|r, w| Some(r.is_some() && ok(r, w).iter().all(|c| c.unwrap_or(true)))).unwrap_or(0.0),
        readable: frac(&|r, _| Some(r.is_some())).unwrap_or(0.0),
    }
}

/// Reads every image and scores it against what it was asked to show.
pub fn attribute_accuracy(images: &[image::RgbImage], wanted: &[Wanted]) -> Accuracy {
    let read: Vec<Option<Attributes>> = images.iter().map(read).collect();
    accuracy(&read, wanted)
}

/// Total variation distance (half the L1 distance, in [0, 1]) between the attribute
/// histograms of generated and real images: per attribute, and over the joint
/// (shape, colour, size, position) cells. Unreadable generated images fall in a bin of
/// their own that real images never fill. The joint distance of N samples over the
/// 280 cells is biased upwards when N is not much larger than 280 (two samples of the
/// same distribution differ by chance), so compare it between arms at equal N.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Distance {
    pub shape: f64,
    pub colour: f64,
    pub size: f64,
    pub position: f64,
    pub joint: f64,
}

/// Summed over the keys in order: a hash map's order would change the rounding from run to run.
fn total_variation<K: Ord>(a: impl Iterator<Item = K>, b: impl Iterator<Item = K>) -> f64 {
    let mut h: std::collections::BTreeMap<K, (f64, f64)> = std::collections::BTreeMap::new();
    let (mut na, mut nb) = (0f64, 0f64);
    for k in a {
        h.entry(k).or_default().0 += 1.0;
        na += 1.0;
    }
    for k in b {
        h.entry(k).or_default().1 += 1.0;
        nb += 1.0;
    }
    0.5 * h.values().map(|(x, y)| (x / na.max(1.0) - y / nb.max(1.0)).abs()).sum::<f64>()
}

/// The distance between what was generated (read back; `None` = unreadable) and `real`.
pub fn distance(generated: &[Option<Attributes>], real: &[Attributes]) -> Distance {
    let tv = |f: &dyn Fn(&Attributes) -> &'static str| {
        total_variation(generated.iter().map(|g| g.as_ref().map(f)), real.iter().map(|r| Some(f(r))))
    };
    Distance {
        shape: tv(&|a| Attribute::Shape.of(a)),
        colour: tv(&|a| Attribute::Colour.of(a)),
        size: tv(&|a| Attribute::Size.of(a)),
        position: tv(&|a| Attribute::Position.of(a)),
        joint: total_variation(generated.iter().copied(), real.iter().map(|r| Some(*r))),
    }
}

/// One `Wanted` per line of a JSON-lines file (`attributes.jsonl` of the set, or a list
/// written for samples: any of `shape`, `colour`, `size`, `position`; other fields are
/// ignored). A bad line is an input error naming the file and line.
pub fn read_wanted(path: &Path) -> Result<Vec<Wanted>> {
    read_jsonl(path)
}

/// The complete attributes of every line (for the real side of `distance`); a line that
/// lacks one is an input error.
pub fn read_attributes(path: &Path) -> Result<Vec<Attributes>> {
    read_jsonl(path)
}

/// Every non-empty line of a JSON-lines file as a `T`.
fn read_jsonl<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Vec<T>> {
    let text = std::fs::read_to_string(path).map_err(|e| bad_input(format!("{}: cannot read: {e}", path.display())))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| serde_json::from_str(l).map_err(|e| bad_input(format!("{}: line {}: {e}", path.display(), i + 1))))
        .collect()
}

/// Generated images: the PNGs of a folder in name order (`reg-ddp sample` writes
/// `000000.png`, ...), or `arr_0` [N, H, W, 3] u8 of an `.npz`.
pub fn load_samples(path: &Path) -> Result<Vec<image::RgbImage>> {
    let shown = path.display();
    if path.is_dir() {
        let mut files: Vec<_> = std::fs::read_dir(path)
            .map_err(|e| bad_input(format!("{shown}: cannot list: {e}")))?
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "png") && !p.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.')))
            .collect();
        files.sort();
        return files
            .iter()
            .map(|f| image::open(f).map(|i| i.to_rgb8()).map_err(|e| bad_input(format!("{}: cannot read: {e}", f.display()))))
            .collect();
    }
    let arr = NpzArray::open(path, "arr_0")?.ok_or_else(|| bad_input(format!("{shown}: no arr_0")))?;
    if arr.kind != tch::Kind::Uint8 || arr.shape.len() != 4 || arr.shape[3] != 3 {
        crate::bail_input!("{shown}: arr_0 is {:?} {:?}, expected [N, H, W, 3] u8", arr.kind, arr.shape);
    }
    let (h, w) = (arr.shape[1] as u32, arr.shape[2] as u32);
    (0..arr.shape[0])
        .map(|i| {
            let data = Vec::<u8>::try_from(arr.rows(i, 1).flatten(0, -1))?;
            Ok(image::RgbImage::from_raw(w, h, data).expect("h x w x 3 bytes"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_image_is_unreadable_and_wrong() {
        let img = image::RgbImage::from_pixel(32, 32, image::Rgb([20, 20, 30]));
        assert_eq!(read(&img), None);
        let w = Wanted { shape: Some(Shape::Disc), ..Wanted::default() };
        let acc = attribute_accuracy(&[img], &[w]);
        assert_eq!((acc.shape, acc.colour, acc.all, acc.readable), (Some(0.0), None, 0.0, 0.0));
    }

    #[test]
    fn total_variation_is_zero_for_equal_and_one_for_disjoint_histograms() {
        let a = Attributes { shape: Shape::Disc, colour: Colour::Red, size: Size::Small, position: Position::TopLeft };
        let b = Attributes { shape: Shape::Ring, colour: Colour::Blue, size: Size::Large, position: Position::BottomRight };
        let same = distance(&[Some(a), Some(b)], &[b, a]);
        assert_eq!((same.shape, same.joint), (0.0, 0.0));
        let apart = distance(&[Some(a), None], &[b, b]);
        assert_eq!((apart.shape, apart.joint), (1.0, 1.0));
        let half = distance(&[Some(a), Some(a)], &[a, b]);
        assert_eq!((half.colour, half.joint), (0.5, 0.5));
    }
}
