//! DINOv2 ViT/14 encoder in the layout of transformers' `Dinov2Model` (`facebook/dinov2-*`), frozen.

use crate::bail_input;
use crate::encoders::hub_config::Activation;
use crate::encoders::hub_config::{self, positive, positive_float};
use crate::encoders::loader::Loader;
use crate::error::bad_input;
use crate::layers::{self_attention, Conv2d, LayerNorm, Linear};
use anyhow::Result;
use serde::Deserialize;
use serde_json::Value;
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// ImageNet statistics the DINOv2 weights were trained with.
const MEAN: [f64; 3] = [0.485, 0.456, 0.406];
const STD: [f64; 3] = [0.229, 0.224, 0.225];

/// The fields of `config.json` the forward pass depends on (`Dinov2Config`). Sizes are
/// required; the rest defaults as in transformers.
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct Dinov2Config {
    #[serde(deserialize_with = "positive")]
    pub hidden_size: i64,
    #[serde(deserialize_with = "positive")]
    pub num_hidden_layers: i64,
    #[serde(deserialize_with = "positive")]
    pub num_attention_heads: i64,
    #[serde(default = "mlp_ratio", deserialize_with = "positive_float")]
    pub mlp_ratio: f64,
    #[serde(deserialize_with = "positive")]
    pub patch_size: i64,
    /// The resolution the position table was trained for (518 for the published models).
    #[serde(deserialize_with = "positive")]
    pub image_size: i64,
    #[serde(default = "rgb", deserialize_with = "positive")]
    pub num_channels: i64,
    #[serde(default = "layer_norm_eps", deserialize_with = "positive_float")]
    pub layer_norm_eps: f64,
    #[serde(default = "gelu")]
    pub hidden_act: Activation,
    #[serde(default = "yes")]
    pub qkv_bias: bool,
    #[serde(default)]
    pub use_swiglu_ffn: bool,
    /// Register tokens between the class token and the patches
    /// (`Dinov2WithRegistersModel`, e.g. facebook/dinov2-with-registers-base: 4); 0 for
    /// `Dinov2Model`.
    #[serde(default)]
    pub num_register_tokens: i64,
}

fn mlp_ratio() -> f64 {
    4.0
}
fn rgb() -> i64 {
    3
}
fn layer_norm_eps() -> f64 {
    1e-6
}
fn gelu() -> Activation {
    Activation::Gelu
}
fn yes() -> bool {
    true
}

impl Dinov2Config {
    /// Parses a `config.json`. Sizes are required; the rest defaults as in `Dinov2Config`.
    /// `layerscale_value` is only an initial value and the weights carry `lambda1`, so it is not read.
    pub fn parse(text: &str, file: &str) -> Result<Self> {
        let obj = hub_config::object(text, file)?;
        // Registers, or another model's config, would load into the wrong layout.
        let registers = match obj.get("model_type") {
            None => false,
            Some(t) if t == "dinov2" => false,
            Some(t) if t == "dinov2_with_registers" => true,
            Some(t) => {
                bail_input!("{file}: field model_type: {t} is not a supported encoder (supported: \"dinov2\", \"dinov2_with_registers\")")
            }
        };
        let given = obj.get("num_register_tokens").is_some();
        let mut c: Dinov2Config = hub_config::from_value(obj, file)?;
        // `Dinov2Model` has no registers whatever the field says; transformers'
        // `Dinov2WithRegistersConfig` defaults to 4.
        c.num_register_tokens = match (registers, given) {
            (false, _) => 0,
            (true, false) => 4,
            (true, true) => c.num_register_tokens,
        };
        if c.num_register_tokens < 0 {
            bail_input!("{file}: field num_register_tokens: must not be negative, found {}", c.num_register_tokens);
        }
        if c.hidden_size % c.num_attention_heads != 0 {
            bail_input!("{file}: field num_attention_heads: {} does not divide hidden_size {}", c.num_attention_heads, c.hidden_size);
        }
        if c.image_size % c.patch_size != 0 {
            bail_input!("{file}: field image_size: {} is not a multiple of patch_size {}", c.image_size, c.patch_size);
        }
        if c.num_channels != 3 {
            bail_input!("{file}: field num_channels: expected 3 (RGB), found {}", c.num_channels);
        }
        if c.mlp_hidden() <= 0 {
            bail_input!("{file}: field mlp_ratio: {} gives an empty MLP", c.mlp_ratio);
        }
        Ok(c)
    }

    /// Width of the feed-forward hidden layer, as transformers computes it: `int(D * mlp_ratio)`,
    /// and for SwiGLU two thirds of that rounded up to a multiple of 8.
    pub fn mlp_hidden(&self) -> i64 {
        let h = (self.hidden_size as f64 * self.mlp_ratio) as i64;
        if self.use_swiglu_ffn {
            ((h * 2 / 3) + 7) / 8 * 8
        } else {
            h
        }
    }

    pub fn head_dim(&self) -> i64 {
        self.hidden_size / self.num_attention_heads
    }

    /// `config.json` as transformers' `Dinov2Config.to_dict()` names the fields, so that
    /// `Dinov2Model.from_pretrained` and `parse` both read it. Dropouts are 0 and the
    /// initial layer scale 1.0 (the values `train-encoder` trains with).
    pub fn to_json(&self) -> Value {
        let act = self.hidden_act.name();
        let (architecture, model_type) = match self.num_register_tokens {
            0 => ("Dinov2Model", "dinov2"),
            _ => ("Dinov2WithRegistersModel", "dinov2_with_registers"),
        };
        let mut j = serde_json::json!({
            "architectures": [architecture],
            "model_type": model_type,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "mlp_ratio": self.mlp_ratio,
            "patch_size": self.patch_size,
            "image_size": self.image_size,
            "num_channels": self.num_channels,
            "layer_norm_eps": self.layer_norm_eps,
            "hidden_act": act,
            "qkv_bias": self.qkv_bias,
            "use_swiglu_ffn": self.use_swiglu_ffn,
            "hidden_dropout_prob": 0.0,
            "attention_probs_dropout_prob": 0.0,
            "drop_path_rate": 0.0,
            "initializer_range": 0.02,
            "layerscale_value": 1.0,
            "apply_layernorm": true,
            "use_mask_token": true,
            "dtype": "float32",
        });
        if self.num_register_tokens > 0 {
            j["num_register_tokens"] = self.num_register_tokens.into();
        }
        j
    }
}

/// `embeddings`: patch projection, class token, position table (already at the run's grid),
/// register tokens.
pub struct Embeddings {
    /// [1, 1, D]
    pub cls_token: Tensor,
    /// Inserted after the class token, past the position table (which has no rows for
    /// them). [1, R, D]
    pub register_tokens: Option<Tensor>,
    /// The table resampled to `input_size / patch`, class row first. [1, 1 + T, D] f32
    pub position_embeddings: Tensor,
    /// `patch_embeddings.projection`: p x p, stride p.
    pub projection: Conv2d,
}

impl Embeddings {
    /// x: [N, 3, H, W] -> [N, 1 + R + T, D] in x's dtype
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let k = x.kind();
        let n = x.size()[0];
        let patches = self.projection.forward(x).flatten(2, -1).transpose(1, 2);
        let cls = self.cls_token.to_kind(k).expand([n, 1, -1], false);
        let h = Tensor::cat(&[cls, patches], 1) + self.position_embeddings.to_kind(k);
        match &self.register_tokens {
            None => h,
            Some(r) => {
                let t = h.size()[1];
                Tensor::cat(&[h.narrow(1, 0, 1), r.to_kind(k).expand([n, -1, -1], false), h.narrow(1, 1, t - 1)], 1)
            }
        }
    }
}

/// `attention`: `attention.{query,key,value}` and `output.dense`.
pub struct Attention {
    pub query: Linear,
    pub key: Linear,
    pub value: Linear,
    pub output_dense: Linear,
    heads: i64,
}

impl Attention {
    /// x: [N, T, D] -> [N, T, D]
    pub fn forward(&self, x: &Tensor) -> Tensor {
        // No dropout at inference: what the eager path computes.
        self_attention(x, &self.query, &self.key, &self.value, &self.output_dense, self.heads, false)
    }
}

/// `mlp`: `fc1 -> act -> fc2`, or SwiGLU `weights_in -> silu(a) * b -> weights_out`.
pub enum Mlp {
    Plain { fc1: Linear, fc2: Linear, act: Activation },
    SwiGlu { weights_in: Linear, weights_out: Linear },
}

impl Mlp {
    pub fn forward(&self, x: &Tensor) -> Tensor {
        match self {
            Mlp::Plain { fc1, fc2, act } => fc2.forward(&act.apply(&fc1.forward(x))),
            Mlp::SwiGlu { weights_in, weights_out } => {
                let h = weights_in.forward(x).chunk(2, -1);
                weights_out.forward(&(h[0].silu() * &h[1]))
            }
        }
    }
}

/// `encoder.layer.{i}`: pre-norm block with per-channel layer scales.
pub struct Layer {
    pub norm1: LayerNorm,
    pub attention: Attention,
    /// `layer_scale1.lambda1` [D]
    pub layer_scale1: Tensor,
    pub norm2: LayerNorm,
    pub mlp: Mlp,
    /// `layer_scale2.lambda1` [D]
    pub layer_scale2: Tensor,
}

impl Layer {
    fn load(ld: &mut Loader, i: i64, c: &Dinov2Config) -> Result<Self> {
        let name = format!("encoder.layer.{i}");
        let (d, eps) = (c.hidden_size, c.layer_norm_eps);
        let a = format!("{name}.attention");
        let attention = Attention {
            query: Linear::load(ld, &format!("{a}.attention.query"), d, d, c.qkv_bias)?,
            key: Linear::load(ld, &format!("{a}.attention.key"), d, d, c.qkv_bias)?,
            value: Linear::load(ld, &format!("{a}.attention.value"), d, d, c.qkv_bias)?,
            output_dense: Linear::load(ld, &format!("{a}.output.dense"), d, d, true)?,
            heads: c.num_attention_heads,
        };
        let h = c.mlp_hidden();
        let mlp = if c.use_swiglu_ffn {
            Mlp::SwiGlu {
                weights_in: Linear::load(ld, &format!("{name}.mlp.weights_in"), d, 2 * h, true)?,
                weights_out: Linear::load(ld, &format!("{name}.mlp.weights_out"), h, d, true)?,
            }
        } else {
            Mlp::Plain {
                fc1: Linear::load(ld, &format!("{name}.mlp.fc1"), d, h, true)?,
                fc2: Linear::load(ld, &format!("{name}.mlp.fc2"), h, d, true)?,
                act: c.hidden_act,
            }
        };
        Ok(Layer {
            norm1: LayerNorm::load(ld, &format!("{name}.norm1"), d, eps)?,
            attention,
            layer_scale1: ld.get(&format!("{name}.layer_scale1.lambda1"), &[d])?,
            norm2: LayerNorm::load(ld, &format!("{name}.norm2"), d, eps)?,
            mlp,
            layer_scale2: ld.get(&format!("{name}.layer_scale2.lambda1"), &[d])?,
        })
    }

    /// x: [N, T, D] -> [N, T, D]
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let k = x.kind();
        let x = x + self.attention.forward(&self.norm1.forward(x)) * self.layer_scale1.to_kind(k);
        &x + self.mlp.forward(&self.norm2.forward(&x)) * self.layer_scale2.to_kind(k)
    }
}

/// Resamples the patch rows of a `[1, 1 + g0^2, D]` table to a `g x g` grid the way timm's
/// `resample_abs_pos_embed` does (bicubic, antialiased, align_corners = false, in f32);
/// the class row is kept as is. -> [1, 1 + g^2, D]
pub fn resample_pos_embed(table: &Tensor, grid: i64) -> Tensor {
    let (_, rows, d) = table.size3().expect("position table is [1, 1 + T, D]");
    let old = ((rows - 1) as f64).sqrt().round() as i64;
    if old == grid {
        // timm returns the table untouched when the size already matches.
        return table.shallow_clone();
    }
    let table = table.to_kind(Kind::Float);
    let cls = table.narrow(1, 0, 1);
    let patches = table.narrow(1, 1, rows - 1).reshape([1, old, old, d]).permute([0, 3, 1, 2]);
    let resized = patches.internal_upsample_bicubic2d_aa([grid, grid], false, None, None);
    let resized = resized.permute([0, 2, 3, 1]).reshape([1, grid * grid, d]);
    Tensor::cat(&[cls, resized], 1)
}

/// DINOv2 (`Dinov2Model`): embeddings, `encoder.layer.*`, final `layernorm`.
pub struct Dinov2 {
    pub config: Dinov2Config,
    pub embeddings: Embeddings,
    pub layers: Vec<Layer>,
    pub layernorm: LayerNorm,
    input_size: i64,
    device: Device,
}

impl Dinov2 {
    /// Loads `dir/config.json` + `dir/model.safetensors` onto `device`; the position table is
    /// resampled once here from the config's grid (`image_size / patch_size`, 37 for 518) to
    /// `input_size / patch_size` (16 for 224), bicubic, antialiased, align_corners = false, as
    /// timm's `resample_abs_pos_embed` does (class-token row kept as is).
    pub fn load(dir: &Path, device: Device, input_size: i64) -> Result<Dinov2> {
        let (config, cfg_file) = Self::read_config(dir)?;
        let mut ld = Loader::open(&dir.join("model.safetensors"), device)?;
        Self::from_loader(config, &mut ld, device, input_size, &cfg_file)
    }

    /// As `load`, at the resolution that gives a `grid` x `grid` patch grid with the folder's
    /// own patch size (`grid * patch_size`: 224 for DINOv2/14 on a 16 x 16 grid), so that
    /// its tokens match a model with that many patches whatever the encoder's patch.
    pub fn load_grid(dir: &Path, device: Device, grid: i64) -> Result<Dinov2> {
        let (config, _) = Self::read_config(dir)?;
        Self::load(dir, device, grid * config.patch_size)
    }

    fn read_config(dir: &Path) -> Result<(Dinov2Config, String)> {
        let cfg_path = dir.join("config.json");
        let cfg_file = cfg_path.display().to_string();
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| bad_input(format!("{cfg_file}: cannot read: {e}")))?;
        Ok((Dinov2Config::parse(&text, &cfg_file)?, cfg_file))
    }

    /// Builds the network from the tensors `ld` hands out under transformers' names. The
    /// tensors are used as given (no copy when already f32 on `device`), so a `Loader` over
    /// variables that require grad gives a trainable network (`shapes::encoder`).
    /// `what` names the config in errors.
    pub fn from_loader(config: Dinov2Config, ld: &mut Loader, device: Device, input_size: i64, what: &str) -> Result<Dinov2> {
        let p = config.patch_size;
        if input_size <= 0 || input_size % p != 0 {
            bail_input!("{what}: input size {input_size} is not a positive multiple of patch_size {p}");
        }
        let d = config.hidden_size;
        let g0 = config.image_size / p;
        let table = ld.get("embeddings.position_embeddings", &[1, 1 + g0 * g0, d])?;
        let embeddings = Embeddings {
            cls_token: ld.get("embeddings.cls_token", &[1, 1, d])?,
            register_tokens: match config.num_register_tokens {
                0 => None,
                r => Some(ld.get("embeddings.register_tokens", &[1, r, d])?),
            },
            position_embeddings: resample_pos_embed(&table, input_size / p),
            projection: Conv2d::load(ld, "embeddings.patch_embeddings.projection", config.num_channels, d, [p, p], true)?.stride(p),
        };
        let layers = (0..config.num_hidden_layers).map(|i| Layer::load(ld, i, &config)).collect::<Result<_>>()?;
        let layernorm = LayerNorm::load(ld, "layernorm", d, config.layer_norm_eps)?;
        // Tensors left over (mask_token, pooler heads) are not used by the forward pass.
        Ok(Dinov2 { config, embeddings, layers, layernorm, input_size, device })
    }

    pub fn hidden_size(&self) -> i64 {
        self.config.hidden_size
    }

    /// Tokens out: 1 + (input_size / patch)^2.
    pub fn num_tokens(&self) -> i64 {
        let g = self.input_size / self.config.patch_size;
        1 + g * g
    }

    /// The resolution the ViT runs at.
    pub fn input_size(&self) -> i64 {
        self.input_size
    }

    /// Pixels [N, 3, H, W] u8 -> [N, 1 + T, D] f32 (class token first, after the final
    /// LayerNorm), as REG preprocesses (`preprocess`); the ViT then computes in `kind`. No grad.
    pub fn features(&self, pixels: &Tensor, kind: Kind) -> Tensor {
        tch::no_grad(|| self.forward_preprocessed(&self.preprocess(pixels), kind))
    }

    /// Pixels [N, 3, H, W] u8 -> [N, 3, input_size, input_size] f32 the way REG feeds the
    /// encoder: x / 255, ImageNet normalisation, bicubic resize to `input_size`
    /// (align_corners = false, no antialias; `F.interpolate`'s defaults), all in f32.
    pub fn preprocess(&self, pixels: &Tensor) -> Tensor {
        let (_, c, h, w) = pixels.size4().expect("pixels are [N, 3, H, W]");
        assert_eq!(c, 3, "pixels are [N, 3, H, W]");
        let mean = Tensor::from_slice(&MEAN).to_kind(Kind::Float).to_device(self.device).reshape([1, 3, 1, 1]);
        let std = Tensor::from_slice(&STD).to_kind(Kind::Float).to_device(self.device).reshape([1, 3, 1, 1]);
        let x = pixels.to_device(self.device).to_kind(Kind::Float) / 255.0;
        let x = (x - mean) / std;
        let s = self.input_size;
        // At the same size bicubic is the identity; skipping it saves a pass.
        if (h, w) == (s, s) {
            x
        } else {
            x.upsample_bicubic2d([s, s], false, None, None)
        }
    }

    /// The ViT on already-preprocessed input [N, 3, input_size, input_size] f32 -> [N, 1 + T, D] f32
    /// (class token and patches, registers dropped), computing in `kind`. No grad.
    pub fn forward_preprocessed(&self, x: &Tensor, kind: Kind) -> Tensor {
        tch::no_grad(|| self.forward(x, kind))
    }

    /// As `forward_preprocessed`, recording the graph when grad is enabled: the one forward
    /// pass that both the frozen encoder and `train-encoder` run.
    pub fn forward(&self, x: &Tensor, kind: Kind) -> Tensor {
        let s = self.input_size;
        let size = x.size();
        assert!(size.len() == 4 && size[1] == 3 && size[2] == s && size[3] == s, "input is [N, 3, {s}, {s}], found {size:?}");
        let mut h = self.embeddings.forward(&x.to_device(self.device).to_kind(kind));
        for layer in &self.layers {
            h = layer.forward(&h);
        }
        let h = self.layernorm.forward(&h).to_kind(Kind::Float);
        // The class token and the patches: registers are dropped, as REG's `dinov2reg`
        // takes `x_norm_clstoken` and `x_norm_patchtokens`.
        match self.config.num_register_tokens {
            0 => h,
            r => {
                let t = h.size()[1];
                Tensor::cat(&[h.narrow(1, 0, 1), h.narrow(1, 1 + r, t - 1 - r)], 1)
            }
        }
    }
}
