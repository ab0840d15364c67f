//! `reg-ddp study`: the captioned-shapes study, which lives with the shapes world.

pub use reg::shapes::study::{run, Args};
