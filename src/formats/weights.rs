//! Safetensors I/O, the only weight format we write or trust (pickles go through the
//! restricted `torchfile` reader). Errors name the file and tensor.

use crate::bail_input;
use crate::error::bad_input;
use anyhow::{Context, Result};
use safetensors::{Dtype, SafeTensors};
use std::collections::HashMap;
use std::io::Write;
use std::path::Path;
use tch::{Kind, Tensor};

fn kind_of(dtype: Dtype) -> Option<Kind> {
    Some(match dtype {
        Dtype::F64 => Kind::Double,
        Dtype::F32 => Kind::Float,
        Dtype::F16 => Kind::Half,
        Dtype::BF16 => Kind::BFloat16,
        Dtype::I64 => Kind::Int64,
        Dtype::I32 => Kind::Int,
        Dtype::U8 => Kind::Uint8,
        Dtype::I8 => Kind::Int8,
        Dtype::BOOL => Kind::Bool,
        _ => return None,
    })
}

fn dtype_of(kind: Kind) -> Option<Dtype> {
    Some(match kind {
        Kind::Double => Dtype::F64,
        Kind::Float => Dtype::F32,
        Kind::Half => Dtype::F16,
        Kind::BFloat16 => Dtype::BF16,
        Kind::Int64 => Dtype::I64,
        Kind::Int => Dtype::I32,
        Kind::Uint8 => Dtype::U8,
        Kind::Int8 => Dtype::I8,
        Kind::Bool => Dtype::BOOL,
        _ => return None,
    })
}

/// Reads every tensor of a safetensors file onto the CPU, in file order.
/// Missing, truncated or malformed files are input errors naming the file.
pub fn read(path: &Path) -> Result<Vec<(String, Tensor)>> {
    let file = path.display();
    let f = std::fs::File::open(path).map_err(|e| bad_input(format!("{file}: cannot open: {e}")))?;
    // SAFETY: the map is read-only and dropped before returning; tensors are copied out.
    let map = unsafe { memmap2::Mmap::map(&f) }.map_err(|e| bad_input(format!("{file}: cannot map: {e}")))?;
    let st = SafeTensors::deserialize(&map).map_err(|e| bad_input(format!("{file}: not a valid safetensors file: {e:?}")))?;
    let mut order: Vec<(usize, String)> = Vec::new();
    for (name, view) in st.tensors() {
        let offset = view.data().as_ptr() as usize - map.as_ptr() as usize;
        order.push((offset, name));
    }
    order.sort();
    let mut out = Vec::with_capacity(order.len());
    for (_, name) in order {
        let view = st.tensor(&name).expect("name listed by the file itself");
        let Some(kind) = kind_of(view.dtype()) else {
            bail_input!("{file}: tensor {name}: unsupported dtype {:?}", view.dtype());
        };
        // The safetensors crate checked the bytes against the shape as usize; libtorch needs the sizes (and
        // their product, even past a zero) to fit i64, or it throws.
        let shape =
            tensor_shape(view.shape()).ok_or_else(|| bad_input(format!("{file}: tensor {name}: shape {:?} overflows", view.shape())))?;
        let t = Tensor::f_from_data_size(view.data(), &shape, kind)
            .map_err(|e| bad_input(format!("{file}: tensor {name}: cannot build tensor: {}", crate::error::first_line(e))))?;
        out.push((name, t));
    }
    Ok(out)
}

/// A file's tensor shape as libtorch sizes: each and the product of the non-zero ones must fit an i64.
pub fn tensor_shape(shape: &[usize]) -> Option<Vec<i64>> {
    shape.iter().try_fold(1i64, |acc, &d| acc.checked_mul(i64::try_from(d.max(1)).ok()?))?;
    Some(shape.iter().map(|&d| d as i64).collect())
}

/// Reads into a map by name.
pub fn read_map(path: &Path) -> Result<HashMap<String, Tensor>> {
    Ok(read(path)?.into_iter().collect())
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// SHA-256 of `bytes` as hex: the checksum format of manifests and dataset indexes.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex(&sha2::Sha256::digest(bytes))
}

/// Raw little-endian bytes of a tensor (moved to the CPU, made contiguous).
pub fn tensor_bytes(t: &Tensor) -> Result<Vec<u8>> {
    let t = t.to_device(tch::Device::Cpu).contiguous();
    let kind = t.kind();
    let numel = t.numel();
    let mut buf = vec![0u8; numel * kind.elt_size_in_bytes()];
    t.f_copy_data_u8(&mut buf, numel)?;
    Ok(buf)
}

/// Writes tensors atomically: a temporary file in the same folder, fsync, rename,
/// fsync of the folder. A crash leaves either the old file or the new one.
pub fn write(path: &Path, tensors: &[(String, Tensor)], metadata: Option<HashMap<String, String>>) -> Result<()> {
    write_atomic(path, &serialize(tensors, metadata)?)
}

/// The safetensors bytes of `tensors` (copied to the host).
pub fn serialize(tensors: &[(String, Tensor)], metadata: Option<HashMap<String, String>>) -> Result<Vec<u8>> {
    let mut owned = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let Some(dtype) = dtype_of(t.kind()) else {
            anyhow::bail!("tensor {name}: dtype {:?} cannot be stored", t.kind());
        };
        let shape: Vec<usize> = t.size().iter().map(|&d| d as usize).collect();
        owned.push((name.clone(), dtype, shape, tensor_bytes(t)?));
    }
    let views: Vec<(String, safetensors::tensor::TensorView)> =
        owned.iter().map(|(n, d, s, b)| Ok((n.clone(), safetensors::tensor::TensorView::new(*d, s.clone(), b)?))).collect::<Result<_>>()?;
    Ok(safetensors::serialize(views, &metadata)?)
}

/// Atomic replace of `path` by `bytes`.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create folder", dir.display()))?;
    let name = path.file_name().context("path has no file name")?.to_string_lossy();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    {
        let mut f = std::fs::File::create(&tmp).with_context(|| format!("{}: cannot create", tmp.display()))?;
        f.write_all(bytes).with_context(|| format!("{}: write failed", tmp.display()))?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path).with_context(|| format!("{}: cannot rename into place", path.display()))?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}
