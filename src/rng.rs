//! Keyed randomness: every draw of a run is seeded by (run seed, position, stream), so
//! results depend neither on the world size nor on what ran before, and resuming
//! needs only the step.

/// The streams in use. Each consumer has its own, so no two share a generator seed.
pub mod stream {
    /// Times, noises and label drops of a training step (position: the step).
    pub const STEP_DRAWS: u64 = 0;
    /// Class means of the synthetic source (position: `u64::MAX`).
    pub const SYNTHETIC_MEANS: u64 = 1;
    /// Per-sample noise of the synthetic source (position: the global sample index).
    pub const SYNTHETIC_SAMPLE: u64 = 2;
    /// The loader's record permutation (position: the epoch).
    pub const EPOCH_PERMUTATION: u64 = 3;
    /// Caption patterns of the synthetic source (position: `u64::MAX`).
    pub const SYNTHETIC_TEXT: u64 = 9;
    /// The evaluation captions `sample --captions` draws (position: 0).
    pub const EVAL_CAPTIONS: u64 = 10;
    /// Random class labels of generated images (position: the image index).
    pub const SAMPLE_LABEL: u64 = 7;
    /// Which caption of a record a training step reads (position: the step; the row of
    /// the global batch is mixed in by `data::loader::caption_pick`).
    pub const CAPTION_PICK: u64 = 8;
    /// Draw `k` of a generated image is stream `SAMPLE_NOISE + k` (position: the image index).
    pub const SAMPLE_NOISE: u64 = 1000;
}

/// Mixes (seed, position, stream) into one 63-bit generator seed (SplitMix64
/// finaliser), so nearby positions get unrelated streams.
pub fn step_seed(seed: u64, step: u64, stream: u64) -> i64 {
    let mut z = seed ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ stream.wrapping_mul(0xD1B5_4A32_D192_ED03);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    ((z ^ (z >> 31)) >> 1) as i64
}

/// SplitMix64: a tiny, portable generator (the same sequence on every machine,
/// independent of libtorch's generator).
pub struct SplitMix(pub u64);

impl SplitMix {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, n) (Lemire's multiply-shift; the bias is below 2^-32 for n < 2^32).
    pub fn below(&mut self, n: u64) -> u64 {
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }
}
