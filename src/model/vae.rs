//! Stable Diffusion KL-f8 VAE (diffusers AutoencoderKL layout) (to be written).
