//! The trained network: SiT + REG (named like the REG checkpoints), its dimensions and
//! presets, and the flat parameter store its weights live in.

pub mod cond;
pub mod dims;
pub mod params;
pub mod sit;

use anyhow::Result;
pub use cond::{Caption, Cond};
pub use dims::SitDims;
use tch::Device;

pub use params::Params;
pub use sit::SiT;

/// Builds a SiT + REG model with freshly initialised weights (seeded) on `device`.
pub fn build_sit(dims: &SitDims, device: Device, seed: u64) -> Result<(SiT, Params)> {
    build_sit_padded(dims, device, seed, 1)
}

/// As `build_sit`, with the flat buffers padded to a multiple of `pad_to`.
pub fn build_sit_padded(dims: &SitDims, device: Device, seed: u64, pad_to: i64) -> Result<(SiT, Params)> {
    let mut pb = params::ParamBuilder::new(device);
    let model = SiT::new(&mut pb, dims);
    let params = pb.finish(seed, pad_to)?;
    Ok((model, params))
}
