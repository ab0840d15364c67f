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

/// Writes tensors atomically: a temporary file in the same folder, fsync, rename,
/// fsync of the folder. A crash leaves either the old file or the new one.
pub fn write(path: &Path, tensors: &[(String, Tensor)], metadata: Option<HashMap<String, String>>) -> Result<()> {
    write_hashed(path, tensors, metadata).map(|_| ())
}

/// A tensor's memory as a safetensors view, without a copy.
struct HostView<'a> {
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: &'a [u8],
}

impl safetensors::View for HostView<'_> {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

/// As `write`, streaming: the tensors' memory goes to the file through a small buffer
/// (no serialised copy of the whole file in memory, which for a large checkpoint
/// shard would double the host memory of a save). Returns the file's SHA-256, read
/// back from what was written. The temporary file is removed on any failure.
pub fn write_hashed(path: &Path, tensors: &[(String, Tensor)], metadata: Option<HashMap<String, String>>) -> Result<[u8; 32]> {
    let host: Vec<Tensor> = tensors.iter().map(|(_, t)| t.to_device(tch::Device::Cpu).contiguous()).collect();
    let mut views = Vec::with_capacity(tensors.len());
    for ((name, _), t) in tensors.iter().zip(&host) {
        let Some(dtype) = dtype_of(t.kind()) else {
            anyhow::bail!("tensor {name}: dtype {:?} cannot be stored", t.kind());
        };
        let len = t.numel() * t.kind().elt_size_in_bytes();
        // SAFETY: `t` is a contiguous CPU tensor of `len` bytes that `host` keeps alive
        // and nothing writes while the views exist.
        let bytes = if len == 0 { &[][..] } else { unsafe { std::slice::from_raw_parts(t.data_ptr() as *const u8, len) } };
        views.push((name.clone(), HostView { dtype, shape: t.size().iter().map(|&d| d as usize).collect(), bytes }));
    }
    replace_atomically(path, |tmp| {
        safetensors::serialize_to_file(views, &metadata, tmp).with_context(|| format!("{}: write failed", tmp.display()))
    })
}

/// Makes `path` by `fill`ing a temporary file next to it, then fsync, hash, rename and
/// fsync of the folder; on failure the temporary file is removed and `path` untouched.
fn replace_atomically(path: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<[u8; 32]> {
    use sha2::Digest;
    use std::io::Read;
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create folder", dir.display()))?;
    let tmp = temp_name(path)?;
    let made = (|| -> Result<[u8; 32]> {
        fill(&tmp)?;
        let mut f = std::fs::File::open(&tmp).with_context(|| format!("{}: cannot reopen", tmp.display()))?;
        f.sync_all().with_context(|| format!("{}: fsync failed", tmp.display()))?;
        let mut hasher = sha2::Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = f.read(&mut buf).with_context(|| format!("{}: cannot read back", tmp.display()))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
        }
        std::fs::rename(&tmp, path).with_context(|| format!("{}: cannot rename into place", path.display()))?;
        Ok(hasher.finalize().into())
    })();
    if made.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    made
}

/// The temporary name `write_atomic` and `write_hashed` use for `path` in this process.
fn temp_name(path: &Path) -> Result<std::path::PathBuf> {
    let name = path.file_name().context("path has no file name")?.to_string_lossy();
    Ok(path.with_file_name(format!(".{name}.tmp-{}", std::process::id())))
}

/// Removes temporary files that earlier processes left for `path` (killed mid-write).
pub fn remove_stale_temps(path: &Path) {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else { return };
    let prefix = format!(".{}.tmp-", name.to_string_lossy());
    for e in std::fs::read_dir(if dir.as_os_str().is_empty() { Path::new(".") } else { dir }).into_iter().flatten().flatten() {
        if e.file_name().to_string_lossy().starts_with(&prefix) {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// Atomic replace of `path` by `bytes`.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    replace_atomically(path, |tmp| {
        let mut f = std::fs::File::create(tmp).with_context(|| format!("{}: cannot create", tmp.display()))?;
        f.write_all(bytes).with_context(|| format!("{}: write failed", tmp.display()))
    })
    .map(|_| ())
}
