//! Frozen networks that turn pixels into features or latents, loaded from their
//! published safetensors: SD-VAE (diffusers), DINOv2 (transformers), FID Inception-v3.

pub mod dinov2;
pub mod inception;
pub mod layers;
pub mod vae;
