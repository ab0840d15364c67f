//! Interpolant paths, the REG training loss, and (later) the samplers.

pub mod generate;
pub mod loss;
pub mod path;
pub mod sampler;

pub use loss::{reg_loss, LossTerms, StepDraws};
pub use path::Interpolant;
