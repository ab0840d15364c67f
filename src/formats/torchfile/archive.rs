//! The container of a `torch.save` file: a zip archive of stored entries (through the one
//! zip reader) or the legacy stream, and tensors as strided views of its storages, read
//! lazily.

use crate::error::{bad_input, first_line};
use crate::formats::zip_reader::ZipReader;
use anyhow::Result;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tch::{Kind, Tensor};

/// A tensor stored in the archive: a strided view of one storage entry.
#[derive(Clone)]
pub struct TensorRef {
    pub(super) storage: Arc<Storage>,
    pub(super) offset: i64,
    pub(super) size: Vec<i64>,
    pub(super) stride: Vec<i64>,
}

#[derive(Debug)]
pub(super) struct Storage {
    pub(super) archive: Arc<Archive>,
    /// The zip entry (`<top>/data/<key>`), for messages.
    pub(super) entry: String,
    /// Absolute file offset of the entry's first byte.
    pub(super) start: u64,
    pub(super) kind: Kind,
    pub(super) numel: i64,
}

impl std::fmt::Debug for TensorRef {
    // The archive's whole entry table is not worth printing with every tensor.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tensor({:?} {:?} in {})", self.storage.kind, self.size, self.storage.entry)
    }
}

impl TensorRef {
    pub fn kind(&self) -> Kind {
        self.storage.kind
    }

    pub fn size(&self) -> &[i64] {
        &self.size
    }

    /// Reads the tensor onto the CPU as a contiguous tensor. Only the bytes the view covers are read, so many
    /// views of one large storage do not read it many times.
    pub fn load(&self) -> Result<Tensor> {
        let s = &self.storage;
        let kind = s.kind;
        let Some(extent) = extent(&self.size, &self.stride) else {
            return Tensor::f_zeros(self.size.as_slice(), (kind, tch::Device::Cpu))
                .map_err(|e| s.archive.err(format!("{}: cannot build empty tensor: {}", s.entry, first_line(e))));
        };
        let elt = kind.elt_size_in_bytes() as u64;
        // Bounds were checked against the storage when the tensor was unpickled.
        let bytes = s.archive.read_at(s.start + self.offset as u64 * elt, (extent as u64 * elt) as usize, &s.entry)?;
        let flat = Tensor::f_from_data_size(&bytes, &[extent], kind)
            .map_err(|e| s.archive.err(format!("{}: cannot build tensor: {}", s.entry, first_line(e))))?;
        let view = flat
            .f_as_strided(self.size.as_slice(), self.stride.as_slice(), 0)
            .map_err(|e| s.archive.err(format!("{}: bad view: {}", s.entry, first_line(e))))?;
        Ok(view.contiguous())
    }
}

/// Elements spanned by a strided view from its first element, or `None` for an empty view. Sizes and strides
/// are known non-negative and the result known to fit (see `Vm::rebuild_tensor`).
pub(super) fn extent(size: &[i64], stride: &[i64]) -> Option<i64> {
    if size.contains(&0) {
        return None;
    }
    Some(1 + size.iter().zip(stride).map(|(&n, &s)| (n - 1) * s).sum::<i64>())
}

// ---------------------------------------------------------------------------------------------------------------
// The container. torch.save writes every zip entry STORED (uncompressed, 64-byte aligned) so tensors can be read
// in place; the legacy format is one stream.

const LOCAL_SIG: &[u8; 4] = b"PK\x03\x04";

pub(super) struct Archive {
    pub(super) path: PathBuf,
    pub(super) file: File,
    pub(super) len: u64,
    /// The zip directory; `None` for the legacy stream.
    pub(super) zip: Option<ZipReader>,
    /// The archive's single top folder with its slash (`archive/`, or the file's stem).
    pub(super) prefix: String,
    /// Not a zip: the pickle stream torch.save wrote before 1.6 (see `read_legacy`).
    pub(super) legacy: bool,
}

impl std::fmt::Debug for Archive {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Archive({})", self.path.display())
    }
}

impl Archive {
    /// The pickle's name in messages.
    pub(super) fn pickle_name(&self) -> &'static str {
        if self.legacy {
            "pickle"
        } else {
            "data.pkl"
        }
    }

    pub(super) fn err(&self, msg: impl std::fmt::Display) -> anyhow::Error {
        bad_input(format!("{}: {msg}", self.path.display()))
    }

    /// `len` bytes at `offset`; running past the end of the file is an input error (a truncated file).
    pub(super) fn read_at(&self, offset: u64, len: usize, what: &str) -> Result<Vec<u8>> {
        if offset.checked_add(len as u64).is_none_or(|end| end > self.len) {
            return Err(self.err(format!("{what}: truncated file (needs bytes {offset}..+{len}, the file has {})", self.len)));
        }
        let mut buf = vec![0u8; len];
        self.file.read_exact_at(&mut buf, offset).map_err(|e| self.err(format!("{what}: cannot read: {e}")))?;
        Ok(buf)
    }

    pub(super) fn open(path: &Path) -> Result<Archive> {
        let shown = path.display();
        let file = File::open(path).map_err(|e| bad_input(format!("{shown}: cannot open: {e}")))?;
        let len = file.metadata().map_err(|e| bad_input(format!("{shown}: cannot stat: {e}")))?.len();
        let mut a = Archive { path: path.to_path_buf(), file, len, zip: None, prefix: String::new(), legacy: false };
        let head = a.read_at(0, len.min(4) as usize, "header")?;
        if head.as_slice() != LOCAL_SIG {
            // Before 1.6 torch.save wrote a bare pickle stream (it starts with the PROTO opcode).
            if head.first() == Some(&0x80) {
                a.legacy = true;
                return Ok(a);
            }
            return Err(a.err("not a torch.save checkpoint (expected a zip archive)"));
        }
        let handle = a.file.try_clone().map_err(|e| a.err(format!("cannot open: {e}")))?;
        a.zip = Some(ZipReader::new(handle, path, "a torch.save checkpoint (a zip archive)")?);
        a.prefix = a.find_prefix()?;
        let byteorder = format!("{}byteorder", a.prefix);
        if a.zip.as_ref().is_some_and(|z| z.contains(&byteorder)) {
            let bytes = a.entry_bytes(&byteorder)?;
            let order = String::from_utf8_lossy(&bytes).trim().to_string();
            if order != "little" {
                return Err(a.err(format!("byteorder is '{}'; only little-endian checkpoints are read", order.escape_debug())));
            }
        }
        Ok(a)
    }

    /// The archive's top folder: torch.save puts everything under one folder whose name is free.
    pub(super) fn find_prefix(&self) -> Result<String> {
        let names = self.zip.iter().flat_map(|z| z.names());
        let mut tops: Vec<&str> =
            names.filter_map(|n| n.strip_suffix("data.pkl").filter(|p| p.ends_with('/') && p.matches('/').count() == 1)).collect();
        tops.sort();
        match tops.as_slice() {
            [one] => Ok(one.to_string()),
            [] => Err(self.err("not a torch.save checkpoint (no <folder>/data.pkl in the zip archive)")),
            _ => Err(self.err(format!("several data.pkl in the zip archive ({})", tops.join(", ").escape_debug()))),
        }
    }

    /// File offset and size of an entry's bytes.
    pub(super) fn entry_span(&self, name: &str) -> Result<(u64, u64)> {
        let Some(zip) = &self.zip else {
            return Err(self.err(format!("zip archive has no entry {}", name.escape_debug())));
        };
        let span = zip.stored(name, "torch.save stores entries uncompressed, re-save it with torch.save")?;
        Ok((span.start, span.end - span.start))
    }

    pub(super) fn entry_bytes(&self, name: &str) -> Result<Vec<u8>> {
        let (start, size) = self.entry_span(name)?;
        self.read_at(start, size as usize, name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extent_of_views() {
        assert_eq!(extent(&[2, 4], &[4, 1]), Some(8));
        assert_eq!(extent(&[4, 6], &[1, 4]), Some(24));
        assert_eq!(extent(&[], &[]), Some(1));
        assert_eq!(extent(&[3, 0], &[1, 1]), None);
    }
}
