//! NumPy `.npy` arrays and `.npz` archives (what REG/EDM2 and the ADM evaluator use):
//! little-endian u8, f32, f64 and i64 in C order; and a streaming `.npz` writer of u8 images.

use crate::error::bad_input;
use anyhow::Context;
use anyhow::Result;
use std::io::{Read, Write};
use std::path::Path;
use tch::{Kind, Tensor};

/// The header of one `.npy` buffer: element kind, shape and where the data starts.
fn header(bytes: &[u8], what: &str) -> Result<(Kind, Vec<i64>, usize)> {
    let bad = |why: &str| bad_input(format!("{what}: not a supported .npy array ({why})"));
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err(bad("magic"));
    }
    let (hlen, start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        _ if bytes.len() >= 12 => (u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize, 12),
        _ => return Err(bad("header")),
    };
    let header = std::str::from_utf8(bytes.get(start..start + hlen).ok_or_else(|| bad("header"))?).map_err(|_| bad("header"))?;
    if header.contains("'fortran_order': True") {
        return Err(bad("Fortran order"));
    }
    let descr = header.split("'descr': '").nth(1).and_then(|s| s.split('\'').next()).ok_or_else(|| bad("descr"))?;
    let kind = match descr {
        "|u1" | "<u1" => Kind::Uint8,
        "<f4" => Kind::Float,
        "<f8" => Kind::Double,
        "<i8" => Kind::Int64,
        d => return Err(bad(&format!("dtype {d}"))),
    };
    let shape_txt = header.split("'shape': (").nth(1).and_then(|s| s.split(')').next()).ok_or_else(|| bad("shape"))?;
    let shape: Vec<i64> = shape_txt
        .split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|s| s.trim().parse::<u32>().map(i64::from).map_err(|_| bad("shape")))
        .collect::<Result<_>>()?;
    // Sizes come from the file: counted without overflow before anything is sliced.
    let size = shape.iter().try_fold(kind.elt_size_in_bytes() as u64, |acc, &d| acc.checked_mul(d as u64)).ok_or_else(|| bad("shape"))?;
    let data = &bytes[start + hlen..];
    if data.len() as u64 != size {
        return Err(bad("truncated"));
    }
    Ok((kind, shape, start + hlen))
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
        let f = std::fs::File::open(path).map_err(|e| bad_input(format!("{file}: cannot open: {e}")))?;
        let mut z = zip::ZipArchive::new(&f).map_err(|e| bad_input(format!("{file}: not an .npz archive: {e}")))?;
        let mut e = match z.by_name(&format!("{name}.npy")) {
            Ok(e) => e,
            Err(zip::result::ZipError::FileNotFound) => return Ok(None),
            Err(e) => return Err(bad_input(format!("{file}: {name}: {e}"))),
        };
        let bytes = if e.compression() == zip::CompressionMethod::Stored {
            let (lo, len) = (e.data_start() as usize, e.size() as usize);
            // SAFETY: read-only map of a file we do not write; a concurrent truncation by
            // another process is outside what any reader can defend against.
            let map = unsafe { memmap2::Mmap::map(&f) }.map_err(|e| bad_input(format!("{file}: cannot map: {e}")))?;
            // The sizes are the archive's word: checked against the file before slicing.
            let Some(end) = lo.checked_add(len).filter(|&end| end <= map.len()) else {
                crate::bail_input!("{file}: {name}: truncated archive");
            };
            Backing::Mapped(map, lo..end)
        } else {
            let mut v = Vec::new();
            e.read_to_end(&mut v).map_err(|e| bad_input(format!("{file}: {name}: {e}")))?;
            Backing::Owned(v)
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
