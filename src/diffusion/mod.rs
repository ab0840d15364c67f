//! The diffusion side of REG: interpolant paths, the training loss and its keyed
//! draws, the SDE/ODE samplers and image generation by global index.

pub mod generate;
pub mod loss;
pub mod path;
pub mod sampler;

pub use loss::{reg_loss, LossConfig, LossTerms, StepDraws};
pub use path::{Interpolant, Parameterization, PathType, Prediction, Weighting};
