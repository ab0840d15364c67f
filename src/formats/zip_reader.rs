//! The one reader of zip archives (torch.save files, npz, EDM2/REG dataset zips): the
//! `zip` crate reads the central directory; stored entries are then located in the file
//! and read or mapped in place, deflated ones inflated under a bound.

use crate::bail_input;
use crate::error::bad_input;
use anyhow::Result;
use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// What the central directory says of one file entry.
#[derive(Clone, Copy, Debug)]
struct Entry {
    /// File offset of its first data byte (after the local header).
    data_start: u64,
    size: u64,
    compressed_size: u64,
    method: zip::CompressionMethod,
    encrypted: bool,
}

/// An archive whose directory has been read once; entries are then reached by name.
pub struct ZipReader {
    path: PathBuf,
    /// Mapped for stored entries.
    file: File,
    /// The directory as the `zip` crate read it (deflated entries are inflated through it).
    zip: zip::ZipArchive<File>,
    len: u64,
    entries: BTreeMap<String, Entry>,
}

impl ZipReader {
    /// Opens `path`; `kind` names what it should be in the message of a file that is no
    /// zip archive ("an .npz archive").
    pub fn open(path: &Path, kind: &str) -> Result<ZipReader> {
        let shown = path.display();
        let file = File::open(path).map_err(|e| bad_input(format!("{shown}: cannot open: {e}")))?;
        ZipReader::new(file, path, kind)
    }

    /// As `open`, over a file already open.
    pub fn new(file: File, path: &Path, kind: &str) -> Result<ZipReader> {
        let shown = path.display();
        let len = file.metadata().map_err(|e| bad_input(format!("{shown}: cannot stat: {e}")))?.len();
        let handle = file.try_clone().map_err(|e| bad_input(format!("{shown}: cannot open: {e}")))?;
        let mut z = zip::ZipArchive::new(handle).map_err(|e| bad_input(format!("{shown}: not {kind}: {e}")))?;
        let mut entries = BTreeMap::new();
        for i in 0..z.len() {
            let e = z.by_index_raw(i).map_err(|e| bad_input(format!("{shown}: entry {i}: {e}")))?;
            if e.is_dir() {
                continue;
            }
            let entry = Entry {
                data_start: e.data_start(),
                size: e.size(),
                compressed_size: e.compressed_size(),
                method: e.compression(),
                encrypted: e.encrypted(),
            };
            entries.insert(e.name().to_string(), entry);
        }
        Ok(ZipReader { path: path.to_path_buf(), file, zip: z, len, entries })
    }

    /// Entry names (files only), sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    fn entry(&self, name: &str) -> Result<Entry> {
        let shown = name.escape_debug();
        self.entries.get(name).copied().ok_or_else(|| bad_input(format!("{}: zip archive has no entry {shown}", self.path.display())))
    }

    /// Whether entry `name` is stored (not compressed).
    pub fn is_stored(&self, name: &str) -> Result<bool> {
        Ok(self.entry(name)?.method == zip::CompressionMethod::Stored)
    }

    /// The bytes of a stored entry in the file, checked against it: not compressed (else
    /// refused with `hint`, which says who stores entries), not encrypted, one size, inside
    /// the file. The sizes are the archive's word until checked here.
    pub fn stored(&self, name: &str, hint: &str) -> Result<Range<u64>> {
        let (file, shown) = (self.path.display(), name.escape_debug());
        let e = self.entry(name)?;
        if e.method != zip::CompressionMethod::Stored {
            bail_input!("{file}: entry {shown} is compressed ({}); {hint}", e.method);
        }
        if e.encrypted {
            bail_input!("{file}: entry {shown} is encrypted");
        }
        if e.compressed_size != e.size {
            bail_input!("{file}: corrupt zip archive (stored entry {shown} has two sizes)");
        }
        match e.data_start.checked_add(e.size).filter(|&end| end <= self.len) {
            Some(end) => Ok(e.data_start..end),
            None => bail_input!("{file}: entry {shown}: truncated file (its {} bytes run past the end)", e.size),
        }
    }

    /// The whole file mapped read-only, for stored entries read in place.
    pub fn map(&self) -> Result<memmap2::Mmap> {
        // SAFETY: read-only map of a file we do not write; a concurrent truncation by
        // another process is outside what any reader can defend against.
        unsafe { memmap2::Mmap::map(&self.file) }.map_err(|e| bad_input(format!("{}: cannot map: {e}", self.path.display())))
    }

    /// A compressed entry inflated into memory, but never past what the archive declares,
    /// and only if deflate could make that much from the stored bytes (at most 1032:1): a
    /// small file claiming terabytes is refused, not allocated.
    pub fn inflate(&mut self, name: &str) -> Result<Vec<u8>> {
        let e = self.entry(name)?;
        let (file, shown) = (self.path.display(), name.escape_debug());
        let (size, packed) = (e.size, e.compressed_size);
        if size > packed.saturating_mul(1032).saturating_add(1024) {
            bail_input!("{file}: {shown}: claims {size} bytes inflated from {packed}; deflate cannot, the archive is corrupt");
        }
        let mut r = self.zip.by_name(name).map_err(|e| bad_input(format!("{file}: {shown}: {e}")))?;
        let mut v = Vec::new();
        (&mut r).take(size).read_to_end(&mut v).map_err(|e| bad_input(format!("{file}: {shown}: {e}")))?;
        if v.len() as u64 != size {
            bail_input!("{file}: {shown}: {} bytes inflated, the archive declares {size}", v.len());
        }
        Ok(v)
    }
}
