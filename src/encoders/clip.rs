//! CLIP text and image towers in the layout of transformers' `CLIPModel` / `CLIPTextModel` / `CLIPVisionModel` (`openai/clip-vit-*`), frozen.

use crate::bail_input;
use crate::encoders::hub_config::Activation;
use crate::encoders::hub_config::{self, positive, positive_float};
use crate::encoders::loader::Loader;
use crate::error::bad_input;
use crate::layers::{self_attention, Conv2d, LayerNorm, Linear};
use anyhow::{ensure, Result};
use serde::Deserialize;
use serde_json::Value;
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// The fields of one tower's config the forward pass depends on (shared by text and vision).
#[derive(Clone, Debug, PartialEq)]
pub struct TowerConfig {
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    pub layer_norm_eps: f64,
    pub hidden_act: Activation,
}

/// `CLIPTextConfig`.
#[derive(Clone, Debug, PartialEq)]
pub struct TextConfig {
    pub tower: TowerConfig,
    pub vocab_size: i64,
    pub max_position_embeddings: i64,
    /// Picks the pooling rule: 2 is the value of configs written before transformers PR
    /// #24773 (openai's), which pool at the largest id instead.
    pub eos_token_id: i64,
    /// `text_projection`'s width in a `CLIPTextModelWithProjection` folder.
    pub projection_dim: i64,
}

/// `CLIPVisionConfig`.
#[derive(Clone, Debug, PartialEq)]
pub struct VisionConfig {
    pub tower: TowerConfig,
    pub image_size: i64,
    pub patch_size: i64,
    pub num_channels: i64,
    pub projection_dim: i64,
}

/// What a CLIP folder's `config.json` describes: a `CLIPModel` (both towers, projections to
/// `projection_dim`) or one tower alone.
#[derive(Clone, Debug, PartialEq)]
pub struct ClipConfig {
    pub text: Option<TextConfig>,
    pub vision: Option<VisionConfig>,
    /// `CLIPModel`'s shared embedding width; `None` for a single tower.
    pub projection_dim: Option<i64>,
}

/// One tower's fields as `config.json` holds them, after `fill` has put in the defaults
/// of its kind.
#[derive(Deserialize)]
struct RawTower {
    #[serde(deserialize_with = "positive")]
    hidden_size: i64,
    #[serde(deserialize_with = "positive")]
    intermediate_size: i64,
    #[serde(deserialize_with = "positive")]
    num_hidden_layers: i64,
    #[serde(deserialize_with = "positive")]
    num_attention_heads: i64,
    #[serde(deserialize_with = "positive_float")]
    layer_norm_eps: f64,
    hidden_act: Activation,
    #[serde(deserialize_with = "positive")]
    projection_dim: i64,
    // Text towers.
    #[serde(deserialize_with = "positive")]
    vocab_size: i64,
    #[serde(deserialize_with = "positive")]
    max_position_embeddings: i64,
    /// A list of end tokens is allowed by transformers' type but its pooling then fails;
    /// only one id has a meaning here.
    eos_token_id: i64,
    // Vision towers.
    #[serde(deserialize_with = "positive")]
    image_size: i64,
    #[serde(deserialize_with = "positive")]
    patch_size: i64,
    #[serde(deserialize_with = "positive")]
    num_channels: i64,
}

/// The defaults of `CLIPTextConfig` (`text`) or `CLIPVisionConfig` (openai/clip-vit-base-patch32's).
fn defaults(text: bool) -> Value {
    let (hidden, intermediate, heads) = if text { (512, 2048, 8) } else { (768, 3072, 12) };
    serde_json::json!({
        "hidden_size": hidden, "intermediate_size": intermediate, "num_hidden_layers": 12,
        "num_attention_heads": heads, "layer_norm_eps": 1e-5, "hidden_act": "quick_gelu",
        "projection_dim": 512, "vocab_size": 49408, "max_position_embeddings": 77,
        "eos_token_id": 49407, "image_size": 224, "patch_size": 32, "num_channels": 3,
    })
}

/// Puts the defaults of its kind into a tower's fields that are missing.
fn fill(tower: &mut Value, text: bool) {
    if let (Value::Object(m), Value::Object(d)) = (tower, defaults(text)) {
        for (k, v) in d {
            m.entry(k).or_insert(v);
        }
    }
}

impl RawTower {
    fn tower(&self) -> TowerConfig {
        TowerConfig {
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_hidden_layers: self.num_hidden_layers,
            num_attention_heads: self.num_attention_heads,
            layer_norm_eps: self.layer_norm_eps,
            hidden_act: self.hidden_act,
        }
    }

    /// `path` is the tower's place in the file (`text_config.`, or empty at the top).
    fn text(&self, file: &str, path: &str) -> Result<TextConfig> {
        self.check(file, path)?;
        Ok(TextConfig {
            tower: self.tower(),
            vocab_size: self.vocab_size,
            max_position_embeddings: self.max_position_embeddings,
            eos_token_id: self.eos_token_id,
            projection_dim: self.projection_dim,
        })
    }

    fn vision(&self, file: &str, path: &str) -> Result<VisionConfig> {
        self.check(file, path)?;
        if self.image_size % self.patch_size != 0 {
            bail_input!("{file}: field {path}image_size: {} is not a multiple of patch_size {}", self.image_size, self.patch_size);
        }
        Ok(VisionConfig {
            tower: self.tower(),
            image_size: self.image_size,
            patch_size: self.patch_size,
            num_channels: self.num_channels,
            projection_dim: self.projection_dim,
        })
    }

    fn check(&self, file: &str, path: &str) -> Result<()> {
        if self.hidden_size % self.num_attention_heads != 0 {
            bail_input!(
                "{file}: field {path}num_attention_heads: {} does not divide hidden_size {}",
                self.num_attention_heads,
                self.hidden_size
            );
        }
        Ok(())
    }
}

/// A `CLIPModel` config: both towers and the shared width.
#[derive(Deserialize)]
struct RawClip {
    #[serde(alias = "text_config_dict")]
    text_config: RawTower,
    #[serde(alias = "vision_config_dict")]
    vision_config: RawTower,
    #[serde(deserialize_with = "positive")]
    projection_dim: i64,
}

impl ClipConfig {
    /// Parses a `config.json` by its `model_type`: `clip`, `clip_text_model` or
    /// `clip_vision_model`. Missing fields take transformers' defaults.
    pub fn parse(text: &str, file: &str) -> Result<Self> {
        let mut root = hub_config::object(text, file)?;
        let kind = root.get("model_type").cloned();
        match kind.as_ref().and_then(Value::as_str) {
            Some("clip") => {
                let obj = root.as_object_mut().expect("an object");
                let mut paths = Vec::new();
                for (name, is_text) in [("text_config", true), ("vision_config", false)] {
                    // `{name}_dict`, the older spelling, wins over `name` as in `CLIPConfig`
                    // (whose update replaces every field with the dict's or its default).
                    let dict = format!("{name}_dict");
                    let key = match obj.contains_key(&dict) {
                        true => {
                            obj.remove(name);
                            dict
                        }
                        false => name.to_string(),
                    };
                    let sub = obj.entry(key.clone()).or_insert_with(|| Value::Object(Default::default()));
                    if !sub.is_object() {
                        bail_input!("{file}: field {key}: expected a JSON object, found {sub}");
                    }
                    fill(sub, is_text);
                    paths.push(format!("{key}."));
                }
                obj.entry("projection_dim").or_insert(512.into());
                let c: RawClip = hub_config::from_value(root, file)?;
                Ok(ClipConfig {
                    text: Some(c.text_config.text(file, &paths[0])?),
                    vision: Some(c.vision_config.vision(file, &paths[1])?),
                    projection_dim: Some(c.projection_dim),
                })
            }
            Some(k @ ("clip_text_model" | "clip_vision_model")) => {
                let is_text = k == "clip_text_model";
                fill(&mut root, is_text);
                let t: RawTower = hub_config::from_value(root, file)?;
                Ok(match is_text {
                    true => ClipConfig { text: Some(t.text(file, "")?), vision: None, projection_dim: None },
                    false => ClipConfig { text: None, vision: Some(t.vision(file, "")?), projection_dim: None },
                })
            }
            _ => bail_input!(
                "{file}: field model_type: expected \"clip\", \"clip_text_model\" or \"clip_vision_model\", found {}",
                kind.map_or("nothing".to_string(), |v| v.to_string())
            ),
        }
    }
}

/// `self_attn`: `q_proj`, `k_proj`, `v_proj`, `out_proj`.
pub struct Attention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub out_proj: Linear,
    heads: i64,
}

impl Attention {
    /// x: [N, T, D] -> [N, T, D]; `causal` for the text tower (each token sees those before it).
    pub fn forward(&self, x: &Tensor, causal: bool) -> Tensor {
        // Scale 1/sqrt(head_dim): CLIPAttention's `scale`.
        self_attention(x, &self.q_proj, &self.k_proj, &self.v_proj, &self.out_proj, self.heads, causal)
    }
}

/// `encoder.layers.{i}`: pre-norm block, `x + attn(ln1(x))`, then `x + mlp(ln2(x))`.
pub struct EncoderLayer {
    pub layer_norm1: LayerNorm,
    pub self_attn: Attention,
    pub layer_norm2: LayerNorm,
    /// `mlp.fc1`, `mlp.fc2`
    pub fc1: Linear,
    pub fc2: Linear,
    act: Activation,
}

impl EncoderLayer {
    fn load(ld: &mut Loader, name: &str, c: &TowerConfig) -> Result<Self> {
        let (d, eps) = (c.hidden_size, c.layer_norm_eps);
        let lin = |ld: &mut Loader, part: &str, i: i64, o: i64| Linear::load(ld, &format!("{name}.{part}"), i, o, true);
        Ok(EncoderLayer {
            layer_norm1: LayerNorm::load(ld, &format!("{name}.layer_norm1"), d, eps)?,
            self_attn: Attention {
                q_proj: lin(ld, "self_attn.q_proj", d, d)?,
                k_proj: lin(ld, "self_attn.k_proj", d, d)?,
                v_proj: lin(ld, "self_attn.v_proj", d, d)?,
                out_proj: lin(ld, "self_attn.out_proj", d, d)?,
                heads: c.num_attention_heads,
            },
            layer_norm2: LayerNorm::load(ld, &format!("{name}.layer_norm2"), d, eps)?,
            fc1: lin(ld, "mlp.fc1", d, c.intermediate_size)?,
            fc2: lin(ld, "mlp.fc2", c.intermediate_size, d)?,
            act: c.hidden_act,
        })
    }

    /// x: [N, T, D] -> [N, T, D]
    pub fn forward(&self, x: &Tensor, causal: bool) -> Tensor {
        let x = x + self.self_attn.forward(&self.layer_norm1.forward(x), causal);
        &x + self.fc2.forward(&self.act.apply(&self.fc1.forward(&self.layer_norm2.forward(&x))))
    }
}

fn load_layers(ld: &mut Loader, prefix: &str, c: &TowerConfig) -> Result<Vec<EncoderLayer>> {
    (0..c.num_hidden_layers).map(|i| EncoderLayer::load(ld, &format!("{prefix}encoder.layers.{i}"), c)).collect()
}

/// What the text tower gives: every token's state and the pooled one.
pub struct TextOutput {
    /// After `final_layer_norm`. [B, L, D] f32
    pub last_hidden_state: Tensor,
    /// The state at the end-of-text token. [B, D] f32
    pub pooled: Tensor,
}

/// `text_model` (`CLIPTextTransformer`): token + position embeddings, causal pre-norm layers,
/// `final_layer_norm`.
pub struct TextTransformer {
    pub config: TextConfig,
    /// `embeddings.token_embedding.weight` [V, D]
    pub token_embedding: Tensor,
    /// `embeddings.position_embedding.weight` [P, D]
    pub position_embedding: Tensor,
    pub layers: Vec<EncoderLayer>,
    pub final_layer_norm: LayerNorm,
}

impl TextTransformer {
    fn load(ld: &mut Loader, prefix: &str, config: TextConfig) -> Result<Self> {
        let c = &config.tower;
        let d = c.hidden_size;
        Ok(TextTransformer {
            token_embedding: ld.get(&format!("{prefix}embeddings.token_embedding.weight"), &[config.vocab_size, d])?,
            position_embedding: ld.get(&format!("{prefix}embeddings.position_embedding.weight"), &[config.max_position_embeddings, d])?,
            layers: load_layers(ld, prefix, c)?,
            final_layer_norm: LayerNorm::load(ld, &format!("{prefix}final_layer_norm"), d, c.layer_norm_eps)?,
            config,
        })
    }

    /// ids: [B, L] i64 with L <= max_position_embeddings, computing in `kind`. No attention
    /// mask besides the causal one, as CLIP is used for conditioning: states up to the end
    /// token do not see the padding after it. Ids out of the vocabulary are an error.
    pub fn forward(&self, ids: &Tensor, kind: Kind) -> Result<TextOutput> {
        let size = ids.size();
        ensure!(size.len() == 2 && ids.kind() == Kind::Int64, "token ids must be [B, L] int64, found {size:?} {:?}", ids.kind());
        let (b, l) = (size[0], size[1]);
        let (v, p) = (self.config.vocab_size, self.config.max_position_embeddings);
        ensure!(l <= p, "{l} tokens are more than the {p} positions of the text tower");
        let device = self.token_embedding.device();
        let ids = ids.to_device(device);
        if b * l > 0 {
            let (lo, hi) = (ids.min().int64_value(&[]), ids.max().int64_value(&[]));
            ensure!(lo >= 0 && hi < v, "token ids must lie in [0, {v}), found {lo}..={hi}");
        }
        tch::no_grad(|| {
            let x = Tensor::embedding(&self.token_embedding, &ids, -1, false, false) + self.position_embedding.narrow(0, 0, l);
            let mut h = x.to_kind(kind);
            for layer in &self.layers {
                h = layer.forward(&h, true);
            }
            let last = self.final_layer_norm.forward(&h).to_kind(Kind::Float);
            // transformers' two rules: configs from before its PR #24773 say eos_token_id 2
            // and pool at the largest id (the end token is the last of CLIP's vocabulary);
            // newer ones pool at the first end token. argmax returns the first maximum.
            let at = if self.config.eos_token_id == 2 {
                ids.argmax(-1, false)
            } else {
                ids.eq(self.config.eos_token_id).to_kind(Kind::Int).argmax(-1, false)
            };
            let rows = Tensor::arange(b, (Kind::Int64, device));
            let pooled = last.index(&[Some(rows), Some(at)]);
            Ok(TextOutput { last_hidden_state: last, pooled })
        })
    }
}

/// What the image tower gives.
pub struct VisionOutput {
    /// Before any final norm (as transformers returns it). [N, 1 + T, D] f32
    pub last_hidden_state: Tensor,
    /// `post_layernorm` of the class token. [N, D] f32
    pub pooled: Tensor,
}

/// `vision_model` (`CLIPVisionTransformer`): patch conv without bias, class embedding,
/// position table, `pre_layrnorm` (sic), pre-norm layers, `post_layernorm` on the class token.
pub struct VisionTransformer {
    pub config: VisionConfig,
    /// `embeddings.class_embedding` [D]
    pub class_embedding: Tensor,
    /// `embeddings.patch_embedding`: p x p, stride p, no bias.
    pub patch_embedding: Conv2d,
    /// `embeddings.position_embedding.weight` [1 + T, D]
    pub position_embedding: Tensor,
    pub pre_layrnorm: LayerNorm,
    pub layers: Vec<EncoderLayer>,
    pub post_layernorm: LayerNorm,
}

impl VisionTransformer {
    fn load(ld: &mut Loader, prefix: &str, config: VisionConfig) -> Result<Self> {
        let c = &config.tower;
        let (d, p, eps) = (c.hidden_size, config.patch_size, c.layer_norm_eps);
        let g = config.image_size / p;
        Ok(VisionTransformer {
            class_embedding: ld.get(&format!("{prefix}embeddings.class_embedding"), &[d])?,
            patch_embedding: Conv2d::load(ld, &format!("{prefix}embeddings.patch_embedding"), config.num_channels, d, [p, p], false)?
                .stride(p),
            position_embedding: ld.get(&format!("{prefix}embeddings.position_embedding.weight"), &[1 + g * g, d])?,
            pre_layrnorm: LayerNorm::load(ld, &format!("{prefix}pre_layrnorm"), d, eps)?,
            layers: load_layers(ld, prefix, c)?,
            post_layernorm: LayerNorm::load(ld, &format!("{prefix}post_layernorm"), d, eps)?,
            config,
        })
    }

    /// Already preprocessed pixels (CLIPImageProcessor's output: resized, center-cropped,
    /// normalised with CLIP's mean and std) [N, C, S, S] with S = image_size, computing in `kind`.
    pub fn forward(&self, pixel_values: &Tensor, kind: Kind) -> Result<VisionOutput> {
        let s = self.config.image_size;
        let size = pixel_values.size();
        ensure!(
            size.len() == 4 && size[1] == self.config.num_channels && size[2] == s && size[3] == s,
            "pixel values must be [N, {}, {s}, {s}], found {size:?}",
            self.config.num_channels
        );
        tch::no_grad(|| {
            let x = pixel_values.to_device(self.class_embedding.device()).to_kind(kind);
            let n = size[0];
            let patches = self.patch_embedding.forward(&x).flatten(2, -1).transpose(1, 2);
            let cls = self.class_embedding.to_kind(kind).reshape([1, 1, -1]).expand([n, 1, -1], false);
            let h = Tensor::cat(&[cls, patches], 1) + self.position_embedding.to_kind(kind);
            let mut h = self.pre_layrnorm.forward(&h);
            for layer in &self.layers {
                h = layer.forward(&h, false);
            }
            let pooled = self.post_layernorm.forward(&h.select(1, 0)).to_kind(Kind::Float);
            Ok(VisionOutput { last_hidden_state: h.to_kind(Kind::Float), pooled })
        })
    }
}

/// Which towers to load from a folder.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Towers {
    /// Every tower the folder holds, with the projections.
    All,
    /// The text tower (and `text_projection` where there is one): what text conditioning
    /// needs; a `CLIPModel`'s image tower is left on disk.
    Text,
}

/// A CLIP folder (`config.json` + `model.safetensors`): one or both towers and the
/// projections into the shared embedding space.
pub struct Clip {
    pub config: ClipConfig,
    pub text: Option<TextTransformer>,
    pub vision: Option<VisionTransformer>,
    /// `text_projection` (no bias): pooled text [B, D_text] -> [B, projection_dim]
    pub text_projection: Option<Linear>,
    /// `visual_projection` (no bias): pooled image [N, D_vision] -> [N, projection_dim]
    pub visual_projection: Option<Linear>,
    /// `logit_scale` (log of the similarity temperature) where the file has it.
    pub logit_scale: Option<f64>,
}

impl Clip {
    /// Loads `dir/config.json` + `dir/model.safetensors` onto `device`. A `CLIPModel` folder
    /// keeps its towers under `text_model.` / `vision_model.`; a single-tower folder as
    /// transformers 5 writes it has no such prefix, while published ones (openai's, Stable
    /// Diffusion's `text_encoder`) have it: both are read.
    pub fn load(dir: &Path, device: Device, towers: Towers) -> Result<Clip> {
        let cfg_path = dir.join("config.json");
        let cfg_file = cfg_path.display().to_string();
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| bad_input(format!("{cfg_file}: cannot read: {e}")))?;
        let config = ClipConfig::parse(&text, &cfg_file)?;
        if towers == Towers::Text && config.text.is_none() {
            bail_input!("{cfg_file}: field model_type: \"clip_vision_model\" has no text tower");
        }
        let mut ld = Loader::open(&dir.join("model.safetensors"), device)?;
        let both = config.projection_dim.is_some();
        let prefix = |tower: &str| {
            let p = format!("{tower}.");
            if both || ld.contains(&format!("{p}embeddings.position_embedding.weight")) {
                p
            } else {
                String::new()
            }
        };
        let (tp, vp) = (prefix("text_model"), prefix("vision_model"));
        // Older files carry the position ids buffer, which is recomputed here.
        ld.discard(|n| n.ends_with("embeddings.position_ids"));
        let text = match &config.text {
            Some(c) => Some(TextTransformer::load(&mut ld, &tp, c.clone())?),
            None => None,
        };
        let vision = match (&config.vision, towers) {
            (Some(c), Towers::All) => Some(VisionTransformer::load(&mut ld, &vp, c.clone())?),
            _ => None,
        };
        let mut text_projection = None;
        let mut visual_projection = None;
        if let (Some(dim), Some(t), Some(v)) = (config.projection_dim, &config.text, &config.vision) {
            text_projection = Some(Linear::load(&mut ld, "text_projection", t.tower.hidden_size, dim, false)?);
            if towers == Towers::All {
                visual_projection = Some(Linear::load(&mut ld, "visual_projection", v.tower.hidden_size, dim, false)?);
            }
        } else if ld.contains("text_projection.weight") {
            // `CLIPTextModelWithProjection` (SDXL's second text encoder).
            let t = config.text.as_ref().expect("a folder without a text config holds no text projection");
            text_projection = Some(Linear::load(&mut ld, "text_projection", t.tower.hidden_size, t.projection_dim, false)?);
        } else if ld.contains("visual_projection.weight") && towers == Towers::All {
            let v = config.vision.as_ref().expect("a folder without a vision config holds no visual projection");
            visual_projection = Some(Linear::load(&mut ld, "visual_projection", v.tower.hidden_size, v.projection_dim, false)?);
        }
        let logit_scale = if ld.contains("logit_scale") { Some(ld.get("logit_scale", &[])?.double_value(&[])) } else { None };
        if towers == Towers::Text {
            ld.discard(|n| n.starts_with("vision_model.") || n == "visual_projection.weight");
        }
        ld.finish("this CLIP model (its config.json describes other layers)")?;
        Ok(Clip { config, text, vision, text_projection, visual_projection, logit_scale })
    }

    fn text_tower(&self) -> Result<&TextTransformer> {
        self.text.as_ref().ok_or_else(|| anyhow::anyhow!("this CLIP folder has no text tower"))
    }

    /// Token ids [B, L] -> last hidden state [B, L, D] and pooled [B, D], f32, computed in `kind`.
    pub fn encode_text(&self, ids: &Tensor, kind: Kind) -> Result<TextOutput> {
        self.text_tower()?.forward(ids, kind)
    }

    /// `text_embeds`: the pooled text through `text_projection`. [B, projection_dim] f32
    pub fn text_embeds(&self, ids: &Tensor, kind: Kind) -> Result<Tensor> {
        let proj = self.text_projection.as_ref().ok_or_else(|| anyhow::anyhow!("this CLIP folder has no text_projection"))?;
        let pooled = self.encode_text(ids, kind)?.pooled;
        Ok(tch::no_grad(|| proj.forward(&pooled.to_kind(kind)).to_kind(Kind::Float)))
    }

    /// Preprocessed pixels [N, C, S, S] -> image tower outputs, f32, computed in `kind`.
    pub fn encode_image(&self, pixel_values: &Tensor, kind: Kind) -> Result<VisionOutput> {
        self.vision
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("this CLIP model was loaded without an image tower"))?
            .forward(pixel_values, kind)
    }

    /// `image_embeds`: the pooled image through `visual_projection`. [N, projection_dim] f32
    pub fn image_embeds(&self, pixel_values: &Tensor, kind: Kind) -> Result<Tensor> {
        let proj = self.visual_projection.as_ref().ok_or_else(|| anyhow::anyhow!("this CLIP model has no visual_projection loaded"))?;
        let pooled = self.encode_image(pixel_values, kind)?.pooled;
        Ok(tch::no_grad(|| proj.forward(&pooled.to_kind(kind)).to_kind(Kind::Float)))
    }
}
