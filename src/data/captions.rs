//! Captioned inputs for `prepare`: COCO's `captions_*.json` + image folder, or images with
//! `name.txt` sidecars; and the tokenizer / CLIP text tower that turn captions into shard tensors.

use super::reg_layout::Blob;
use super::shards::TextInfo;
use super::sources::{list_image_tree, Entry, IMAGE_EXT};
use crate::bail_input;
use crate::encoders::clip::{Clip, ClipConfig, Towers};
use crate::encoders::clip_tokenizer::ClipTokenizer;
use crate::error::bad_input;
use anyhow::Result;
use serde_json::Value;
use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};
use tch::{Device, Kind, Tensor};

/// Images and their captions, ready for sharding.
pub struct Captioned {
    pub classes: Vec<String>,
    /// Each with at least one caption.
    pub entries: Vec<Entry>,
    /// Images left out because no caption names them (COCO).
    pub uncaptioned: usize,
}

/// The one class of a dataset without classes.
fn no_classes() -> Vec<String> {
    vec!["image".into()]
}

/// COCO's annotations JSON (`images: [{id, file_name}]`, `annotations: [{image_id,
/// caption}]`): every caption of an image, in the file's order; images in the order of
/// `images`, read from `dir/file_name`. An image that no caption names is left out and
/// counted; anything malformed is an input error naming the file and the field.
pub fn read_coco(dir: &Path, json: &Path) -> Result<Captioned> {
    let file = json.display().to_string();
    let text = std::fs::read(json).map_err(|e| bad_input(format!("{file}: cannot read: {e}")))?;
    let root: Value = serde_json::from_slice(&text).map_err(|e| bad_input(format!("{file}: not valid JSON: {e}")))?;
    let list = |name: &str| -> Result<&Vec<Value>> {
        match root.get(name) {
            Some(Value::Array(a)) => Ok(a),
            Some(_) => bail_input!("{file}: {name}: not a list"),
            None => bail_input!("{file}: {name}: missing"),
        }
    };
    let field = |v: &Value, at: &str, name: &str| -> Result<Value> {
        match v.get(name) {
            Some(x) => Ok(x.clone()),
            None if v.is_object() => bail_input!("{file}: {at}.{name}: missing"),
            None => bail_input!("{file}: {at}: not an object"),
        }
    };
    let id_of = |v: Value, at: String| -> Result<u64> { v.as_u64().ok_or_else(|| bad_input(format!("{file}: {at}: {v} is not an id"))) };
    let mut images: Vec<(u64, PathBuf)> = Vec::new();
    let mut slot: HashMap<u64, usize> = HashMap::new();
    for (i, v) in list("images")?.iter().enumerate() {
        let at = format!("images[{i}]");
        let id = id_of(field(v, &at, "id")?, format!("{at}.id"))?;
        let name = match field(v, &at, "file_name")? {
            Value::String(s) => s,
            other => bail_input!("{file}: {at}.file_name: {other} is not a string"),
        };
        // A file name like `../x` or `/etc/x` would read outside the image folder.
        let rel = Path::new(&name);
        if name.is_empty() || !rel.components().all(|c| matches!(c, Component::Normal(_))) {
            bail_input!("{file}: {at}.file_name: {} is not a path inside the image folder", name.escape_debug());
        }
        if slot.insert(id, images.len()).is_some() {
            bail_input!("{file}: {at}.id: {id} appears twice");
        }
        images.push((id, dir.join(rel)));
    }
    let mut captions: Vec<Vec<String>> = vec![Vec::new(); images.len()];
    for (i, v) in list("annotations")?.iter().enumerate() {
        let at = format!("annotations[{i}]");
        let id = id_of(field(v, &at, "image_id")?, format!("{at}.image_id"))?;
        let Some(&k) = slot.get(&id) else {
            bail_input!("{file}: {at}.image_id: {id} is not in images");
        };
        match field(v, &at, "caption")? {
            Value::String(s) => captions[k].push(s),
            other => bail_input!("{file}: {at}.caption: {other} is not a string"),
        }
    }
    let mut entries = Vec::new();
    let mut uncaptioned = 0;
    for ((_, path), caps) in images.into_iter().zip(captions) {
        if caps.is_empty() {
            uncaptioned += 1;
        } else {
            entries.push(Entry { image: Blob::File(path), moments: None, label: 0, captions: caps });
        }
    }
    Ok(Captioned { classes: no_classes(), entries, uncaptioned })
}

/// The captions of `name.txt` beside an image: one per non-empty line (surrounding
/// whitespace trimmed). Missing, unreadable, non-UTF-8 or empty files are input errors.
pub fn read_sidecar(image: &Path) -> Result<Vec<String>> {
    let txt = image.with_extension("txt");
    let file = txt.display();
    let bytes = std::fs::read(&txt).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => bad_input(format!("{file}: missing (every image needs its captions in a .txt beside it)")),
        _ => bad_input(format!("{file}: cannot read: {e}")),
    })?;
    let text =
        String::from_utf8(bytes).map_err(|e| bad_input(format!("{file}: not valid UTF-8 (byte {})", e.utf8_error().valid_up_to())))?;
    let caps: Vec<String> = text.lines().map(str::trim).filter(|l| !l.is_empty()).map(String::from).collect();
    if caps.is_empty() {
        bail_input!("{file}: empty (no caption)");
    }
    Ok(caps)
}

/// Images with `name.txt` sidecars: a flat folder (one class, `image`), or an
/// ImageNet-style tree (class = sorted folder index, as `list_image_tree`).
pub fn read_sidecars(dir: &Path) -> Result<Captioned> {
    let rd = std::fs::read_dir(dir).map_err(|e| bad_input(format!("{}: cannot list: {e}", dir.display())))?;
    let paths: Vec<PathBuf> = rd.flatten().map(|e| e.path()).collect();
    let (classes, mut entries) = if paths.iter().any(|p| p.is_dir()) {
        list_image_tree(dir)?
    } else {
        let mut files: Vec<PathBuf> = paths.into_iter().filter(|p| is_image(p)).collect();
        files.sort();
        if files.is_empty() {
            bail_input!("{}: no images (.jpg, .jpeg, .png)", dir.display());
        }
        (no_classes(), files.into_iter().map(|p| Entry { image: Blob::File(p), moments: None, label: 0, captions: Vec::new() }).collect())
    };
    for e in &mut entries {
        let Blob::File(p) = &e.image else { unreachable!("listed from a folder") };
        e.captions = read_sidecar(p)?;
    }
    Ok(Captioned { classes, entries, uncaptioned: 0 })
}

pub(crate) fn is_image(p: &Path) -> bool {
    p.is_file() && p.extension().is_some_and(|x| IMAGE_EXT.contains(&x.to_string_lossy().as_ref()))
}

/// What `prepare` makes of captions: the tokenizer (and, for precomputed captions, the
/// CLIP text tower) of a CLIP folder, with the index entry that records them.
pub struct CaptionEncoder {
    pub tokenizer: ClipTokenizer,
    /// Loaded for `--text-precomputed` only.
    pub clip: Option<Clip>,
    pub info: TextInfo,
}

/// SHA-256 of the tokenizer files `ClipTokenizer::load` reads, in the order `TextInfo`
/// documents.
pub fn tokenizer_sha256(dir: &Path) -> Result<String> {
    let mut files = if dir.join("tokenizer.json").exists() { vec!["tokenizer.json"] } else { vec!["vocab.json", "merges.txt"] };
    if dir.join("tokenizer_config.json").exists() {
        files.push("tokenizer_config.json");
    }
    let mut bytes = Vec::new();
    for f in files {
        let p = dir.join(f);
        bytes.extend(std::fs::read(&p).map_err(|e| bad_input(format!("{}: cannot read: {e}", p.display())))?);
    }
    Ok(crate::formats::weights::sha256_hex(&bytes))
}

impl CaptionEncoder {
    /// `name` is the folder's name as the index records it; the text tower's width comes
    /// from `config.json` (its weights are read only when `precomputed`).
    pub fn load(dir: &Path, name: &str, precomputed: bool, device: Device) -> Result<CaptionEncoder> {
        let tokenizer = ClipTokenizer::load(dir)?;
        let cfg_path = dir.join("config.json");
        let cfg_file = cfg_path.display().to_string();
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| bad_input(format!("{cfg_file}: cannot read: {e}")))?;
        let Some(tc) = ClipConfig::parse(&text, &cfg_file)?.text else {
            bail_input!("{cfg_file}: no text tower (a CLIP vision model)");
        };
        let max_length = tokenizer.max_length() as i64;
        if max_length > tc.max_position_embeddings {
            bail_input!(
                "{cfg_file}: max_position_embeddings: {} is fewer than the tokenizer's {max_length} tokens",
                tc.max_position_embeddings
            );
        }
        let clip = if precomputed { Some(Clip::load(dir, device, Towers::Text)?) } else { None };
        let info = TextInfo {
            tokenizer: name.into(),
            tokenizer_sha256: tokenizer_sha256(dir)?,
            encoder: name.into(),
            max_length,
            hidden_size: tc.tower.hidden_size,
            precomputed,
            captions: 0,
        };
        Ok(CaptionEncoder { tokenizer, clip, info })
    }

    /// Token ids of `captions`, as shards store them. [C, L] i32
    pub fn ids(&self, captions: &[&str]) -> Result<Tensor> {
        Ok(self.tokenizer.batch(captions)?.to_kind(Kind::Int))
    }

    /// The text tower on `ids` in batches of `batch`, computing in `kind`: (last hidden
    /// state [C, L, D], pooled end-of-text token [C, D]) f32 on the CPU.
    pub fn encode(&self, ids: &Tensor, batch: usize, kind: Kind) -> Result<(Tensor, Tensor)> {
        let clip = self.clip.as_ref().ok_or_else(|| anyhow::anyhow!("captions are encoded only with --text-precomputed"))?;
        let (mut hs, mut ps) = (Vec::new(), Vec::new());
        let n = ids.size()[0];
        let b = batch.max(1) as i64;
        for lo in (0..n).step_by(b as usize) {
            let out = clip.encode_text(&ids.narrow(0, lo, b.min(n - lo)).to_kind(Kind::Int64), kind)?;
            hs.push(out.last_hidden_state.to_device(Device::Cpu));
            ps.push(out.pooled.to_device(Device::Cpu));
        }
        Ok((Tensor::cat(&hs, 0), Tensor::cat(&ps, 0)))
    }
}
