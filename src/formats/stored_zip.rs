//! Zip archives of stored (uncompressed) entries, memory-mapped and read in place: how
//! EDM2/REG's `dataset_tools.py` writes a dataset when `--dest` ends in `.zip`.

use super::zip_reader::ZipReader;
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
        let zip = ZipReader::open(path, "a zip archive")?;
        let map = zip.map()?;
        let mut entries = BTreeMap::new();
        for name in zip.names() {
            let span = zip.stored(name, "the archive must store its entries, as dataset_tools.py does")?;
            // Inside the file, so inside the map.
            entries.insert(name.to_string(), span.start as usize..span.end as usize);
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
