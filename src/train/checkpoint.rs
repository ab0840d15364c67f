//! Saving a run's state: weights and EMA under the REG names, AdamW moments, and the step.
//! Everything goes into `step-NNNNNNN/` written under a temporary name and renamed
//! into place, so a crash never leaves a half-written checkpoint that looks complete.

use super::Trainer;
use crate::model::weights;
use anyhow::{Context, Result};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Folder name of the checkpoint after `step` steps.
pub fn step_dir(run: &Path, step: i64) -> PathBuf {
    run.join(format!("step-{step:07}"))
}

/// Writes the checkpoint of the trainer's current step; returns its folder. Every
/// rank calls it (the sharded state is gathered); rank 0 writes.
pub fn save(run: &Path, t: &Trainer) -> Result<PathBuf> {
    let dst = step_dir(run, t.step);
    let ema = t.gather(&t.ema.shadow)?;
    let exp_avg = t.gather(&t.opt.exp_avg)?;
    let exp_avg_sq = t.gather(&t.opt.exp_avg_sq)?;
    if t.rank() != 0 {
        return Ok(dst);
    }
    let tmp = run.join(format!(".tmp-step-{:07}-{}", t.step, std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)?;
    }
    std::fs::create_dir_all(&tmp).with_context(|| format!("{}: cannot create", tmp.display()))?;
    t.params.save_file(&t.params.flat, &tmp.join("model.safetensors"))?;
    t.params.save_file(&ema, &tmp.join("ema.safetensors"))?;
    let meta = HashMap::from([("step".to_string(), t.opt.step.to_string())]);
    weights::write(
        &tmp.join("optim.safetensors"),
        &[("exp_avg".into(), exp_avg), ("exp_avg_sq".into(), exp_avg_sq)],
        Some(meta),
    )?;
    let state = serde_json::json!({ "step": t.step, "config": t.cfg });
    weights::write_atomic(&tmp.join("state.json"), serde_json::to_string_pretty(&state)?.as_bytes())?;
    if dst.exists() {
        std::fs::remove_dir_all(&dst)?;
    }
    std::fs::rename(&tmp, &dst).with_context(|| format!("{}: cannot rename into place", dst.display()))?;
    if let Ok(d) = std::fs::File::open(run) {
        let _ = d.sync_all();
    }
    Ok(dst)
}
