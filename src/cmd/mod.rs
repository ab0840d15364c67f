//! One file per subcommand, wiring the library together; nothing imports this module.

pub mod bench;
pub mod bench_data;
pub mod demo_images;
pub mod eval;
pub mod export;
pub mod import;
pub mod prepare;
pub mod sample;
pub mod score_shapes;
pub mod study;
pub mod train;
pub mod train_encoder;
pub mod verify;

use anyhow::Result;
use reg::config::Config;
use reg::dist::{Collectives, Launch, LaunchInfo};
use reg::error::bad_input;
use std::path::PathBuf;

/// A memory figure of this process from `/proc/self/status` (`VmHWM`: peak resident;
/// `RssAnon`: private memory now; `RssFile`: mapped file pages now, which the kernel
/// drops under pressure), in bytes.
pub fn proc_status_bytes(field: &str) -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.strip_prefix(field).is_some_and(|r| r.starts_with(':')))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// The run config on the command line: a YAML file and `--set` overrides.
#[derive(clap::Args, Debug)]
pub struct ConfigArgs {
    /// YAML config (see configs/).
    #[arg(long)]
    pub config: PathBuf,
    /// Override a config value, e.g. `--set train.steps=100` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
    /// CPU threads for libtorch (0: its default).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
}

impl ConfigArgs {
    /// Applies `--threads` and loads the config with `extra` overrides after the user's.
    pub fn load(&self, extra: &[String]) -> Result<Config> {
        set_threads(self.threads);
        let sets: Vec<String> = self.sets.iter().chain(extra).cloned().collect();
        Config::load(&self.config, &sets)
    }

    /// Loads the config and joins the run on `train.device`. The batch split is checked
    /// against the launcher's world size before MPI starts, so bad input fails fast
    /// (exit 2, naming the file) on every rank.
    pub fn launch(&self, extra: &[String], collectives: Collectives) -> Result<(Config, Launch)> {
        let cfg = self.load(extra)?;
        cfg.local_batch(LaunchInfo::from_env().world).map_err(|e| bad_input(format!("{}: {e}", self.config.display())))?;
        let launch = Launch::start(&cfg.train.device, collectives)?;
        Ok((cfg, launch))
    }
}

/// `--threads N` (0 leaves libtorch's default).
pub fn set_threads(n: usize) {
    if n > 0 {
        tch::set_num_threads(n as i32);
        tch::set_num_interop_threads(n as i32);
    }
}
