//! Frozen networks that turn pixels into features or latents, loaded from their
//! published safetensors: SD-VAE (diffusers), DINOv2 and CLIP (transformers), FID Inception-v3;
//! and the identity decoder of the pixel-space path.

pub mod clip;
pub mod clip_image;
pub mod clip_tokenizer;
pub mod decoder;
pub mod dinov2;
pub mod hub_config;
pub mod inception;
pub mod loader;
pub mod text;
pub mod vae;
