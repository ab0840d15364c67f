//! reg: SiT + REG (Representation Entanglement for Generation) training on libtorch.

pub mod config;
pub mod data;
pub mod diffusion;
pub mod dist;
pub mod error;
pub mod eval;
pub mod model;
pub mod optim;
pub mod shim;
pub mod train;
