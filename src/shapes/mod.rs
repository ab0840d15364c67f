//! The shapes world of the demo and the study: a procedural captioned image set (one
//! shape with a colour, a size and a position on a dark noisy background, captions in
//! varied wording, a class folder per value of one attribute, disjoint splits), its
//! analytic reader, the small encoder trained on it, and the study with its curves.
//! Above the layers it uses; nothing in the core imports it.
//
// Everything is keyed by a hash of (seed, split, class, index) and drawn with integer
// arithmetic and IEEE +, -, *, / only (no sin or exp), so the bytes are the same on
// every machine. Shapes are axis-aligned and drawn without antialiasing: the analytic
// scorer (`reader`) then reads them back with a margin.

pub mod classes;
pub mod curves;
pub mod encoder;
pub mod reader;
pub mod study;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::Path;

/// A tiny deterministic generator (splitmix64's finaliser), as `demo-images` uses.
pub fn hash(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Uniform in [0, 1) from a hash.
fn unit(h: u64) -> f32 {
    (h >> 40) as f32 / (1u64 << 24) as f32
}

/// An attribute with a finite set of values, named as in captions and files.
pub trait Value: Copy + Eq + 'static {
    const ALL: &'static [Self];
    /// The value's name (`top_left`; captions spell it with a space).
    fn name(self) -> &'static str;
    fn index(self) -> usize {
        Self::ALL.iter().position(|v| *v == self).expect("listed")
    }
    fn parse(s: &str) -> Option<Self> {
        Self::ALL.iter().copied().find(|v| v.name() == s)
    }
}

macro_rules! value_enum {
    ($t:ident { $($v:ident = $n:literal),* $(,)? }) => {
        #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(rename_all = "snake_case")]
        pub enum $t { $($v),* }
        impl Value for $t {
            const ALL: &'static [Self] = &[$($t::$v),*];
            fn name(self) -> &'static str {
                match self { $($t::$v => $n),* }
            }
        }
    };
}

value_enum!(Shape { Disc = "disc", Square = "square", Triangle = "triangle", Ring = "ring", Cross = "cross" });
value_enum!(Colour { Red = "red", Green = "green", Blue = "blue", Yellow = "yellow", Magenta = "magenta", Cyan = "cyan", White = "white" });
value_enum!(Size { Small = "small", Large = "large" });
value_enum!(Position { TopLeft = "top_left", TopRight = "top_right", BottomLeft = "bottom_left", BottomRight = "bottom_right" });

impl Colour {
    /// The nominal RGB of each colour; images jitter around it (±12 per channel, ±6 noise).
    pub fn rgb(self) -> [u8; 3] {
        match self {
            Colour::Red => [220, 45, 45],
            Colour::Green => [45, 190, 60],
            Colour::Blue => [50, 90, 235],
            Colour::Yellow => [230, 215, 50],
            Colour::Magenta => [215, 60, 215],
            Colour::Cyan => [50, 205, 215],
            Colour::White => [230, 230, 230],
        }
    }
}

impl Size {
    /// The shape's radius as a fraction of the image side, before a ±0.01 jitter.
    pub fn radius(self) -> f32 {
        match self {
            Size::Small => 0.12,
            Size::Large => 0.21,
        }
    }
}

impl Position {
    /// (right, bottom): which half of the image the shape's centre is in.
    pub fn halves(self) -> (bool, bool) {
        match self {
            Position::TopLeft => (false, false),
            Position::TopRight => (true, false),
            Position::BottomLeft => (false, true),
            Position::BottomRight => (true, true),
        }
    }

    pub fn from_halves(right: bool, bottom: bool) -> Position {
        match (right, bottom) {
            (false, false) => Position::TopLeft,
            (true, false) => Position::TopRight,
            (false, true) => Position::BottomLeft,
            (true, true) => Position::BottomRight,
        }
    }
}

/// The true attributes of one image.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Attributes {
    pub shape: Shape,
    pub colour: Colour,
    pub size: Size,
    pub position: Position,
}

/// Which attribute names the class folders (`--class-attribute`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Attribute {
    Shape,
    Colour,
    Size,
    Position,
}

impl Attribute {
    pub const ALL: [Attribute; 4] = [Attribute::Shape, Attribute::Colour, Attribute::Size, Attribute::Position];

    pub fn name(self) -> &'static str {
        match self {
            Attribute::Shape => "shape",
            Attribute::Colour => "colour",
            Attribute::Size => "size",
            Attribute::Position => "position",
        }
    }

    /// The names of its values, in class-index order (= sorted, as `prepare` sorts folders).
    pub fn values(self) -> Vec<&'static str> {
        let mut v: Vec<&'static str> = match self {
            Attribute::Shape => Shape::ALL.iter().map(|x| x.name()).collect(),
            Attribute::Colour => Colour::ALL.iter().map(|x| x.name()).collect(),
            Attribute::Size => Size::ALL.iter().map(|x| x.name()).collect(),
            Attribute::Position => Position::ALL.iter().map(|x| x.name()).collect(),
        };
        v.sort();
        v
    }

    /// The value of this attribute in `a`.
    pub fn of(self, a: &Attributes) -> &'static str {
        match self {
            Attribute::Shape => a.shape.name(),
            Attribute::Colour => a.colour.name(),
            Attribute::Size => a.size.name(),
            Attribute::Position => a.position.name(),
        }
    }
}

/// Disjoint parts of the set: images for the diffusion model, held-out images (and their
/// captions) for evaluation, and images for training the representation encoder. Each
/// split draws from its own hash stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Split {
    Train,
    Heldout,
    Encoder,
}

impl Split {
    fn salt(self) -> u64 {
        match self {
            Split::Train => 0x7472_6169_6e00,
            Split::Heldout => 0x6865_6c64_6f75,
            Split::Encoder => 0x656e_636f_6465,
        }
    }
}

/// One caption and the attributes it names (shape and colour always; size and
/// position are sometimes left out, so a caption can be matched only on what it says).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Caption {
    pub text: String,
    pub mentions: Vec<Attribute>,
}

/// What a generated image was asked to show; `None` fields are not checked.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Wanted {
    #[serde(default)]
    pub shape: Option<Shape>,
    #[serde(default)]
    pub colour: Option<Colour>,
    #[serde(default)]
    pub size: Option<Size>,
    #[serde(default)]
    pub position: Option<Position>,
}

impl From<&Attributes> for Wanted {
    fn from(a: &Attributes) -> Wanted {
        Wanted { shape: Some(a.shape), colour: Some(a.colour), size: Some(a.size), position: Some(a.position) }
    }
}

impl Wanted {
    /// `colour=white,size=large`: values by attribute name (the `--fix` flags); empty is none.
    pub fn parse(s: &str) -> Result<Wanted, String> {
        let mut w = Wanted::default();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (k, v) = part.split_once('=').ok_or_else(|| format!("{part:?}: expected attribute=value"))?;
            if Attribute::ALL.iter().any(|a| a.name() == k && w.has(*a)) {
                return Err(format!("{part:?}: {k} is given twice"));
            }
            let bad = || format!("{part:?}: {v:?} is not a {k}");
            match k {
                "shape" => w.shape = Some(Shape::parse(v).ok_or_else(bad)?),
                "colour" => w.colour = Some(Colour::parse(v).ok_or_else(bad)?),
                "size" => w.size = Some(Size::parse(v).ok_or_else(bad)?),
                "position" => w.position = Some(Position::parse(v).ok_or_else(bad)?),
                _ => return Err(format!("{part:?}: no attribute {k:?} (shape, colour, size, position)")),
            }
        }
        Ok(w)
    }

    /// `parse` for a command-line flag: a bad value is an input error naming the flag.
    pub fn parse_flag(flag: &str, s: &str) -> anyhow::Result<Wanted> {
        Wanted::parse(s).map_err(|e| crate::error::bad_input(format!("{flag} {e}")))
    }

    /// Whether `attribute` has a value here.
    pub fn has(&self, attribute: Attribute) -> bool {
        match attribute {
            Attribute::Shape => self.shape.is_some(),
            Attribute::Colour => self.colour.is_some(),
            Attribute::Size => self.size.is_some(),
            Attribute::Position => self.position.is_some(),
        }
    }

    /// These values without the attributes `other` has.
    pub fn without(&self, other: &Wanted) -> Wanted {
        Wanted {
            shape: self.shape.filter(|_| other.shape.is_none()),
            colour: self.colour.filter(|_| other.colour.is_none()),
            size: self.size.filter(|_| other.size.is_none()),
            position: self.position.filter(|_| other.position.is_none()),
        }
    }
}

impl Caption {
    /// The attributes of `a` that this caption names.
    pub fn wanted(&self, a: &Attributes) -> Wanted {
        let m = |x| self.mentions.contains(&x);
        Wanted {
            shape: m(Attribute::Shape).then_some(a.shape),
            colour: m(Attribute::Colour).then_some(a.colour),
            size: m(Attribute::Size).then_some(a.size),
            position: m(Attribute::Position).then_some(a.position),
        }
    }
}

/// How a set is drawn.
#[derive(Clone, Copy, Debug)]
pub struct SetSpec {
    /// Image side in pixels (16 or more).
    pub size: u32,
    pub split: Split,
    pub seed: u64,
    pub class_attribute: Attribute,
    pub per_class: u32,
    pub captions_per_image: u32,
    /// Attributes every image shares (the rest vary): a simpler world for small budgets.
    /// Images keep the keys, so an attribute left free is drawn as without `fixed`.
    pub fixed: Wanted,
}

/// One image of the set with everything said about it.
pub struct Item {
    /// `class/imgNNNNN` (the PNG and the caption file add `.png` / `.txt`).
    pub stem: String,
    pub class: &'static str,
    pub attributes: Attributes,
    pub captions: Vec<Caption>,
    pub image: image::RgbImage,
}

fn pick<T: Copy>(xs: &[T], h: u64) -> T {
    xs[(h % xs.len() as u64) as usize]
}

/// The key of image `k` of class value `c` (index into `Attribute::values`).
fn key(spec: &SetSpec, c: usize, k: u32) -> u64 {
    hash(hash(hash(spec.seed ^ spec.split.salt()) ^ c as u64) ^ k as u64)
}

/// The attributes of the image keyed `key` whose class attribute has value `class`.
fn draw_attributes(key: u64, class_attribute: Attribute, class: &str, fixed: &Wanted) -> Attributes {
    let r = |i: u64| hash(key ^ (i << 56));
    let mut a = Attributes {
        shape: pick(Shape::ALL, r(1)),
        colour: pick(Colour::ALL, r(2)),
        size: pick(Size::ALL, r(3)),
        position: pick(Position::ALL, r(4)),
    };
    a.shape = fixed.shape.unwrap_or(a.shape);
    a.colour = fixed.colour.unwrap_or(a.colour);
    a.size = fixed.size.unwrap_or(a.size);
    a.position = fixed.position.unwrap_or(a.position);
    match class_attribute {
        Attribute::Shape => a.shape = Shape::parse(class).expect("a shape"),
        Attribute::Colour => a.colour = Colour::parse(class).expect("a colour"),
        Attribute::Size => a.size = Size::parse(class).expect("a size"),
        Attribute::Position => a.position = Position::parse(class).expect("a position"),
    }
    a
}

/// Where and how big the shape of an image keyed `key` is drawn, in pixels.
struct Placement {
    cx: f32,
    cy: f32,
    rad: f32,
}

impl Placement {
    fn of(a: &Attributes, side: u32, key: u64) -> Placement {
        let r = |i: u64| hash(key ^ (i << 48) ^ 0x5A5E);
        let s = side as f32;
        let (right, bottom) = a.position.halves();
        // Centres near the middle of their quadrant (0.28 or 0.72 of the side, ±0.03).
        let centre = |far: bool, h: u64| s * (if far { 0.72 } else { 0.28 } + (unit(h) - 0.5) * 0.06);
        let (cx, cy) = (centre(right, r(1)), centre(bottom, r(2)));
        let rad = s * (a.size.radius() + (unit(r(3)) - 0.5) * 0.02);
        Placement { cx, cy, rad }
    }

    /// Whether pixel (x, y) is part of the shape.
    fn covers(&self, shape: Shape, x: u32, y: u32) -> bool {
        let (dx, dy, rad) = (x as f32 + 0.5 - self.cx, y as f32 + 0.5 - self.cy, self.rad);
        let d = (dx * dx + dy * dy).sqrt();
        match shape {
            Shape::Disc => d < rad,
            Shape::Square => dx.abs() < rad * 0.9 && dy.abs() < rad * 0.9,
            // Apex up: the half-width grows from 0 at the top to rad at the base.
            Shape::Triangle => dy > -rad && dy < rad && dx.abs() < (dy + rad) * 0.5,
            Shape::Ring => d < rad && d > rad * 0.5,
            Shape::Cross => dx.abs().max(dy.abs()) < rad && dx.abs().min(dy.abs()) < rad * 0.35,
        }
    }
}

/// Draws `a` at `side` x `side` pixels; `key` decides the jitter and the noise.
pub fn render(a: &Attributes, side: u32, key: u64) -> image::RgbImage {
    let r = |i: u64| hash(key ^ (i << 48) ^ 0x5A5E);
    let place = Placement::of(a, side, key);
    let fg = a.colour.rgb().map(|v| v as i32);
    let tint = [r(4), r(5), r(6)].map(|h| (h % 25) as i32 - 12);
    let bg = [r(7), r(8), r(9)].map(|h| 10 + (h % 36) as i32);
    image::RgbImage::from_fn(side, side, |x, y| {
        let inside = place.covers(a.shape, x, y);
        let n = hash(r(10) ^ ((x as u64) << 20) ^ y as u64);
        let px: [u8; 3] = std::array::from_fn(|i| {
            let noise = ((n >> (8 * i)) % 13) as i32 - 6;
            let v = if inside { fg[i] + tint[i] } else { bg[i] };
            (v + noise).clamp(0, 255) as u8
        });
        image::Rgb(px)
    })
}

/// The shape's pixels of the image `render(a, side, key)` draws, row by row.
pub fn mask(a: &Attributes, side: u32, key: u64) -> Vec<bool> {
    let place = Placement::of(a, side, key);
    (0..side).flat_map(|y| (0..side).map(move |x| (x, y))).map(|(x, y)| place.covers(a.shape, x, y)).collect()
}

/// Whether a pixel of a rendered image belongs to the shape, read from its value alone:
/// the background is at most 45 + 6 in every channel, and every colour has a channel of
/// at least 190 - 12 - 6 = 172 (green's, with the tint and the noise against it), so the
/// brightest channel splits them with 60 levels to spare on either side. Exact on
/// unaltered renders (the unit test checks it against `mask`); the encoder's patch
/// targets come from it, as a set on disk keeps no render keys.
pub fn is_foreground(px: [u8; 3]) -> bool {
    px.into_iter().max().unwrap_or(0) >= 112
}

fn shape_words(s: Shape) -> &'static [&'static str] {
    match s {
        Shape::Disc => &["disc", "circle", "filled circle", "round disc"],
        Shape::Square => &["square", "box", "block"],
        Shape::Triangle => &["triangle", "upward triangle", "triangular shape"],
        Shape::Ring => &["ring", "hollow circle", "donut"],
        Shape::Cross => &["cross", "plus sign", "plus shape"],
    }
}

fn colour_words(c: Colour) -> &'static [&'static str] {
    match c {
        Colour::Red => &["red", "scarlet"],
        Colour::Green => &["green"],
        Colour::Blue => &["blue"],
        Colour::Yellow => &["yellow"],
        Colour::Magenta => &["magenta", "pink"],
        Colour::Cyan => &["cyan", "turquoise"],
        Colour::White => &["white"],
    }
}

fn size_words(s: Size) -> &'static [&'static str] {
    match s {
        Size::Small => &["small", "little", "tiny"],
        Size::Large => &["large", "big"],
    }
}

/// "in the top left", "at the upper right corner", ...
fn position_phrase(p: Position, h: u64) -> String {
    let (right, bottom) = p.halves();
    let v = pick(if bottom { &["bottom", "lower"][..] } else { &["top", "upper"][..] }, h);
    let hz = if right { "right" } else { "left" };
    let prep = pick(&["in the", "at the"], h >> 8);
    match (h >> 16) % 3 {
        0 => format!("{prep} {v} {hz}"),
        1 => format!("{prep} {v} {hz} corner"),
        _ => format!("{prep} {v}-{hz} corner"),
    }
}

/// A caption of `a` in one of several wordings; `h` chooses the template, the synonyms
/// and whether size (1 in 4) and position (1 in 4) are left out.
pub fn caption(a: &Attributes, h: u64) -> Caption {
    let r = |i: u64| hash(h ^ (i << 40));
    let with_size = r(1) % 4 != 0;
    let with_pos = r(2) % 4 != 0;
    let shape = pick(shape_words(a.shape), r(3));
    let colour = pick(colour_words(a.colour), r(4));
    let size = if with_size { format!("{} ", pick(size_words(a.size), r(5))) } else { String::new() };
    let pos = if with_pos { position_phrase(a.position, r(6)) } else { String::new() };
    let text = match (r(7) % 6, with_pos) {
        (0, true) => format!("a {size}{colour} {shape} {pos}"),
        (1, true) => format!("{pos} there is a {size}{colour} {shape}"),
        (2, true) => format!("there is a {size}{colour} {shape} {pos}"),
        (3, true) => format!("a {size}{colour} {shape} on a dark background, {pos}"),
        (4, true) => format!("{size}{colour} {shape}, {pos}"),
        (_, true) => format!("an image of a {size}{colour} {shape} {pos}"),
        (0 | 1, false) => format!("a {size}{colour} {shape}"),
        (2 | 3, false) => format!("a {size}{colour} {shape} on a dark background"),
        (_, false) => format!("an image of a {size}{colour} {shape}"),
    };
    let mut mentions = vec![Attribute::Shape, Attribute::Colour];
    if with_size {
        mentions.push(Attribute::Size);
    }
    if with_pos {
        mentions.push(Attribute::Position);
    }
    Caption { text, mentions }
}

/// Image `k` of the class with value index `c` (into `spec.class_attribute.values()`).
pub fn item(spec: &SetSpec, c: usize, k: u32) -> Item {
    let class = spec.class_attribute.values()[c];
    let key = key(spec, c, k);
    let attributes = draw_attributes(key, spec.class_attribute, class, &spec.fixed);
    let image = render(&attributes, spec.size, key);
    // Distinct captions where the wordings allow (a few retries, then accept a repeat).
    let mut captions: Vec<Caption> = Vec::new();
    let mut i = 0u64;
    while captions.len() < spec.captions_per_image as usize {
        let c = caption(&attributes, hash(key ^ 0xCA97 ^ (i << 32)));
        i += 1;
        if i > 8 * spec.captions_per_image as u64 || !captions.iter().any(|x| x.text == c.text) {
            captions.push(c);
        }
    }
    Item { stem: format!("{class}/img{k:05}"), class, attributes, captions, image }
}

/// Every item of the set, class by class.
pub fn items(spec: &SetSpec) -> impl Iterator<Item = Item> + '_ {
    let n = spec.class_attribute.values().len();
    (0..n).flat_map(move |c| (0..spec.per_class).map(move |k| item(spec, c, k)))
}

/// One line of `attributes.jsonl`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Record {
    /// The PNG, relative to the set's folder.
    pub file: String,
    pub class: String,
    #[serde(flatten)]
    pub attributes: Attributes,
    pub captions: Vec<Caption>,
}

/// Writes the set under `out`: `class/imgNNNNN.png`, its captions one a line in
/// `class/imgNNNNN.txt`, and `attributes.jsonl` (one `Record` per image). Returns the count.
pub fn write_set(out: &Path, spec: &SetSpec) -> Result<usize> {
    if spec.size < 16 {
        crate::bail_input!("--size: {} is below 16 pixels", spec.size);
    }
    if spec.captions_per_image == 0 {
        crate::bail_input!("--captions: at least one caption per image");
    }
    if spec.fixed.has(spec.class_attribute) {
        crate::bail_input!("--fix: the class attribute {} cannot be fixed", spec.class_attribute.name());
    }
    std::fs::create_dir_all(out).with_context(|| format!("{}: cannot create", out.display()))?;
    let jsonl = out.join("attributes.jsonl");
    let mut lines = std::io::BufWriter::new(std::fs::File::create(&jsonl).with_context(|| format!("{}: cannot create", jsonl.display()))?);
    let mut n = 0;
    for it in items(spec) {
        std::fs::create_dir_all(out.join(it.class))?;
        it.image.save(out.join(format!("{}.png", it.stem)))?;
        let text: String = it.captions.iter().map(|c| format!("{}\n", c.text)).collect();
        std::fs::write(out.join(format!("{}.txt", it.stem)), text)?;
        let rec = Record { file: format!("{}.png", it.stem), class: it.class.into(), attributes: it.attributes, captions: it.captions };
        writeln!(lines, "{}", serde_json::to_string(&rec)?)?;
        n += 1;
    }
    lines.flush()?;
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn class_values_are_sorted_and_parse_back() {
        for a in Attribute::ALL {
            let v = a.values();
            assert!(v.windows(2).all(|w| w[0] < w[1]), "{v:?}");
        }
        assert_eq!(Position::parse("bottom_right"), Some(Position::BottomRight));
        assert_eq!(serde_json::to_string(&Position::TopLeft).unwrap(), "\"top_left\"");
    }

    #[test]
    fn foreground_is_read_back_exactly_from_pixels() {
        for split in [Split::Train, Split::Encoder] {
            let spec = SetSpec {
                size: 32,
                split,
                seed: 3,
                class_attribute: Attribute::Colour,
                per_class: 30,
                captions_per_image: 1,
                fixed: Wanted::default(),
            };
            for (c, k) in (0..7).flat_map(|c| (0..30).map(move |k| (c, k))) {
                let it = item(&spec, c, k);
                let want = mask(&it.attributes, spec.size, key(&spec, c, k));
                let got: Vec<bool> = it.image.pixels().map(|p| is_foreground(p.0)).collect();
                assert!(want.iter().any(|&m| m), "{}: empty shape", it.stem);
                assert_eq!(got, want, "{}", it.stem);
            }
        }
    }

    #[test]
    fn captions_name_what_they_mention() {
        let a = Attributes { shape: Shape::Ring, colour: Colour::Cyan, size: Size::Large, position: Position::BottomLeft };
        for h in 0..200 {
            let c = caption(&a, hash(h));
            assert!(shape_words(a.shape).iter().any(|w| c.text.contains(w)), "{}", c.text);
            assert!(colour_words(a.colour).iter().any(|w| c.text.contains(w)), "{}", c.text);
            assert_eq!(c.mentions.contains(&Attribute::Size), size_words(a.size).iter().any(|w| c.text.contains(w)), "{}", c.text);
            let pos = c.text.contains("left") && (c.text.contains("bottom") || c.text.contains("lower"));
            assert_eq!(c.mentions.contains(&Attribute::Position), pos, "{}", c.text);
        }
    }
}
