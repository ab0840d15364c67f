//! Where training batches come from: precomputed shards (prepare, format, loader) or
//! the synthetic source.

pub mod captions;
pub mod checks;
pub mod loader;
pub mod prepare;
pub mod reg_layout;
pub mod shards;
pub mod sources;
pub mod synthetic;
pub mod verify;

use tch::Tensor;

/// One rank's rows of a global batch, on the CPU.
pub struct Batch {
    /// VAE moments `[mean; std]`. [n, 2C, H, W] f32
    pub moments: Tensor,
    /// Encoder tokens, class token first (f32 or bf16; empty when the dataset holds
    /// images for online encoding). [n, T+1, Dz]
    pub feat: Tensor,
    /// Class labels. [n] i64
    pub y: Tensor,
    /// Images for online encoding. [n, 3, R, R] u8
    pub images: Option<Tensor>,
    /// Token ids of one caption per row, picked by the keyed generator. [n, L] i64
    pub captions: Option<Tensor>,
    /// Precomputed text encodings of those captions: (hidden [n, L, D], pooled [n, D]) bf16.
    pub text: Option<(Tensor, Tensor)>,
}

/// A source of batches addressed by global position, so every rank can take its
/// own rows and results do not depend on the world size.
pub trait BatchSource: Send {
    /// Rows `[lo, lo + n)` of the global batch of `step`.
    fn batch(&mut self, step: u64, lo: i64, n: i64) -> anyhow::Result<Batch>;
}
