//! NumPy `.npy` arrays and `.npz` archives (what REG/EDM2 and the ADM evaluator use):
//! little-endian u8, f32, f64 and i64 in C order; and a streaming `.npz` writer of u8 images.

use super::zip_reader::ZipReader;
use crate::error::bad_input;
use anyhow::Context;
use anyhow::Result;
use std::io::Write;
use std::path::Path;
use tch::{Kind, Tensor};

/// The header of one `.npy` buffer: element kind, shape and where the data starts. The
/// header is a Python dict literal; it is parsed as one (as numpy's `ast.literal_eval`
/// does), with exactly numpy's three keys, so that no spelling of `fortran_order: True`
/// or of a shape can be misread as something else. Sizes are checked against the
/// buffer before anything is sliced.
fn header(bytes: &[u8], what: &str) -> Result<(Kind, Vec<i64>, usize)> {
    let bad = |why: &str| bad_input(format!("{what}: not a supported .npy array ({why})"));
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err(bad("magic"));
    }
    let (hlen, start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 if bytes.len() >= 12 => (u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize, 12),
        2 | 3 => return Err(bad("truncated header")),
        v => return Err(bad(&format!("format version {v}"))),
    };
    let text = bytes.get(start..start + hlen).ok_or_else(|| bad("truncated header"))?;
    let text = std::str::from_utf8(text).map_err(|_| bad("header is not UTF-8"))?;
    let dict = HeaderDict::parse(text).map_err(|why| bad(&format!("header: {why}")))?;
    if dict.fortran_order {
        return Err(bad("Fortran order"));
    }
    let kind = match dict.descr.as_str() {
        "|u1" | "<u1" => Kind::Uint8,
        "<f4" => Kind::Float,
        "<f8" => Kind::Double,
        "<i8" => Kind::Int64,
        d => return Err(bad(&format!("dtype {}", d.escape_debug()))),
    };
    // Sizes come from the file: counted without overflow, in what libtorch can index.
    let size = dict
        .shape
        .iter()
        .try_fold(kind.elt_size_in_bytes() as u64, |acc, &d| acc.checked_mul(d))
        .filter(|&n| n <= i64::MAX as u64)
        .ok_or_else(|| bad("shape overflows"))?;
    let shape: Vec<i64> = dict.shape.iter().map(|&d| i64::try_from(d).map_err(|_| bad("shape overflows"))).collect::<Result<_>>()?;
    let data = &bytes[start + hlen..];
    if data.len() as u64 != size {
        return Err(bad(&format!("{} data bytes, the header's shape {shape:?} needs {size}", data.len())));
    }
    Ok((kind, shape, start + hlen))
}

/// The three entries of an `.npy` header.
struct HeaderDict {
    descr: String,
    fortran_order: bool,
    shape: Vec<u64>,
}

impl HeaderDict {
    /// `{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }` padded with spaces
    /// and a newline: Python literals, either quote, any spacing, a trailing comma.
    fn parse(text: &str) -> std::result::Result<HeaderDict, String> {
        let mut p = Lit { s: text.as_bytes(), at: 0 };
        p.expect(b'{')?;
        let (mut descr, mut fortran, mut shape) = (None, None, None);
        loop {
            if p.eat(b'}') {
                break;
            }
            let key = p.string()?;
            p.expect(b':')?;
            let dup = match key.as_str() {
                "descr" => descr.replace(p.string().map_err(|e| format!("descr: {e}"))?).is_some(),
                "fortran_order" => fortran.replace(p.boolean().map_err(|e| format!("fortran_order: {e}"))?).is_some(),
                "shape" => shape.replace(p.int_tuple().map_err(|e| format!("shape: {e}"))?).is_some(),
                other => return Err(format!("unexpected key {}", other.escape_debug())),
            };
            if dup {
                return Err(format!("key {key} repeated"));
            }
            if !p.eat(b',') {
                p.expect(b'}')?;
                break;
            }
        }
        p.skip_space();
        if p.at != p.s.len() {
            return Err("text after the dict".into());
        }
        Ok(HeaderDict {
            descr: descr.ok_or("no descr")?,
            fortran_order: fortran.ok_or("no fortran_order")?,
            shape: shape.ok_or("no shape")?,
        })
    }
}

/// A cursor over the few Python literals an `.npy` header holds.
struct Lit<'a> {
    s: &'a [u8],
    at: usize,
}

impl Lit<'_> {
    fn skip_space(&mut self) {
        while self.s.get(self.at).is_some_and(|c| c.is_ascii_whitespace()) {
            self.at += 1;
        }
    }

    fn eat(&mut self, c: u8) -> bool {
        self.skip_space();
        let hit = self.s.get(self.at) == Some(&c);
        self.at += hit as usize;
        hit
    }

    fn expect(&mut self, c: u8) -> std::result::Result<(), String> {
        if self.eat(c) {
            Ok(())
        } else {
            Err(format!("expected '{}' at byte {}", c as char, self.at))
        }
    }

    /// A quoted string without escapes (numpy's keys and dtype strings have none).
    fn string(&mut self) -> std::result::Result<String, String> {
        self.skip_space();
        let q =
            *self.s.get(self.at).filter(|&&q| q == b'\'' || q == b'"').ok_or_else(|| format!("expected a string at byte {}", self.at))?;
        let body = &self.s[self.at + 1..];
        let n = body.iter().position(|&c| c == q).ok_or("unterminated string")?;
        if body[..n].contains(&b'\\') {
            return Err("escape in a string".into());
        }
        self.at += n + 2;
        Ok(String::from_utf8_lossy(&body[..n]).into_owned())
    }

    fn boolean(&mut self) -> std::result::Result<bool, String> {
        self.skip_space();
        for (word, v) in [("True", true), ("False", false)] {
            if self.s[self.at..].starts_with(word.as_bytes()) {
                self.at += word.len();
                return Ok(v);
            }
        }
        Err(format!("expected True or False at byte {}", self.at))
    }

    /// `()`, `(n,)`, `(n, m)`, ...: non-negative integers.
    fn int_tuple(&mut self) -> std::result::Result<Vec<u64>, String> {
        self.expect(b'(')?;
        let mut dims = Vec::new();
        loop {
            // `()`, or the end after a trailing comma (`(n,)`).
            if self.eat(b')') {
                return Ok(dims);
            }
            self.skip_space();
            let n = self.s[self.at..].iter().take_while(|c| c.is_ascii_digit()).count();
            let digits = std::str::from_utf8(&self.s[self.at..self.at + n]).expect("ASCII digits");
            dims.push(digits.parse::<u64>().map_err(|_| format!("bad dimension at byte {}", self.at))?);
            self.at += n;
            // numpy under Python 2 wrote long integers as `3L`.
            if self.s.get(self.at) == Some(&b'L') {
                self.at += 1;
            }
            if !self.eat(b',') {
                self.expect(b')')?;
                // Python reads `(n)` as the number n, which numpy refuses as a shape.
                return if dims.len() == 1 { Err("(n) is not a tuple".into()) } else { Ok(dims) };
            }
        }
    }
}

/// Parses one `.npy` buffer; `what` names it in errors.
pub fn parse(bytes: &[u8], what: &str) -> Result<Tensor> {
    let (kind, shape, start) = header(bytes, what)?;
    Ok(Tensor::f_from_data_size(&bytes[start..], &shape, kind)?)
}

/// Reads a `.npy` file.
pub fn read_npy(path: &Path) -> Result<Tensor> {
    let bytes = std::fs::read(path).map_err(|e| bad_input(format!("{}: cannot read: {e}", path.display())))?;
    parse(&bytes, &path.display().to_string())
}

/// One array of an `.npz` whose rows are read on demand. `np.savez` stores arrays
/// uncompressed, so the array is memory-mapped and each rank touches only its own rows
/// (an ADM batch of 50K images is ~10 GB); a compressed one is inflated into memory.
pub struct NpzArray {
    bytes: Backing,
    /// Where the array's data starts in `bytes`.
    start: usize,
    pub kind: Kind,
    pub shape: Vec<i64>,
}

enum Backing {
    Mapped(memmap2::Mmap, std::ops::Range<usize>),
    Owned(Vec<u8>),
}

impl NpzArray {
    /// The array `name` (without `.npy`) of the archive, or `None` when it has none.
    pub fn open(path: &Path, name: &str) -> Result<Option<NpzArray>> {
        let file = path.display().to_string();
        let mut zip = ZipReader::open(path, "an .npz archive")?;
        let entry = format!("{name}.npy");
        if !zip.contains(&entry) {
            return Ok(None);
        }
        let bytes = if zip.is_stored(&entry)? {
            let span = zip.stored(&entry, "")?;
            // Inside the file, so inside the map.
            Backing::Mapped(zip.map()?, span.start as usize..span.end as usize)
        } else {
            // np.savez_compressed.
            Backing::Owned(zip.inflate(&entry)?)
        };
        let (kind, shape, start) = header(bytes.as_slice(), &format!("{file}: {name}"))?;
        Ok(Some(NpzArray { bytes, start, kind, shape }))
    }

    /// Rows `[lo, lo + n)` along the first axis, copied into a tensor. Panics on a 0-d
    /// array or rows outside it (callers check the shape first).
    pub fn rows(&self, lo: i64, n: i64) -> Tensor {
        let row: i64 = self.shape[1..].iter().product::<i64>() * self.kind.elt_size_in_bytes() as i64;
        assert!(lo >= 0 && n >= 0 && lo + n <= self.shape[0], "rows {lo}..+{n} of {}", self.shape[0]);
        let mut shape = self.shape.clone();
        shape[0] = n;
        let at = self.start + (lo * row) as usize;
        Tensor::f_from_data_size(&self.bytes.as_slice()[at..at + (n * row) as usize], &shape, self.kind).expect("sized above")
    }

    /// The whole array.
    pub fn load(&self) -> Tensor {
        match self.shape.first() {
            Some(&n) => self.rows(0, n),
            None => Tensor::f_from_data_size(&self.bytes.as_slice()[self.start..], &[], self.kind).expect("sized by header"),
        }
    }
}

impl Backing {
    fn as_slice(&self) -> &[u8] {
        match self {
            Backing::Mapped(m, r) => &m[r.clone()],
            Backing::Owned(v) => v,
        }
    }
}

/// Writes one u8 array `arr_0` of a known shape into an `.npz`, row by row, so that
/// 50K images never sit in memory at once. Stored (uncompressed, zip64), as `np.savez`
/// writes it and as `NpzArray` maps it; written under a temporary name and renamed on
/// `finish`, so a killed writer leaves no half archive.
pub struct NpzWriter {
    zip: zip::ZipWriter<std::io::BufWriter<std::fs::File>>,
    tmp: std::path::PathBuf,
    path: std::path::PathBuf,
}

impl NpzWriter {
    pub fn create(path: &Path, shape: &[u64]) -> Result<NpzWriter> {
        let tmp = path.with_extension("npz.tmp");
        let f = std::fs::File::create(&tmp).with_context(|| format!("{}: cannot create", tmp.display()))?;
        let mut zip = zip::ZipWriter::new(std::io::BufWriter::new(f));
        let opts = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored).large_file(true);
        zip.start_file("arr_0.npy", opts)?;
        let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
        let mut header = format!("{{'descr': '|u1', 'fortran_order': False, 'shape': ({}), }}", dims.join(", "));
        // Version 1.0 header: magic, version, u16 length; data aligned to 64 bytes.
        while (10 + header.len() + 1) % 64 != 0 {
            header.push(' ');
        }
        header.push('\n');
        zip.write_all(b"\x93NUMPY\x01\x00")?;
        zip.write_all(&(header.len() as u16).to_le_bytes())?;
        zip.write_all(header.as_bytes())?;
        Ok(NpzWriter { zip, tmp, path: path.to_path_buf() })
    }

    /// Appends the next rows' bytes, in C order.
    pub fn write(&mut self, bytes: &[u8]) -> Result<()> {
        Ok(self.zip.write_all(bytes)?)
    }

    /// Completes the archive and moves it into place.
    pub fn finish(self) -> Result<()> {
        self.zip.finish()?.flush()?;
        std::fs::rename(&self.tmp, &self.path).with_context(|| format!("{}: cannot rename into place", self.path.display()))?;
        Ok(())
    }
}
