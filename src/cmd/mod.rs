//! One file per subcommand, wiring the library together; nothing imports this module.

pub mod bench;
pub mod bench_data;
pub mod demo_images;
pub mod export;
pub mod import;
pub mod prepare;
pub mod sample;
pub mod train;

use anyhow::Result;
use reg::config::Config;
use std::path::Path;

/// Loads the config named on the command line with its `--set` overrides.
pub fn load_config(path: &Path, sets: &[String]) -> Result<Config> {
    Config::load(path, sets)
}

/// `--threads N` (0 leaves libtorch's default).
pub fn set_threads(n: usize) {
    if n > 0 {
        tch::set_num_threads(n as i32);
        tch::set_num_interop_threads(n as i32);
    }
}
