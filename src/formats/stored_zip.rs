//! Zip archives of stored (uncompressed) entries, memory-mapped and read in place: how
//! EDM2/REG's `dataset_tools.py` writes a dataset when `--dest` ends in `.zip`.

use crate::bail_input;
use crate::error::bad_input;
use anyhow::Result;
use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// An archive opened once; each entry is a slice of the mapped file, so reading one
/// costs no copy and parallel readers share the map.
pub struct StoredZip {
    path: PathBuf,
    map: memmap2::Mmap,
    /// Entry name -> its bytes in `map`, in name order.
    entries: BTreeMap<String, Range<usize>>,
}

impl StoredZip {
    pub fn open(path: &Path) -> Result<StoredZip> {
        let file = path.display().to_string();
        let f = std::fs::File::open(path).map_err(|e| bad_input(format!("{file}: cannot open: {e}")))?;
        let mut z = zip::ZipArchive::new(&f).map_err(|e| bad_input(format!("{file}: not a zip archive: {e}")))?;
        // SAFETY: read-only map of a file we do not write; a concurrent truncation by
        // another process is outside what any reader can defend against.
        let map = unsafe { memmap2::Mmap::map(&f) }.map_err(|e| bad_input(format!("{file}: cannot map: {e}")))?;
        let mut entries = BTreeMap::new();
        for i in 0..z.len() {
            let e = z.by_index_raw(i).map_err(|e| bad_input(format!("{file}: entry {i}: {e}")))?;
            if e.is_dir() {
                continue;
            }
            let name = e.name().to_string();
            if e.compression() != zip::CompressionMethod::Stored {
                bail_input!(
                    "{file}: {name}: compressed ({}); the archive must store its entries, as dataset_tools.py does",
                    e.compression()
                );
            }
            // The sizes are the archive's word: checked against the file before slicing.
            let Some(span) = usize::try_from(e.data_start())
                .ok()
                .and_then(|lo| Some(lo..lo.checked_add(usize::try_from(e.size()).ok()?)?))
                .filter(|r| r.end <= map.len())
            else {
                bail_input!("{file}: {name}: truncated archive");
            };
            entries.insert(name, span);
        }
        Ok(StoredZip { path: path.to_path_buf(), map, entries })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Entry names (files only), sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    /// The bytes of entry `name`, if the archive has it.
    pub fn get(&self, name: &str) -> Option<&[u8]> {
        self.entries.get(name).map(|r| &self.map[r.clone()])
    }
}
