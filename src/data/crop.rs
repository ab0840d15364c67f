//! ADM center crop (to be written).
