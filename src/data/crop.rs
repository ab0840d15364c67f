//! Pillow-compatible resampling and the ADM center crop: they live in `formats::pillow_resample` (below `encoders` and `eval`, which use them too); this keeps the old path.

pub use crate::formats::pillow_resample::*;
