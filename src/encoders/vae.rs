//! Stable Diffusion KL-f8 VAE (diffusers `AutoencoderKL`): names and layout mirror its safetensors keys.

use crate::bail_input;
use crate::encoders::hub_config::{self, positive, positive_float};
use crate::encoders::loader::Loader;
use crate::error::bad_input;
use crate::layers::{Conv2d, GroupNorm, Linear};
use anyhow::Result;
use serde::Deserialize;
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// diffusers builds every VAE norm (resnets, mid attention, conv_norm_out) with this eps.
const EPS: f64 = 1e-6;

/// The fields of `config.json` that shape the network. Missing fields take diffusers'
/// `AutoencoderKL.__init__` defaults, so any folder diffusers loads loads here.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
struct VaeConfig {
    #[serde(deserialize_with = "positive")]
    in_channels: i64,
    #[serde(deserialize_with = "positive")]
    out_channels: i64,
    #[serde(deserialize_with = "positive")]
    latent_channels: i64,
    #[serde(deserialize_with = "positive_list")]
    block_out_channels: Vec<i64>,
    #[serde(deserialize_with = "positive")]
    layers_per_block: i64,
    #[serde(deserialize_with = "positive")]
    norm_num_groups: i64,
    #[serde(deserialize_with = "positive_float")]
    scaling_factor: f64,
    use_quant_conv: bool,
    use_post_quant_conv: bool,
    mid_block_add_attention: bool,
    // Checked against the one layout this VAE is built from.
    #[serde(rename = "_class_name")]
    class_name: Option<String>,
    act_fn: Option<String>,
    shift_factor: Option<f64>,
    down_block_types: Option<Vec<String>>,
    up_block_types: Option<Vec<String>>,
    attention_head_dim: Option<i64>,
    /// Informational only (the nets are fully convolutional), but a malformed one means
    /// the file is not what it claims to be: checked, not kept.
    #[serde(deserialize_with = "sample_size")]
    sample_size: (),
}

/// A positive integer or a non-empty list of them.
fn sample_size<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<(), D::Error> {
    let v = serde_json::Value::deserialize(d)?;
    let positive = |x: &serde_json::Value| x.as_i64().is_some_and(|n| n > 0);
    if positive(&v) || v.as_array().is_some_and(|a| !a.is_empty() && a.iter().all(positive)) {
        return Ok(());
    }
    Err(serde::de::Error::custom(format!("expected a positive integer, found {v}")))
}

impl Default for VaeConfig {
    fn default() -> Self {
        VaeConfig {
            in_channels: 3,
            out_channels: 3,
            latent_channels: 4,
            block_out_channels: vec![64],
            layers_per_block: 1,
            norm_num_groups: 32,
            scaling_factor: 0.18215,
            use_quant_conv: true,
            use_post_quant_conv: true,
            mid_block_add_attention: true,
            class_name: None,
            act_fn: None,
            shift_factor: None,
            down_block_types: None,
            up_block_types: None,
            attention_head_dim: None,
            sample_size: (),
        }
    }
}

/// A non-empty list of positive integers.
fn positive_list<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Vec<i64>, D::Error> {
    let v = Vec::<i64>::deserialize(d)?;
    if v.is_empty() || v.iter().any(|&n| n <= 0) {
        return Err(serde::de::Error::custom(format!("expected a non-empty list of positive integers, found {v:?}")));
    }
    Ok(v)
}

/// A list of block type names, each equal to `only` (the one block type this VAE is built from).
fn block_types(file: &str, name: &str, types: &Option<Vec<String>>, only: &str, len: usize) -> Result<()> {
    let Some(items) = types else {
        // diffusers' default is a single block; a longer channel list needs the field.
        if len == 1 {
            return Ok(());
        }
        bail_input!("{file}: field {name}: missing, but block_out_channels has {len} entries");
    };
    if items.len() != len {
        bail_input!("{file}: field {name}: {} entries, but block_out_channels has {len}", items.len());
    }
    if let Some(item) = items.iter().find(|t| *t != only) {
        bail_input!("{file}: field {name}: block type {item:?} is not supported (only \"{only}\")");
    }
    Ok(())
}

impl VaeConfig {
    /// Parses and checks `config.json`; `file` is its path as shown in errors.
    fn parse(text: &str, file: &str) -> Result<VaeConfig> {
        let c: VaeConfig = hub_config::parse(text, file)?;
        if let Some(v) = c.class_name.as_deref().filter(|&v| v != "AutoencoderKL") {
            bail_input!("{file}: field _class_name: {v:?} is not supported (only \"AutoencoderKL\")");
        }
        if let Some(v) = c.act_fn.as_deref().filter(|&v| v != "silu") {
            bail_input!("{file}: field act_fn: {v:?} is not supported (only \"silu\")");
        }
        // SD3/Flux-style VAEs shift latents as well as scale them; the trainer only scales,
        // so such a VAE would decode wrongly rather than fail: refuse it here.
        if let Some(v) = c.shift_factor.filter(|&v| v != 0.0) {
            bail_input!("{file}: field shift_factor: {v} is not supported (only null or 0)");
        }
        if let Some(&ch) = c.block_out_channels.iter().find(|&&ch| ch % c.norm_num_groups != 0) {
            bail_input!("{file}: field norm_num_groups: {} does not divide block_out_channels entry {ch}", c.norm_num_groups);
        }
        let blocks = c.block_out_channels.len();
        block_types(file, "down_block_types", &c.down_block_types, "DownEncoderBlock2D", blocks)?;
        block_types(file, "up_block_types", &c.up_block_types, "UpDecoderBlock2D", blocks)?;
        // diffusers' AutoencoderKL always gives its mid-block attention one head over all
        // channels; a config asking for another head size describes some other model.
        let last = *c.block_out_channels.last().expect("checked non-empty");
        if let Some(v) = c.attention_head_dim.filter(|&v| v != last) {
            bail_input!("{file}: field attention_head_dim: {v} is not supported (the mid-block attention has one head of {last} channels)");
        }
        Ok(c)
    }
}

/// Older diffusers checkpoints (sd-vae-ft-ema among them) name the mid-block attention
/// `query/key/value/proj_attn`; current diffusers renames them on load, and so do we.
fn rename_legacy(name: &str) -> String {
    const OLD_NEW: [(&str, &str); 4] = [(".query.", ".to_q."), (".key.", ".to_k."), (".value.", ".to_v."), (".proj_attn.", ".to_out.0.")];
    if name.contains(".mid_block.attentions.") {
        for (old, new) in OLD_NEW {
            if name.contains(old) {
                return name.replacen(old, new, 1);
            }
        }
    }
    name.to_string()
}

/// A VAE conv (each has a bias): `k`x`k`, the same stride and padding along H and W.
fn conv(w: &mut Loader, name: &str, c_in: i64, c_out: i64, k: i64, stride: i64, padding: i64) -> Result<Conv2d> {
    Ok(Conv2d::load(w, name, c_in, c_out, [k, k], true)?.stride(stride).padding([padding, padding]))
}

/// 3x3, stride 1, same padding.
fn conv3(w: &mut Loader, name: &str, c_in: i64, c_out: i64) -> Result<Conv2d> {
    conv(w, name, c_in, c_out, 3, 1, 1)
}

/// A VAE norm: affine, eps 1e-6.
fn norm(w: &mut Loader, name: &str, channels: i64, groups: i64) -> Result<GroupNorm> {
    GroupNorm::load(w, name, channels, groups, EPS)
}

/// A mid-block attention projection, `c` -> `c` with bias.
fn proj(w: &mut Loader, name: &str, c: i64) -> Result<Linear> {
    // The original LDM layout stores these as 1x1 convolutions; the numbers are the same.
    let weight = w.get_or_reshape(&format!("{name}.weight"), &[c, c], &[c, c, 1, 1])?;
    Ok(Linear { weight, bias: Some(w.get(&format!("{name}.bias"), &[c])?) })
}

/// diffusers `ResnetBlock2D` without time embedding: norm, SiLU, conv, twice, plus a
/// shortcut (1x1 conv when the channel count changes).
pub struct ResnetBlock2D {
    pub norm1: GroupNorm,
    pub conv1: Conv2d,
    pub norm2: GroupNorm,
    pub conv2: Conv2d,
    pub conv_shortcut: Option<Conv2d>,
}

impl ResnetBlock2D {
    fn load(w: &mut Loader, name: &str, c_in: i64, c_out: i64, groups: i64) -> Result<Self> {
        Ok(ResnetBlock2D {
            norm1: norm(w, &format!("{name}.norm1"), c_in, groups)?,
            conv1: conv3(w, &format!("{name}.conv1"), c_in, c_out)?,
            norm2: norm(w, &format!("{name}.norm2"), c_out, groups)?,
            conv2: conv3(w, &format!("{name}.conv2"), c_out, c_out)?,
            conv_shortcut: if c_in != c_out { Some(conv(w, &format!("{name}.conv_shortcut"), c_in, c_out, 1, 1, 0)?) } else { None },
        })
    }

    /// x: [N, C_in, H, W] -> [N, C_out, H, W]
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let h = self.conv1.forward(&self.norm1.forward(x).silu());
        let h = self.conv2.forward(&self.norm2.forward(&h).silu());
        match &self.conv_shortcut {
            Some(c) => c.forward(x) + h,
            None => x + h,
        }
    }
}

/// Single-head self-attention over the H*W positions, with a residual (diffusers
/// `Attention` as built by the VAE's `UNetMidBlock2D`).
pub struct Attention {
    pub group_norm: GroupNorm,
    pub to_q: Linear,
    pub to_k: Linear,
    pub to_v: Linear,
    pub to_out_0: Linear,
}

impl Attention {
    fn load(w: &mut Loader, name: &str, c: i64, groups: i64) -> Result<Self> {
        Ok(Attention {
            group_norm: norm(w, &format!("{name}.group_norm"), c, groups)?,
            to_q: proj(w, &format!("{name}.to_q"), c)?,
            to_k: proj(w, &format!("{name}.to_k"), c)?,
            to_v: proj(w, &format!("{name}.to_v"), c)?,
            to_out_0: proj(w, &format!("{name}.to_out.0"), c)?,
        })
    }

    /// x: [N, C, H, W] -> [N, C, H, W]
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let (n, c, h, w) = x.size4().expect("attention input is [N, C, H, W]");
        // [N, C, H, W] -> [N, 1 head, H*W, C]
        let t = self.group_norm.forward(x).reshape([n, c, h * w]).transpose(1, 2);
        let (q, k, v) = (self.to_q.forward(&t).unsqueeze(1), self.to_k.forward(&t).unsqueeze(1), self.to_v.forward(&t).unsqueeze(1));
        let o = Tensor::scaled_dot_product_attention(&q, &k, &v, None::<Tensor>, 0.0, false, None, false);
        let o = self.to_out_0.forward(&o.squeeze_dim(1));
        o.transpose(1, 2).reshape([n, c, h, w]) + x
    }
}

/// `UNetMidBlock2D`: resnet, attention (unless `mid_block_add_attention` is false), resnet.
pub struct MidBlock {
    pub resnets: Vec<ResnetBlock2D>,
    pub attentions_0: Option<Attention>,
}

impl MidBlock {
    fn load(w: &mut Loader, name: &str, c: i64, cfg: &VaeConfig) -> Result<Self> {
        let g = cfg.norm_num_groups;
        let r0 = ResnetBlock2D::load(w, &format!("{name}.resnets.0"), c, c, g)?;
        let attentions_0 =
            if cfg.mid_block_add_attention { Some(Attention::load(w, &format!("{name}.attentions.0"), c, g)?) } else { None };
        let r1 = ResnetBlock2D::load(w, &format!("{name}.resnets.1"), c, c, g)?;
        Ok(MidBlock { resnets: vec![r0, r1], attentions_0 })
    }

    /// x: [N, C, H, W] -> [N, C, H, W]
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let mut h = self.resnets[0].forward(x);
        if let Some(a) = &self.attentions_0 {
            h = a.forward(&h);
        }
        self.resnets[1].forward(&h)
    }
}

/// `Downsample2D` with `padding=0`: pad right and bottom by one, then a 3x3 stride-2 conv
/// (the asymmetric pad is what the original LDM VAE did, and the weights expect it).
pub struct Downsample2D {
    pub conv: Conv2d,
}

impl Downsample2D {
    /// x: [N, C, H, W] -> [N, C, H/2, W/2]
    pub fn forward(&self, x: &Tensor) -> Tensor {
        self.conv.forward(&x.constant_pad_nd([0, 1, 0, 1]))
    }
}

/// `Upsample2D`: nearest-neighbour x2, then a 3x3 conv.
pub struct Upsample2D {
    pub conv: Conv2d,
}

impl Upsample2D {
    /// x: [N, C, H, W] -> [N, C, 2H, 2W]
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let (_, _, h, w) = x.size4().expect("upsample input is [N, C, H, W]");
        self.conv.forward(&x.upsample_nearest2d([2 * h, 2 * w], 2.0, 2.0))
    }
}

/// `DownEncoderBlock2D`: `layers_per_block` resnets, then a downsampler except in the last block.
pub struct DownEncoderBlock2D {
    pub resnets: Vec<ResnetBlock2D>,
    pub downsamplers_0: Option<Downsample2D>,
}

impl DownEncoderBlock2D {
    /// x: [N, C_in, H, W] -> [N, C_out, H/2, W/2] (H, W when there is no downsampler)
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let mut h = self.resnets.iter().fold(x.shallow_clone(), |h, r| r.forward(&h));
        if let Some(d) = &self.downsamplers_0 {
            h = d.forward(&h);
        }
        h
    }
}

/// `UpDecoderBlock2D`: `layers_per_block + 1` resnets, then an upsampler except in the last block.
pub struct UpDecoderBlock2D {
    pub resnets: Vec<ResnetBlock2D>,
    pub upsamplers_0: Option<Upsample2D>,
}

impl UpDecoderBlock2D {
    /// x: [N, C_in, H, W] -> [N, C_out, 2H, 2W] (H, W when there is no upsampler)
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let mut h = self.resnets.iter().fold(x.shallow_clone(), |h, r| r.forward(&h));
        if let Some(u) = &self.upsamplers_0 {
            h = u.forward(&h);
        }
        h
    }
}

/// Pixels in [-1, 1] to `2 * latent_channels` moments (mean, log-variance) at 1/2^(B-1) scale.
pub struct Encoder {
    pub conv_in: Conv2d,
    pub down_blocks: Vec<DownEncoderBlock2D>,
    pub mid_block: MidBlock,
    pub conv_norm_out: GroupNorm,
    pub conv_out: Conv2d,
}

impl Encoder {
    fn load(w: &mut Loader, cfg: &VaeConfig) -> Result<Self> {
        let (ch, g) = (&cfg.block_out_channels, cfg.norm_num_groups);
        let conv_in = conv3(w, "encoder.conv_in", cfg.in_channels, ch[0])?;
        let mut down_blocks = Vec::with_capacity(ch.len());
        let mut c_prev = ch[0];
        for (i, &c) in ch.iter().enumerate() {
            let name = format!("encoder.down_blocks.{i}");
            let mut resnets = Vec::new();
            for j in 0..cfg.layers_per_block {
                let c_in = if j == 0 { c_prev } else { c };
                resnets.push(ResnetBlock2D::load(w, &format!("{name}.resnets.{j}"), c_in, c, g)?);
            }
            let downsamplers_0 = if i + 1 < ch.len() {
                let conv = conv(w, &format!("{name}.downsamplers.0.conv"), c, c, 3, 2, 0)?;
                Some(Downsample2D { conv })
            } else {
                None
            };
            down_blocks.push(DownEncoderBlock2D { resnets, downsamplers_0 });
            c_prev = c;
        }
        let last = c_prev;
        Ok(Encoder {
            conv_in,
            down_blocks,
            mid_block: MidBlock::load(w, "encoder.mid_block", last, cfg)?,
            conv_norm_out: norm(w, "encoder.conv_norm_out", last, g)?,
            conv_out: conv3(w, "encoder.conv_out", last, 2 * cfg.latent_channels)?,
        })
    }

    /// x: [N, C_in, H, W] in [-1, 1] -> [N, 2 * latent, H/f, W/f]
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let h = self.down_blocks.iter().fold(self.conv_in.forward(x), |h, b| b.forward(&h));
        let h = self.mid_block.forward(&h);
        self.conv_out.forward(&self.conv_norm_out.forward(&h).silu())
    }
}

/// Latents to pixels in about [-1, 1]; the blocks mirror the encoder's, widest first.
pub struct Decoder {
    pub conv_in: Conv2d,
    pub mid_block: MidBlock,
    pub up_blocks: Vec<UpDecoderBlock2D>,
    pub conv_norm_out: GroupNorm,
    pub conv_out: Conv2d,
}

impl Decoder {
    fn load(w: &mut Loader, cfg: &VaeConfig) -> Result<Self> {
        let g = cfg.norm_num_groups;
        let rev: Vec<i64> = cfg.block_out_channels.iter().rev().copied().collect();
        let conv_in = conv3(w, "decoder.conv_in", cfg.latent_channels, rev[0])?;
        let mid_block = MidBlock::load(w, "decoder.mid_block", rev[0], cfg)?;
        let mut up_blocks = Vec::with_capacity(rev.len());
        let mut c_prev = rev[0];
        for (i, &c) in rev.iter().enumerate() {
            let name = format!("decoder.up_blocks.{i}");
            let mut resnets = Vec::new();
            for j in 0..=cfg.layers_per_block {
                let c_in = if j == 0 { c_prev } else { c };
                resnets.push(ResnetBlock2D::load(w, &format!("{name}.resnets.{j}"), c_in, c, g)?);
            }
            let upsamplers_0 =
                if i + 1 < rev.len() { Some(Upsample2D { conv: conv3(w, &format!("{name}.upsamplers.0.conv"), c, c)? }) } else { None };
            up_blocks.push(UpDecoderBlock2D { resnets, upsamplers_0 });
            c_prev = c;
        }
        Ok(Decoder {
            conv_in,
            mid_block,
            up_blocks,
            conv_norm_out: norm(w, "decoder.conv_norm_out", c_prev, g)?,
            conv_out: conv3(w, "decoder.conv_out", c_prev, cfg.out_channels)?,
        })
    }

    /// z: [N, latent, h, w] -> [N, C_out, h*f, w*f]
    pub fn forward(&self, z: &Tensor) -> Tensor {
        let h = self.mid_block.forward(&self.conv_in.forward(z));
        let h = self.up_blocks.iter().fold(h, |h, b| b.forward(&h));
        self.conv_out.forward(&self.conv_norm_out.forward(&h).silu())
    }
}

/// The whole autoencoder. Weights are kept in f32 on `device` and cast to the
/// compute dtype on the way in, as the SiT modules do.
pub struct Vae {
    pub encoder: Encoder,
    pub decoder: Decoder,
    pub quant_conv: Option<Conv2d>,
    pub post_quant_conv: Option<Conv2d>,
    latent_channels: i64,
    scaling_factor: f64,
    device: Device,
}

impl Vae {
    /// Loads `dir/config.json` + `dir/diffusion_pytorch_model.safetensors` (or `model.safetensors`) onto `device`.
    pub fn load(dir: &Path, device: Device) -> Result<Vae> {
        let cfg_path = dir.join("config.json");
        let cfg_file = cfg_path.display().to_string();
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| bad_input(format!("{cfg_file}: cannot read: {e}")))?;
        let cfg = VaeConfig::parse(&text, &cfg_file)?;
        let weights_path = ["diffusion_pytorch_model.safetensors", "model.safetensors"]
            .iter()
            .map(|f| dir.join(f))
            .find(|p| p.is_file())
            .ok_or_else(|| {
            bad_input(format!("{}: not found (nor model.safetensors beside it)", dir.join("diffusion_pytorch_model.safetensors").display()))
        })?;
        let mut w = Loader::open_renamed(&weights_path, device, rename_legacy)?;
        let two_c = 2 * cfg.latent_channels;
        let vae = Vae {
            encoder: Encoder::load(&mut w, &cfg)?,
            decoder: Decoder::load(&mut w, &cfg)?,
            quant_conv: if cfg.use_quant_conv { Some(conv(&mut w, "quant_conv", two_c, two_c, 1, 1, 0)?) } else { None },
            post_quant_conv: if cfg.use_post_quant_conv {
                let c = cfg.latent_channels;
                Some(conv(&mut w, "post_quant_conv", c, c, 1, 1, 0)?)
            } else {
                None
            },
            latent_channels: cfg.latent_channels,
            scaling_factor: cfg.scaling_factor,
            device,
        };
        w.finish("the VAE that config.json describes")?;
        Ok(vae)
    }

    pub fn latent_channels(&self) -> i64 {
        self.latent_channels
    }

    pub fn scaling_factor(&self) -> f64 {
        self.scaling_factor
    }

    /// Pixels [N, 3, H, W] u8 -> VAE moments [N, 2*C, H/8, W/8] f32: mean then std = exp(0.5 * clamp(logvar, -30, 20)). Input scaled x/127.5 - 1. Computes in `kind` (f32 or bf16), returns f32.
    ///
    /// The result is on the device `pixels` came from.
    pub fn encode_moments(&self, pixels: &Tensor, kind: Kind) -> Tensor {
        tch::no_grad(|| {
            let x = pixels.to_device(self.device).to_kind(Kind::Float) / 127.5 - 1.0;
            let mut h = self.encoder.forward(&x.to_kind(kind));
            if let Some(q) = &self.quant_conv {
                h = q.forward(&h);
            }
            // The exp is done in f32 whatever `kind` was, so bf16 does not round std twice.
            let h = h.to_kind(Kind::Float);
            let c = self.latent_channels;
            let mean = h.narrow(1, 0, c);
            let std = (h.narrow(1, c, c).clamp(-30.0, 20.0) * 0.5).exp();
            Tensor::cat(&[mean, std], 1).to_device(pixels.device())
        })
    }

    /// Scaled latents [N, C, h, w] (as the diffusion model sees them) -> pixels [N, 3, 8h, 8w] u8: x / scaling_factor, decode, (x + 1) / 2 clamped to [0, 1], *255 rounded.
    ///
    /// The result is on the device `latents` came from.
    pub fn decode(&self, latents: &Tensor, kind: Kind) -> Tensor {
        tch::no_grad(|| {
            let raw = self.decode_raw(&(latents.to_kind(Kind::Float) / self.scaling_factor), kind);
            (((raw + 1.0) / 2.0).clamp(0.0, 1.0) * 255.0).round().to_kind(Kind::Uint8)
        })
    }

    /// Decoder output before quantisation: [N, 3, H, W] f32 in about [-1, 1] (for tests).
    pub fn decode_raw(&self, latents_unscaled: &Tensor, kind: Kind) -> Tensor {
        tch::no_grad(|| {
            let mut z = latents_unscaled.to_device(self.device).to_kind(kind);
            if let Some(p) = &self.post_quant_conv {
                z = p.forward(&z);
            }
            self.decoder.forward(&z).to_kind(Kind::Float).to_device(latents_unscaled.device())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn legacy_attention_names_are_renamed() {
        assert_eq!(rename_legacy("encoder.mid_block.attentions.0.query.weight"), "encoder.mid_block.attentions.0.to_q.weight");
        assert_eq!(rename_legacy("decoder.mid_block.attentions.0.proj_attn.bias"), "decoder.mid_block.attentions.0.to_out.0.bias");
        assert_eq!(rename_legacy("encoder.mid_block.attentions.0.group_norm.weight"), "encoder.mid_block.attentions.0.group_norm.weight");
        assert_eq!(rename_legacy("encoder.down_blocks.0.resnets.0.conv1.weight"), "encoder.down_blocks.0.resnets.0.conv1.weight");
    }

    #[test]
    fn config_defaults_follow_diffusers() {
        let c = VaeConfig::parse("{}", "config.json").unwrap();
        assert_eq!((c.in_channels, c.latent_channels, c.norm_num_groups), (3, 4, 32));
        assert_eq!(c.block_out_channels, vec![64]);
        assert!(c.use_quant_conv && c.use_post_quant_conv && c.mid_block_add_attention);
    }
}
