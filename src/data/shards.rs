//! The dataset format: a folder with `index.json` and `shard-NNNNN.safetensors` files of
//! a few thousand records each. Per shard: `latents [N, 8, h, w]` (VAE mean and std, f32
//! or bf16), `labels [N] i64`, and `features [N, T+1, Dz]` bf16 (encoder class token
//! first) and/or `images [N, 3, R, R] u8` (for online encoding). A captioned dataset
//! (`Index::text`) adds, per shard of N records and C captions, `caption_ids [C, L] i32`
//! and `caption_offsets [N+1] i64` (the captions of record r are rows
//! `[off[r], off[r+1])`), and when precomputed `caption_hidden [C, L, D]` and
//! `caption_pooled [C, D]` bf16. Shards are memory-mapped: reading a record touches only
//! its bytes.

use crate::bail_input;
use crate::error::bad_input;
use anyhow::{Context, Result};
use safetensors::{Dtype, SafeTensors};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

pub const FORMAT_VERSION: u32 = 1;

/// The file of a precomputed captioned dataset holding the null condition.
pub const NULL_CAPTION: &str = "null_caption.safetensors";

/// The encoder whose tokens a dataset holds.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EncoderInfo {
    pub name: String,
    /// Tokens per record, class token included (257 for DINOv2-B at 224 px).
    pub tokens: i64,
    pub z_dim: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ShardInfo {
    pub file: String,
    pub records: i64,
    pub sha256: String,
    /// Captions in the shard (rows of `caption_ids`); only in captioned datasets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub captions: Option<i64>,
}

/// The captions of a captioned dataset: how they were tokenized (and encoded).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TextInfo {
    /// Folder name of the tokenizer (the `--text-encoder` folder).
    pub tokenizer: String,
    /// SHA-256 of the tokenizer's files, read one after the other: `tokenizer.json`, or
    /// `vocab.json` then `merges.txt` where there is no `tokenizer.json`; then
    /// `tokenizer_config.json` when present (it sets the pad token and the length).
    pub tokenizer_sha256: String,
    /// Folder name of the CLIP text encoder.
    pub encoder: String,
    /// Tokens per caption, padded (L, 77 for CLIP).
    pub max_length: i64,
    /// Width of the text encoder's hidden states (D, `text_config.hidden_size`).
    pub hidden_size: i64,
    /// Whether shards hold `caption_hidden` and `caption_pooled`.
    pub precomputed: bool,
    /// Captions in the whole dataset.
    pub captions: i64,
}

/// `index.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Index {
    pub format_version: u32,
    /// Image side in pixels (256 or 512).
    pub resolution: i64,
    /// Shape of one record's `latents`: `[2C, h, w]` (mean and std).
    pub latent_shape: Vec<i64>,
    /// `f32` or `bf16`.
    pub latent_dtype: String,
    pub vae: String,
    pub encoder: Option<EncoderInfo>,
    /// Whether shards hold `features` / `images`.
    pub features: bool,
    pub images: bool,
    pub class_names: Vec<String>,
    pub shards: Vec<ShardInfo>,
    /// Images that could not be read (listed in `bad_images_report`).
    #[serde(default)]
    pub bad_images: i64,
    #[serde(default)]
    pub bad_images_report: Option<String>,
    /// Captions, for text conditioning; absent in class-labelled datasets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<TextInfo>,
}

impl Index {
    /// What `index.json` must say before any shard is opened: sizes that can describe a
    /// tensor, dtypes the loader reads, and shard names inside the folder (a name like
    /// `../x` or `/dev/stdin` would read some other file, or block on a pipe).
    /// Errors are (field, why).
    fn check(&self) -> std::result::Result<(), (String, String)> {
        let bad = |field: &str, why: String| Err((field.to_string(), why));
        if self.latent_shape.len() != 3 || self.latent_shape.iter().any(|&d| d <= 0) {
            return bad("latent_shape", format!("{:?}, expected [2C, h, w] of positive sizes", self.latent_shape));
        }
        if !matches!(self.latent_dtype.as_str(), "f32" | "bf16") {
            return bad("latent_dtype", format!("{}, expected f32 or bf16", self.latent_dtype.escape_debug()));
        }
        if !self.features && !self.images {
            return bad("features/images", "a dataset needs encoder features or images".into());
        }
        if self.images && self.resolution <= 0 {
            return bad("resolution", format!("{} with images stored", self.resolution));
        }
        if self.features {
            match &self.encoder {
                None => return bad("encoder", "missing, and features: true".into()),
                Some(e) if e.tokens <= 0 || e.z_dim <= 0 => {
                    return bad("encoder", format!("tokens {} and z_dim {} must be positive", e.tokens, e.z_dim))
                }
                Some(_) => {}
            }
        }
        for (i, s) in self.shards.iter().enumerate() {
            let plain = Path::new(&s.file).file_name().is_some_and(|n| n == s.file.as_str());
            if !plain {
                return bad(
                    &format!("shards[{i}].file"),
                    format!("{} is not a file name inside the dataset folder", s.file.escape_debug()),
                );
            }
            if s.records < 0 {
                return bad(&format!("shards[{i}].records"), format!("{} is negative", s.records));
            }
            match (&self.text, s.captions) {
                (None, Some(_)) => return bad(&format!("shards[{i}].captions"), "present, and index.json has no text".into()),
                (Some(_), None) => return bad(&format!("shards[{i}].captions"), "missing in a captioned dataset".into()),
                // Every record has at least one caption.
                (Some(_), Some(c)) if c < s.records => {
                    return bad(&format!("shards[{i}].captions"), format!("{c}, fewer than its {} records", s.records))
                }
                _ => {}
            }
        }
        if let Some(t) = &self.text {
            if t.max_length < 2 || t.hidden_size <= 0 {
                return bad(
                    "text",
                    format!("max_length {} and hidden_size {} must be at least 2 and positive", t.max_length, t.hidden_size),
                );
            }
            let sum = self.shards.iter().try_fold(0i64, |acc, s| acc.checked_add(s.captions.unwrap_or(0)));
            if sum != Some(t.captions) {
                return bad("text.captions", format!("{}, while the shards hold {sum:?}", t.captions));
            }
            if t.tokenizer_sha256.len() != 64 || !t.tokenizer_sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
                return bad("text.tokenizer_sha256", format!("{} is not a SHA-256 in hex", t.tokenizer_sha256.escape_debug()));
            }
        }
        Ok(())
    }

    pub fn records(&self) -> i64 {
        self.shards.iter().map(|s| s.records).sum()
    }
    pub fn num_classes(&self) -> i64 {
        self.class_names.len() as i64
    }
}

pub fn shard_name(i: usize) -> String {
    format!("shard-{i:05}.safetensors")
}

/// One memory-mapped shard; its SHA-256 is checked the first time it is read.
pub struct Shard {
    pub path: PathBuf,
    pub records: i64,
    /// Rows of `caption_ids` (0 without captions).
    pub captions: i64,
    sha256: String,
    map: OnceLock<Result<memmap2::Mmap, String>>,
    /// Where each tensor's data sits in the file (from the header).
    fields: Vec<(String, Field)>,
}

/// Byte ranges of the tensors of one shard, for slicing rows (records, or captions).
#[derive(Clone, Copy, Debug)]
struct Field {
    offset: usize,
    bytes_per_row: usize,
}

/// An opened dataset: index plus its shards.
pub struct Dataset {
    pub dir: PathBuf,
    pub index: Index,
    pub shards: Vec<Arc<Shard>>,
    /// Global record index -> (shard, row), via the cumulative record counts.
    starts: Vec<i64>,
    pub verify_checksums: bool,
}

fn dtype_name(d: Dtype) -> &'static str {
    match d {
        Dtype::F32 => "f32",
        Dtype::BF16 => "bf16",
        Dtype::U8 => "u8",
        Dtype::I64 => "i64",
        Dtype::I32 => "i32",
        _ => "other",
    }
}

impl Dataset {
    /// Opens `dir/index.json` and checks every shard's header against it (shapes,
    /// dtypes, record counts; a truncated file fails here). Checksums are verified
    /// lazily, when a shard is first read, unless `verify_checksums` is false.
    pub fn open(dir: &Path, verify_checksums: bool) -> Result<Dataset> {
        let ipath = dir.join("index.json");
        let text = std::fs::read_to_string(&ipath).map_err(|e| bad_input(format!("{}: cannot read: {e}", ipath.display())))?;
        let index: Index = serde_path_to_error::deserialize(&mut serde_json::Deserializer::from_str(&text))
            .map_err(|e| bad_input(format!("{}: {}: {}", ipath.display(), e.path(), e.inner())))?;
        if index.format_version != FORMAT_VERSION {
            bail_input!("{}: format_version: {} (this build reads {FORMAT_VERSION})", ipath.display(), index.format_version);
        }
        index.check().map_err(|(field, why)| bad_input(format!("{}: {field}: {why}", ipath.display())))?;
        let mut shards = Vec::new();
        let mut starts = vec![0];
        for s in &index.shards {
            let path = dir.join(&s.file);
            let captions = s.captions.unwrap_or(0);
            let mut shard =
                Shard { path, records: s.records, captions, sha256: s.sha256.clone(), map: OnceLock::new(), fields: Vec::new() };
            shard.fields = shard.check_header(&index)?;
            // Each count matched its shard's tensors, so the sum is bounded by the files' sizes.
            starts.push(starts.last().unwrap() + s.records);
            shards.push(Arc::new(shard));
        }
        Ok(Dataset { dir: dir.to_path_buf(), index, shards, starts, verify_checksums })
    }

    pub fn len(&self) -> i64 {
        *self.starts.last().unwrap()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// (shard, row) of a global record index.
    pub fn locate(&self, i: i64) -> (usize, i64) {
        let s = self.starts.partition_point(|&x| x <= i) - 1;
        (s, i - self.starts[s])
    }

    /// The bytes of record `row` of tensor `name` in shard `s`.
    pub fn record_bytes(&self, s: usize, name: &str, row: i64) -> Result<&[u8]> {
        self.rows_bytes(s, name, row, 1)
    }

    /// Asks the kernel to start reading record `row` of tensor `name` in shard `s` now
    /// (`madvise(MADV_WILLNEED)`): a batch's scattered records are then read from disk
    /// at once instead of one page fault after another. Advice only: a shard not yet
    /// mapped (and checked, on first touch) is left to the copy, errors are ignored.
    pub fn will_need(&self, s: usize, name: &str, row: i64) {
        if let (Some(Ok(map)), Ok(range)) = (self.shards[s].map.get(), self.field_range(s, name, row, 1)) {
            if range.end <= map.len() {
                let _ = map.advise_range(memmap2::Advice::WillNeed, range.start, range.len());
            }
        }
    }

    /// Where rows `[row, row + count)` of tensor `name` sit in shard `s`'s file.
    fn field_range(&self, s: usize, name: &str, row: i64, count: i64) -> Result<std::ops::Range<usize>> {
        let shard = &self.shards[s];
        let Some((_, f)) = shard.fields.iter().find(|(n, _)| n == name) else {
            bail_input!("{}: tensor {name}: missing", shard.path.display());
        };
        let lo = f.offset + f.bytes_per_row * row as usize;
        Ok(lo..lo + f.bytes_per_row * count as usize)
    }

    /// The bytes of rows `[row, row + count)` of tensor `name` in shard `s` (rows along
    /// its first dimension: records, or captions for `caption_*`).
    pub fn rows_bytes(&self, s: usize, name: &str, row: i64, count: i64) -> Result<&[u8]> {
        let shard = &self.shards[s];
        let map = shard.mapped(self.verify_checksums)?;
        let range = self.field_range(s, name, row, count)?;
        // The header was checked at open; a file replaced since then (unverified) may be shorter.
        map.get(range).ok_or_else(|| bad_input(format!("{}: tensor {name}: file shorter than its header says", shard.path.display())))
    }

    /// The captions of record `row` of shard `s`: rows `[a, b)` of its `caption_ids`, from
    /// `caption_offsets`, checked to be a non-empty range inside the shard.
    pub fn caption_range(&self, s: usize, row: i64) -> Result<(i64, i64)> {
        let b = self.rows_bytes(s, "caption_offsets", row, 2)?;
        let at = |k: usize| i64::from_le_bytes(b[8 * k..8 * k + 8].try_into().expect("8 bytes"));
        let (lo, hi) = (at(0), at(1));
        let c = self.shards[s].captions;
        if !(0 <= lo && lo < hi && hi <= c) {
            bail_input!(
                "{}: caption_offsets[{row}..={}] = [{lo}, {hi}] is not a non-empty range of its {c} captions",
                self.shards[s].path.display(),
                row + 1
            );
        }
        Ok((lo, hi))
    }

    /// The null condition of a precomputed captioned dataset, `null_caption.safetensors`:
    /// the text encoder's output for the empty caption "", (hidden [1, L, D], pooled
    /// [1, D]) f32. `None` when the dataset holds no precomputed captions.
    pub fn null_caption(&self) -> Result<Option<(tch::Tensor, tch::Tensor)>> {
        let Some(t) = self.index.text.as_ref().filter(|t| t.precomputed) else {
            return Ok(None);
        };
        let path = self.dir.join(NULL_CAPTION);
        let mut m = crate::formats::weights::read_map(&path)?;
        let mut take = |name: &str, shape: Vec<i64>| -> Result<tch::Tensor> {
            let v = m.remove(name).ok_or_else(|| bad_input(format!("{}: tensor {name}: missing", path.display())))?;
            if v.size() != shape || v.kind() != tch::Kind::Float {
                bail_input!("{}: tensor {name}: {:?} {:?}, index.json says f32 {shape:?}", path.display(), v.kind(), v.size());
            }
            Ok(v)
        };
        let hidden = take("hidden", vec![1, t.max_length, t.hidden_size])?;
        let pooled = take("pooled", vec![1, t.hidden_size])?;
        Ok(Some((hidden, pooled)))
    }
}

impl Shard {
    /// The mapped file; the first call checks the SHA-256, unless this machine has
    /// already checked the same file (`verify::check_once`). Pages are faulted in as
    /// records are read: a rank touches only its own rows.
    fn mapped(&self, verify: bool) -> Result<&memmap2::Mmap> {
        let r = self.map.get_or_init(|| {
            let f = std::fs::File::open(&self.path).map_err(|e| format!("{}: cannot open: {e}", self.path.display()))?;
            // SAFETY: shards are written once (atomically) and never modified in place.
            let map = unsafe { memmap2::Mmap::map(&f) }.map_err(|e| format!("{}: cannot map: {e}", self.path.display()))?;
            if verify {
                super::verify::check_once(&self.path, &map, &self.sha256)?;
            }
            Ok(map)
        });
        r.as_ref().map_err(|e| bad_input(e.clone()))
    }

    /// The SHA-256 the index records for this shard.
    pub fn sha256(&self) -> &str {
        &self.sha256
    }

    /// Header-only check against the index (tensors, dtypes, shapes, record count);
    /// returns where each tensor's data sits.
    fn check_header(&self, index: &Index) -> Result<Vec<(String, Field)>> {
        let file = self.path.display();
        let f = std::fs::File::open(&self.path).map_err(|e| bad_input(format!("{file}: cannot open: {e}")))?;
        // SAFETY: read-only map, dropped at the end of this function.
        let map = unsafe { memmap2::Mmap::map(&f) }.map_err(|e| bad_input(format!("{file}: cannot map: {e}")))?;
        let st = SafeTensors::deserialize(&map).map_err(|e| bad_input(format!("{file}: not a valid shard (truncated?): {e:?}")))?;
        let n = self.records;
        let expect = |name: &str, dtype: &str, shape: Vec<i64>| -> Result<()> {
            let v = st.tensor(name).map_err(|_| bad_input(format!("{file}: tensor {name}: missing")))?;
            let got = crate::formats::weights::tensor_shape(v.shape())
                .ok_or_else(|| bad_input(format!("{file}: tensor {name}: shape {:?} overflows", v.shape())))?;
            if got != shape || dtype_name(v.dtype()) != dtype {
                bail_input!("{file}: tensor {name}: {} {got:?}, index.json says {dtype} {shape:?}", dtype_name(v.dtype()));
            }
            Ok(())
        };
        let l = &index.latent_shape;
        expect("latents", &index.latent_dtype, vec![n, l[0], l[1], l[2]])?;
        expect("labels", "i64", vec![n])?;
        if let (true, Some(e)) = (index.features, &index.encoder) {
            expect("features", "bf16", vec![n, e.tokens, e.z_dim])?;
        }
        if index.images {
            expect("images", "u8", vec![n, 3, index.resolution, index.resolution])?;
        }
        if let Some(t) = &index.text {
            let c = self.captions;
            expect("caption_ids", "i32", vec![c, t.max_length])?;
            expect("caption_offsets", "i64", vec![n + 1])?;
            if t.precomputed {
                expect("caption_hidden", "bf16", vec![c, t.max_length, t.hidden_size])?;
                expect("caption_pooled", "bf16", vec![c, t.hidden_size])?;
            }
        }
        let fields = st
            .tensors()
            .into_iter()
            .map(|(name, v)| {
                let offset = v.data().as_ptr() as usize - map.as_ptr() as usize;
                let rows = v.shape().first().copied().unwrap_or(1).max(1);
                (name, Field { offset, bytes_per_row: v.data().len() / rows })
            })
            .collect();
        Ok(fields)
    }
}

/// Writes one shard (atomically) and returns its index entry.
pub fn write_shard(dir: &Path, i: usize, tensors: &[(String, tch::Tensor)]) -> Result<ShardInfo> {
    let records = tensors.first().map(|(_, t)| t.size()[0]).unwrap_or(0);
    let file = shard_name(i);
    let sha = crate::formats::weights::write_hashed(&dir.join(&file), tensors, None).with_context(|| format!("writing {file}"))?;
    let captions = tensors.iter().find(|(n, _)| n == "caption_ids").map(|(_, t)| t.size()[0]);
    Ok(ShardInfo { file, records, sha256: crate::formats::weights::hex(&sha), captions })
}

/// Writes `index.json` atomically (the dataset's commit point).
pub fn write_index(dir: &Path, index: &Index) -> Result<()> {
    crate::formats::weights::write_atomic(&dir.join("index.json"), serde_json::to_string_pretty(index)?.as_bytes())
}
