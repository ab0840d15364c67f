//! A dataset against the model that will read it: latent shape, encoder tokens and
//! width, class count, and a text model's captions. Input errors name `index.json` and
//! the field.

use super::captions::tokenizer_sha256;
use super::shards::Dataset;
use crate::bail_input;
use crate::encoders::dinov2::Dinov2;
use crate::model::dims::SitDims;
use anyhow::Result;
use std::path::Path;

/// A dataset must hold what the model expects: latent shape, encoder tokens (from the
/// shards, or from `online` run on the stored images) and width, class count.
pub fn check_dataset(ds: &Dataset, d: &SitDims, online: Option<&Dinov2>) -> Result<()> {
    let file = ds.dir.join("index.json");
    let file = file.display();
    let ix = &ds.index;
    let want = vec![2 * d.in_channels, d.input_size, d.input_size];
    if ix.latent_shape != want {
        bail_input!("{file}: latent_shape: {:?}, the model expects {want:?}", ix.latent_shape);
    }
    let (tokens, z_dim, what) = match (online, ix.encoder.as_ref().filter(|_| ix.features)) {
        (Some(enc), _) if ix.images => (enc.num_tokens(), enc.hidden_size(), "data.encoder_path"),
        (Some(_), _) => bail_input!("{file}: images: false; model.encoder: online needs `prepare --store-images`"),
        (None, Some(e)) => (e.tokens, e.z_dim, "encoder"),
        (None, None) => bail_input!("{file}: features: false; this dataset needs model.encoder: online"),
    };
    if tokens != d.num_patches() + 1 {
        bail_input!("{file}: {what}: {tokens} encoder tokens, the model has {} (patches + REG token)", d.num_patches() + 1);
    }
    if z_dim != d.z_dim {
        bail_input!("{file}: {what}: encoder z_dim {z_dim}, model.z_dim is {}", d.z_dim);
    }
    // A text model reads no labels.
    if d.text_dim == 0 && ix.num_classes() != d.num_classes {
        bail_input!("{file}: class_names: {} classes, model.num_classes is {}", ix.num_classes(), d.num_classes);
    }
    Ok(())
}

/// How a text model reads its captions.
pub enum TextInput<'a> {
    /// Text states stored by `prepare --text-precomputed`.
    Precomputed,
    /// Token ids through the text tower whose tokenizer is in this folder
    /// (`data.text_encoder_path`).
    Online(&'a Path),
}

/// A text model's dataset must hold captions the model can read: precomputed states, or
/// token ids made by the tokenizer the model reads them with, of the model's length and
/// width.
pub fn check_text_dataset(ds: &Dataset, d: &SitDims, input: TextInput) -> Result<()> {
    let file = ds.dir.join("index.json");
    let file = file.display();
    let Some(info) = &ds.index.text else {
        bail_input!("{file}: text: missing; model.condition: text needs a captioned dataset (prepare --captions / --caption-files)");
    };
    if info.max_length != d.text_len || info.hidden_size != d.text_dim {
        bail_input!(
            "{file}: text: {} tokens of width {}, the model takes {} of width {} (model.text_len / model.text_dim)",
            info.max_length,
            info.hidden_size,
            d.text_len,
            d.text_dim
        );
    }
    match input {
        TextInput::Precomputed if !info.precomputed => {
            bail_input!("{file}: text.precomputed: false; model.text_encoder: precomputed needs `prepare --text-precomputed`")
        }
        TextInput::Online(dir) => {
            if tokenizer_sha256(dir)? != info.tokenizer_sha256 {
                bail_input!(
                    "{file}: text.tokenizer_sha256: the captions were tokenized by {}, not by the tokenizer of data.text_encoder_path {}",
                    info.tokenizer,
                    dir.display()
                );
            }
        }
        TextInput::Precomputed => {}
    }
    Ok(())
}
