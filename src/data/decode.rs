//! Image bytes -> RGB as Pillow decodes them: in `formats::pillow_decode` (below `eval`, which reads reference images too); this keeps the old path.

pub use crate::formats::pillow_decode::*;
