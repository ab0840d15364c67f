//! `reg-ddp train`: a run from a YAML config, resumable, on one process or under a
//! launcher (the loop itself is `reg::train::run`).

use anyhow::Result;
use reg::dist::Collectives;
use reg::train::faults::Faults;
use reg::train::run::{preemption_flag, run as train, RunOptions};
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub run: super::ConfigArgs,
    /// Start from these weights (safetensors under the REG parameter names).
    #[arg(long)]
    pub init: Option<PathBuf>,
    /// `auto`: continue from the newest complete checkpoint of the run (a fresh
    /// start when there is none); or a `step-NNNNNNN` folder.
    #[arg(long)]
    pub resume: Option<String>,
    /// Print one JSON line of metrics per logged step instead of a progress bar.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: Args) -> Result<()> {
    // Before the launch: a signal during MPI/NCCL start-up already counts.
    let stop = preemption_flag()?;
    let (cfg, launch) = a.run.launch(&[], Collectives::OnDevice)?;
    // The only place the test faults are read from the environment.
    let opts = RunOptions { init: a.init, resume: a.resume, json: a.json, stop, faults: Faults::from_env() };
    train(cfg, launch, opts)
}
