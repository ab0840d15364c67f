//! reg: SiT + REG (Representation Entanglement for Generation) training on libtorch.
//! Layers, each importing only those below it: `shapes` -> `train` -> `config` ->
//! {`data`, `diffusion`, `eval`, `optim`} -> {`model`, `encoders`, `dist`} -> {`formats`,
//! `layers`, `rng`, `shim`} -> `error` (checked by tests/layers.rs).

pub mod config;
pub mod data;
pub mod diffusion;
pub mod dist;
pub mod encoders;
pub mod error;
pub mod eval;
pub mod formats;
pub mod layers;
pub mod model;
pub mod optim;
pub mod rng;
pub mod shapes;
pub mod shim;
pub mod train;
