//! Captions to conditions: the CLIP tokenizer and text tower of one folder, and the
//! empty caption's encoding (the null condition of guidance).

use super::clip::{Clip, TextOutput, Towers};
use super::clip_tokenizer::ClipTokenizer;
use anyhow::Result;
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// A frozen CLIP text encoder with its tokenizer.
pub struct TextEncoder {
    pub clip: Clip,
    pub tokenizer: ClipTokenizer,
}

impl TextEncoder {
    /// `dir`: a transformers CLIP folder (`CLIPModel` or `CLIPTextModel`) with tokenizer files.
    pub fn load(dir: &Path, device: Device) -> Result<Self> {
        Ok(TextEncoder { clip: Clip::load(dir, device, Towers::Text)?, tokenizer: ClipTokenizer::load(dir)? })
    }

    /// Width of the hidden states.
    pub fn hidden_size(&self) -> i64 {
        self.clip.config.text.as_ref().map(|t| t.tower.hidden_size).expect("loaded with its text tower")
    }

    /// Tokens per caption.
    pub fn max_length(&self) -> i64 {
        self.tokenizer.max_length() as i64
    }

    /// Token ids [N, L] -> hidden states [N, L, D] and pooled [N, D], f32.
    pub fn encode_ids(&self, ids: &Tensor, kind: Kind) -> Result<TextOutput> {
        self.clip.encode_text(ids, kind)
    }

    /// Captions -> their encodings.
    pub fn encode(&self, texts: &[&str], kind: Kind) -> Result<TextOutput> {
        self.encode_ids(&self.tokenizer.batch(texts)?, kind)
    }

    /// The empty caption's encoding, one row.
    pub fn null(&self, kind: Kind) -> Result<TextOutput> {
        self.encode(&[""], kind)
    }
}
