//! Sharded checkpoints. Every rank writes its slice of the flat fp32 master weights,
//! AdamW moments and EMA to `step-NNNNNNN/rank-RRRRR-of-WWWWW.safetensors` (in a
//! background thread, from a host copy); rank 0 then writes `manifest.json` last and
//! atomically. A step folder without a manifest is incomplete and never used.
//! Resuming re-slices the flat state by the manifest's offsets, so any world size
//! can continue any checkpoint.

use super::Trainer;
use crate::bail_input;
use crate::config::Config;
use crate::error::bad_input;
use crate::formats::weights;
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use tch::{Device, Kind, Tensor};

/// 2: a shard holds one slice of every bucket (`ShardEntry::ranges`); 1 (still read):
/// one contiguous range per rank.
pub const FORMAT_VERSION: u32 = 2;
/// The per-rank tensors, each a `[shard]` f32 slice of a flat buffer.
pub const STATE: [&str; 4] = ["weights", "exp_avg", "exp_avg_sq", "ema"];

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LayoutEntry {
    pub name: String,
    pub shape: Vec<i64>,
    pub offset: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ShardEntry {
    pub file: String,
    pub rank: i64,
    /// Format 1: this shard covers `[lo, lo + len)` of the (padded) flat buffers.
    /// Format 2: `len` elements, the first at `lo`, made of `ranges`.
    pub lo: i64,
    pub len: i64,
    /// The pieces of the flat buffers this file holds, as (start, length), in file order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ranges: Vec<(i64, i64)>,
    pub sha256: String,
}

impl ShardEntry {
    /// (flat start, offset in the file's tensors, length) of each piece.
    fn pieces(&self) -> Vec<(i64, i64, i64)> {
        if self.ranges.is_empty() {
            return vec![(self.lo, 0, self.len)];
        }
        let mut at = 0;
        self.ranges
            .iter()
            .map(|&(lo, len)| {
                at += len;
                (lo, at - len, len)
            })
            .collect()
    }
}

/// What `manifest.json` records: enough to rebuild the flat state at any world size.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub format_version: u32,
    /// Optimisation steps completed.
    pub step: i64,
    /// AdamW's update count (steps minus skipped ones).
    pub adam_step: i64,
    /// Non-finite steps skipped so far.
    pub skipped: i64,
    /// Global samples consumed: the loader's position.
    pub samples_seen: i64,
    pub world: i64,
    /// Trainable elements; the flat buffers were padded to `padded`.
    pub total: i64,
    pub padded: i64,
    pub layout: Vec<LayoutEntry>,
    pub shards: Vec<ShardEntry>,
    pub config: Config,
    /// The run this checkpoint belongs to (`run.json` of its run folder); empty in
    /// checkpoints written before runs had an identity.
    #[serde(default)]
    pub run_id: String,
    /// SHA-256 of `config` as JSON: which settings wrote it (a resumed run may change
    /// steps or logging; only a change of model is refused).
    #[serde(default)]
    pub config_sha256: String,
}

pub fn step_dir(run: &Path, step: i64) -> PathBuf {
    run.join(format!("step-{step:07}"))
}

pub fn shard_file(rank: i64, world: i64) -> String {
    format!("rank-{rank:05}-of-{world:05}.safetensors")
}

/// A checkpoint whose rank file is being written in the background.
pub struct PendingSave {
    pub step: i64,
    pub dir: PathBuf,
    handle: JoinHandle<Result<[u8; 32]>>,
    manifest: Manifest,
    /// When `start` was called and how long it held the step loop (the host copy, or
    /// queueing the side-stream copy).
    pub started: std::time::Instant,
    pub blocking: std::time::Duration,
}

impl PendingSave {
    /// True once this rank's file is on disk (never blocks).
    pub fn is_written(&self) -> bool {
        self.handle.is_finished()
    }
}

/// Starts this rank's part of the checkpoint of the current step: copies the shard
/// state to the host now, writes it in a thread. Training may continue at once;
/// `finish` (collective) completes the checkpoint.
pub fn start(run: &Path, t: &mut Trainer) -> Result<PendingSave> {
    let started = std::time::Instant::now();
    let (rank, world) = (t.rank(), t.world());
    let dir = step_dir(run, t.step);
    std::fs::create_dir_all(&dir).with_context(|| format!("{}: cannot create", dir.display()))?;
    let state = [t.shard(), t.opt.exp_avg.shallow_clone(), t.opt.exp_avg_sq.shallow_clone(), t.ema.shadow.shallow_clone()];
    let (host, copy) = match t.device {
        Device::Cuda(d) if t.cfg.train.async_checkpoint_copy => {
            if t.staging.is_empty() {
                t.staging = state.iter().map(|s| Tensor::empty(s.size(), (Kind::Float, Device::Cpu)).pin_memory(t.device)).collect();
            }
            let copy = std::sync::Arc::new(crate::shim::HostCopy::start(d, &state, &t.staging)?);
            t.save_fence = Some(copy.clone());
            (t.staging.iter().map(Tensor::shallow_clone).collect::<Vec<_>>(), Some(copy))
        }
        _ => (state.iter().map(|x| x.to_device(Device::Cpu).copy()).collect(), None),
    };
    let tensors: Vec<(String, Tensor)> = STATE.iter().map(|n| n.to_string()).zip(host).collect();
    // One metadata key holding a JSON object: a HashMap with several keys would be
    // serialised in random order, and identical states must give identical bytes.
    let info = serde_json::json!({
        "step": t.step, "rank": rank, "world": world, "len": t.layout.shard_len(),
        "seed": t.cfg.train.seed, "samples_seen": t.samples_seen(), "adam_step": t.opt.step,
    });
    let meta = HashMap::from([("reg_ddp".to_string(), info.to_string())]);
    let path = dir.join(shard_file(rank, world));
    // A run killed while writing this step before left its temporary file behind.
    weights::remove_stale_temps(&path);
    let handle = std::thread::Builder::new().name("ckpt-writer".into()).spawn(move || {
        if let Some(copy) = copy {
            copy.wait()?;
        }
        weights::write_hashed(&path, &tensors, Some(meta))
    })?;

    let manifest = Manifest {
        format_version: FORMAT_VERSION,
        step: t.step,
        adam_step: t.opt.step,
        skipped: t.skipped,
        samples_seen: t.samples_seen(),
        world,
        total: t.params.numel(),
        padded: t.params.padded_len(),
        layout: t.params.entries.iter().map(|e| LayoutEntry { name: e.name.clone(), shape: e.shape.clone(), offset: e.offset }).collect(),
        shards: Vec::new(),
        config: t.cfg.clone(),
        run_id: t.run_id.clone(),
        config_sha256: weights::sha256_hex(serde_json::to_string(&t.cfg)?.as_bytes()),
    };
    Ok(PendingSave { step: t.step, dir, handle, manifest, started, blocking: started.elapsed() })
}

/// Waits for this rank's file, gathers every rank's checksum, and on rank 0 writes
/// the manifest (the commit point) and prunes old checkpoints. Collective.
pub fn finish(p: PendingSave, t: &Trainer) -> Result<PathBuf> {
    let written = p.handle.join().map_err(|_| anyhow::anyhow!("checkpoint writer thread panicked")).and_then(|r| r);
    // Every rank learns whether all files are on disk before anyone waits on the
    // checksums: a full disk on one rank stops all of them, at once, and nobody commits.
    let failed = t.agree(&[written.is_err() as i64 as f64])?[0];
    if failed > 0.0 {
        let run = p.dir.parent().expect("step folder has a parent");
        if t.rank() == 0 {
            // No manifest was written: the folder would never be used; do not leave it.
            let _ = std::fs::remove_dir_all(&p.dir);
        }
        let last = complete_steps(run).first().map(|(_, d)| d.display().to_string()).unwrap_or_else(|| "none".into());
        let what = format!("checkpoint {} not written (the last complete one stays in use: {last})", p.dir.display());
        return Err(match written {
            Err(e) => e.context(what),
            Ok(_) => anyhow::anyhow!("{what}: {failed} other rank(s) could not write their shard; see their messages"),
        });
    }
    let sha = written?;
    let (world, device) = (t.world(), t.comm.device());
    let mine = Tensor::from_slice(&sha).to_device(device);
    let all = Tensor::zeros([32 * world], (Kind::Uint8, device));
    t.comm.all_gather(&mine, &all)?;
    if t.rank() != 0 {
        return Ok(p.dir);
    }
    let all: Vec<u8> = Vec::<u8>::try_from(all.to_device(Device::Cpu))?;
    let mut m = p.manifest;
    m.shards = (0..world)
        .map(|r| {
            let ranges = t.layout.ranges(r);
            ShardEntry {
                file: shard_file(r, world),
                rank: r,
                lo: ranges[0].0,
                len: ranges.iter().map(|p| p.1).sum(),
                ranges,
                sha256: weights::hex(&all[(32 * r) as usize..(32 * r + 32) as usize]),
            }
        })
        .collect();
    weights::write_atomic(&p.dir.join("manifest.json"), serde_json::to_string_pretty(&m)?.as_bytes())?;
    prune(p.dir.parent().expect("step folder has a parent"), t.cfg.train.keep_checkpoints)?;
    Ok(p.dir)
}

/// Steps of the complete checkpoints of a run (those with a manifest), newest first.
pub fn complete_steps(run: &Path) -> Vec<(i64, PathBuf)> {
    let mut v: Vec<(i64, PathBuf)> = std::fs::read_dir(run)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let step = name.strip_prefix("step-")?.parse().ok()?;
            e.path().join("manifest.json").is_file().then(|| (step, e.path()))
        })
        .collect();
    v.sort_by_key(|(step, _)| std::cmp::Reverse(*step));
    v
}

/// Keeps the newest `keep` complete checkpoints; removes older ones and incomplete
/// folders older than the newest complete one (left by crashes).
fn prune(run: &Path, keep: i64) -> Result<()> {
    let complete = complete_steps(run);
    let Some(&(newest, _)) = complete.first() else { return Ok(()) };
    for (_, dir) in complete.iter().skip(keep.max(2) as usize) {
        std::fs::remove_dir_all(dir).with_context(|| format!("{}: cannot remove old checkpoint", dir.display()))?;
    }
    for e in std::fs::read_dir(run)?.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(step) = name.strip_prefix("step-").and_then(|s| s.parse::<i64>().ok()) {
            if step < newest && !e.path().join("manifest.json").exists() {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    Ok(())
}

/// Reads a checkpoint's manifest and checks every shard against its SHA-256.
pub fn verify(dir: &Path) -> Result<Manifest> {
    let path = dir.join("manifest.json");
    let text = std::fs::read_to_string(&path).map_err(|e| bad_input(format!("{}: cannot read: {e}", path.display())))?;
    let m: Manifest = serde_json::from_str(&text).map_err(|e| bad_input(format!("{}: not a reg-ddp manifest: {e}", path.display())))?;
    if !(1..=FORMAT_VERSION).contains(&m.format_version) {
        bail_input!("{}: format_version {} (this build reads {FORMAT_VERSION})", path.display(), m.format_version);
    }
    // The shards' pieces must tile the flat buffers exactly, or a resume would read past
    // a file's tensors or leave weights at zero.
    let mut pieces: Vec<(i64, i64)> = Vec::new();
    for s in &m.shards {
        let mine = s.pieces();
        let total: i64 = mine.iter().map(|p| p.2).sum();
        if total != s.len || s.len < 0 {
            bail_input!("{}: shards: {}: ranges hold {total} elements, len says {}", path.display(), s.file, s.len);
        }
        pieces.extend(mine.into_iter().map(|(lo, _, len)| (lo, len)));
    }
    pieces.sort();
    let mut end = 0;
    for (lo, len) in pieces {
        if lo != end || len < 0 {
            bail_input!("{}: shards: ranges: a gap or an overlap at element {end} of {}", path.display(), m.padded);
        }
        end = lo + len;
    }
    if end != m.padded {
        bail_input!("{}: shards: ranges cover {end} elements, padded is {}", path.display(), m.padded);
    }
    for s in &m.shards {
        let f = dir.join(&s.file);
        let bytes = std::fs::read(&f).map_err(|e| bad_input(format!("{}: cannot read: {e}", f.display())))?;
        let got = weights::sha256_hex(&bytes);
        if got != s.sha256 {
            bail_input!("{}: SHA-256 mismatch (manifest {}, file {got})", f.display(), s.sha256);
        }
    }
    Ok(m)
}

/// Picks the checkpoint to resume: `auto` is the newest complete one of the run that
/// passes its checksums (falling back to older ones, with a warning); anything else
/// is a step folder. `None`: `auto` found nothing (a fresh start).
pub fn choose(run: &Path, spec: &str) -> Result<Option<(PathBuf, Manifest)>> {
    if spec != "auto" {
        let dir = PathBuf::from(spec);
        return Ok(Some((dir.clone(), verify(&dir)?)));
    }
    for (_, dir) in complete_steps(run) {
        match verify(&dir) {
            Ok(m) => return Ok(Some((dir, m))),
            Err(e) => eprintln!("warning: skipping checkpoint {}: {e:#}{}", dir.display(), set_aside(&dir)),
        }
    }
    Ok(None)
}

/// Renames a checkpoint that failed its checks to `step-NNNNNNN.corrupt-<unix time>`,
/// kept for inspection: left in place, it would stay the newest "complete" one, take a
/// slot of `keep_checkpoints` (so pruning would delete good ones) and block the step
/// folder when the run reaches that step again. Returns the note for the warning.
fn set_aside(dir: &Path) -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let aside = dir.with_file_name(format!("{name}.corrupt-{secs}"));
    match std::fs::rename(dir, &aside) {
        Ok(()) => format!("; moved to {}", aside.display()),
        Err(e) => format!("; left in place (cannot rename it: {e})"),
    }
}

/// Copies `[lo, lo + len)` of one flat state buffer out of the checkpoint's shards
/// into `dst` (`[len]`); elements past `total` (padding) stay zero.
fn read_range(dir: &Path, m: &Manifest, name: &str, lo: i64, dst: &Tensor) -> Result<()> {
    read_ranges(dir, m, name, &[(lo, dst.shallow_clone())])
}

/// `read_range` for several (flat start, destination) pairs, each shard opened once.
fn read_ranges(dir: &Path, m: &Manifest, name: &str, wanted: &[(i64, Tensor)]) -> Result<()> {
    for s in &m.shards {
        let overlaps =
            |&(p, _, n): &(i64, i64, i64)| wanted.iter().any(|(lo, dst)| (*lo).max(p) < (lo + dst.size()[0]).min(m.total).min(p + n));
        let pieces: Vec<(i64, i64, i64)> = s.pieces().into_iter().filter(overlaps).collect();
        if pieces.is_empty() {
            continue;
        }
        let f = dir.join(&s.file);
        let file = std::fs::File::open(&f).with_context(|| format!("{}: cannot open", f.display()))?;
        // SAFETY: read-only map of a complete, checksummed file.
        let map = unsafe { memmap2::Mmap::map(&file) }?;
        let st = safetensors::SafeTensors::deserialize(&map)
            .map_err(|e| bad_input(format!("{}: not a valid safetensors file: {e:?}", f.display())))?;
        let view = st.tensor(name).map_err(|_| bad_input(format!("{}: tensor {name}: missing", f.display())))?;
        if view.shape() != [s.len as usize] || view.dtype() != safetensors::Dtype::F32 {
            bail_input!("{}: tensor {name}: expected f32 [{}]", f.display(), s.len);
        }
        for (p, at, n) in pieces {
            for (lo, dst) in wanted {
                let (a, b) = ((*lo).max(p), (lo + dst.size()[0]).min(m.total).min(p + n));
                if a >= b {
                    continue;
                }
                let bytes = &view.data()[((a - p + at) * 4) as usize..((b - p + at) * 4) as usize];
                let src = Tensor::f_from_data_size(bytes, &[b - a], Kind::Float)?;
                dst.narrow(0, a - lo, b - a).copy_(&src);
            }
        }
    }
    Ok(())
}

/// Loads a checkpoint into a trainer of any world size: this rank reads its slices,
/// the weights are then all-gathered. Collective.
pub fn load(dir: &Path, m: &Manifest, t: &mut Trainer) -> Result<()> {
    let here: Vec<LayoutEntry> =
        t.params.entries.iter().map(|e| LayoutEntry { name: e.name.clone(), shape: e.shape.clone(), offset: e.offset }).collect();
    if here != m.layout {
        let diff = here.iter().zip(&m.layout).find(|(a, b)| a != b).map(|(a, _)| a.name.clone());
        bail_input!(
            "{}: the checkpoint's model does not match the config (first difference: {})",
            dir.display(),
            diff.unwrap_or_else(|| format!("{} vs {} tensors", here.len(), m.layout.len()))
        );
    }
    let _g = tch::no_grad_guard();
    let staging = Tensor::zeros([t.layout.shard_len()], (Kind::Float, Device::Cpu));
    // This rank's piece of every bucket, into its place in the shard.
    let wanted: Vec<(i64, Tensor)> =
        t.layout.buckets().iter().map(|b| (b.piece(t.rank()), staging.narrow(0, b.shard_lo, b.slice))).collect();
    for name in STATE {
        let _ = staging.shallow_clone().zero_();
        read_ranges(dir, m, name, &wanted)?;
        let dst = match name {
            "weights" => t.shard(),
            "exp_avg" => t.opt.exp_avg.shallow_clone(),
            "exp_avg_sq" => t.opt.exp_avg_sq.shallow_clone(),
            _ => t.ema.shadow.shallow_clone(),
        };
        dst.shallow_clone().copy_(&staging);
    }
    if t.world() > 1 {
        t.layout.all_gather(t.comm.as_ref(), &t.shard(), &t.params.flat)?;
    }
    t.opt.set_step(m.adam_step);
    t.step = m.step;
    t.skipped = m.skipped;
    Ok(())
}

/// The weights (`ema`: the EMA) of a checkpoint under the REG names, the fixed position
/// table included: what `export` writes and `sample` loads.
pub fn read_named(dir: &Path, m: &Manifest, ema: bool) -> Result<Vec<(String, Tensor)>> {
    let dims = m.config.dims();
    let flat = read_full(dir, m, if ema { "ema" } else { "weights" })?;
    let mut named: Vec<(String, Tensor)> =
        m.layout.iter().map(|e| (e.name.clone(), flat.narrow(0, e.offset, e.shape.iter().product()).view(e.shape.as_slice()))).collect();
    named.push(("pos_embed".into(), crate::model::sit::pos_embed_2d(dims.hidden_size, dims.input_size / dims.patch_size)));
    Ok(named)
}

/// Assembles one full flat buffer (`weights` or `ema`) of a checkpoint on the CPU.
pub fn read_full(dir: &Path, m: &Manifest, name: &str) -> Result<Tensor> {
    let full = Tensor::zeros([m.padded], (Kind::Float, Device::Cpu));
    read_range(dir, m, name, 0, &full)?;
    Ok(full)
}
