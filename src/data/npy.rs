//! NumPy `.npy` arrays and `.npz` archives (what REG/EDM2 and the ADM evaluator use):
//! little-endian u8, f32, f64 and i64 in C order.

use crate::error::bad_input;
use anyhow::Result;
use std::io::Read;
use std::path::Path;
use tch::{Kind, Tensor};

/// Parses one `.npy` buffer; `what` names it in errors.
pub fn parse(bytes: &[u8], what: &str) -> Result<Tensor> {
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
    let shape: Vec<i64> =
        shape_txt.split(',').filter(|s| !s.trim().is_empty()).map(|s| s.trim().parse().map_err(|_| bad("shape"))).collect::<Result<_>>()?;
    let data = &bytes[start + hlen..];
    if data.len() != shape.iter().product::<i64>() as usize * kind.elt_size_in_bytes() {
        return Err(bad("truncated"));
    }
    Ok(Tensor::f_from_data_size(data, &shape, kind)?)
}

/// Reads a `.npy` file.
pub fn read_npy(path: &Path) -> Result<Tensor> {
    let bytes = std::fs::read(path).map_err(|e| bad_input(format!("{}: cannot read: {e}", path.display())))?;
    parse(&bytes, &path.display().to_string())
}

/// Reads the arrays of an `.npz` archive by name (without `.npy`), in file order.
pub fn read_npz(path: &Path) -> Result<Vec<(String, Tensor)>> {
    let file = path.display().to_string();
    let f = std::fs::File::open(path).map_err(|e| bad_input(format!("{file}: cannot open: {e}")))?;
    let mut z = zip::ZipArchive::new(f).map_err(|e| bad_input(format!("{file}: not an .npz archive: {e}")))?;
    let mut out = Vec::new();
    for i in 0..z.len() {
        let mut e = z.by_index(i).map_err(|e| bad_input(format!("{file}: {e}")))?;
        let name = e.name().trim_end_matches(".npy").to_string();
        let mut bytes = Vec::with_capacity(e.size() as usize);
        e.read_to_end(&mut bytes).map_err(|e| bad_input(format!("{file}: {name}: {e}")))?;
        out.push((name.clone(), parse(&bytes, &format!("{file}: {name}"))?));
    }
    Ok(out)
}
