//! The run file: one YAML with a section per concern, `--set key=value` overrides,
//! validated and resolved once at load. Sections owned by other modules (the loss,
//! the optimiser, the model's dimensions) are re-exported here, so the whole schema
//! reads from this file.

use crate::bail_input;
use crate::error::bad_input;
use anyhow::Result;
use serde::{Deserialize, Serialize};
use std::path::Path;
use tch::{Device, Kind};

use crate::diffusion::sampler::Sampler;
pub use crate::diffusion::sampler::SamplerMode;
pub use crate::diffusion::{LossConfig, PathType, Weighting};
pub use crate::model::SitDims;
pub use crate::optim::OptimConfig;

/// Everything a run needs; written resolved into the run folder. Every way of
/// reading one (a YAML file, a checkpoint's manifest) validates it and resolves the
/// model's dimensions, so a `Config` in hand is a valid one.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(try_from = "ConfigFile")]
pub struct Config {
    pub model: ModelConfig,
    pub loss: LossConfig,
    pub optim: OptimConfig,
    pub train: TrainConfig,
    pub data: DataConfig,
    pub dist: DistConfig,
    pub sample: SampleConfig,
    pub eval: EvalConfig,
    /// `model` resolved (preset and overrides).
    #[serde(skip_serializing)]
    dims: SitDims,
}

/// The sections as the file holds them, before validation.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    model: ModelConfig,
    #[serde(default)]
    loss: LossConfig,
    #[serde(default)]
    optim: OptimConfig,
    train: TrainConfig,
    #[serde(default)]
    data: DataConfig,
    #[serde(default)]
    dist: DistConfig,
    #[serde(default)]
    sample: SampleConfig,
    #[serde(default)]
    eval: EvalConfig,
}

impl TryFrom<ConfigFile> for Config {
    type Error = anyhow::Error;
    fn try_from(f: ConfigFile) -> Result<Config> {
        let dims = f.model.resolve()?;
        let cfg = Config {
            model: f.model,
            loss: f.loss,
            optim: f.optim,
            train: f.train,
            data: f.data,
            dist: f.dist,
            sample: f.sample,
            eval: f.eval,
            dims,
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

/// FID of the EMA model tracked during training: every `fid_every` steps, `fid_num`
/// images generated over all ranks are scored against the reference statistics.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct EvalConfig {
    /// Steps between evaluations; 0 turns them off.
    pub fid_every: i64,
    /// Images per evaluation, split over the ranks.
    pub fid_num: i64,
    /// ADM reference batch (`VIRTUAL_imagenet256_labeled.npz`: images and/or statistics).
    #[serde(rename = "ref")]
    pub reference: Option<String>,
    /// FID Inception weights (`reg-ddp import pt_inception-2015-12-05-6726825d.pth`).
    pub inception: Option<String>,
    /// SD-VAE folder to decode with, or `identity` / `identity:K` (default: `sample.vae`).
    pub vae: Option<String>,
    /// Images generated at once per rank.
    pub batch: i64,
    pub steps: i64,
    /// `sde` (Euler-Maruyama) or `ode` (Heun).
    pub mode: SamplerMode,
    pub cfg: f64,
    pub cls_cfg: f64,
    /// Noise and labels of the images: the same every evaluation, so that FID moves with
    /// the model only.
    pub seed: u64,
}

impl Default for EvalConfig {
    fn default() -> Self {
        EvalConfig {
            fid_every: 0,
            fid_num: 5000,
            reference: None,
            inception: None,
            vae: None,
            batch: 64,
            steps: 250,
            mode: SamplerMode::Sde,
            cfg: 1.0,
            cls_cfg: 0.0,
            seed: 0,
        }
    }
}

/// Sample grids of the EMA model during training (fixed noise and labels).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SampleConfig {
    /// Steps between grids; 0 turns them off.
    pub every: i64,
    /// Images in the grid.
    pub num: i64,
    pub steps: i64,
    /// `sde` or `ode` (Heun).
    pub mode: SamplerMode,
    pub cfg: f64,
    pub cls_cfg: f64,
    /// SD-VAE folder to decode with, or `identity` / `identity:K` for pixel-space data
    /// (train it with `loss.latent_scale: 1.0`); without one the grid shows latent channels.
    pub vae: Option<String>,
    /// With captions: the grid's prompts, image `i` drawn from prompt `i % len`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub prompts: Vec<String>,
}

impl Default for SampleConfig {
    fn default() -> Self {
        SampleConfig { every: 0, num: 16, steps: 32, mode: SamplerMode::Sde, cfg: 1.0, cls_cfg: 0.0, vae: None, prompts: Vec::new() }
    }
}

impl SampleConfig {
    /// The grid's sampler: guidance over the whole interval, Heun for the ODE.
    pub fn sampler(&self) -> Sampler {
        Sampler::whole_interval(self.mode, self.steps, self.cfg, self.cls_cfg)
    }
}

impl EvalConfig {
    /// The evaluation's sampler: guidance over the whole interval, Heun for the ODE.
    pub fn sampler(&self) -> Sampler {
        Sampler::whole_interval(self.mode, self.steps, self.cfg, self.cls_cfg)
    }
}

/// Data-parallel settings.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DistConfig {
    /// Gradient reduce-scatter bucket, in MB of fp32 gradients.
    pub bucket_mb: f64,
    /// A rank that sees no progress for this long (a peer died or hangs) exits.
    pub timeout_s: f64,
    /// Hand each gradient bucket to its reduce-scatter as soon as backward has written
    /// it, while backward goes on (`null`: on for CPU ranks, off on GPUs until the
    /// overlap is proven on a card; docs/architecture.md).
    pub overlap: Option<bool>,
}

impl Default for DistConfig {
    fn default() -> Self {
        DistConfig { bucket_mb: 64.0, timeout_s: 600.0, overlap: None }
    }
}

impl DistConfig {
    /// Whether the step overlaps its gradient reduce-scatter with backward on `device`.
    pub fn overlap_on(&self, device: tch::Device) -> bool {
        self.overlap.unwrap_or(device == tch::Device::Cpu)
    }
}

/// SiT + REG architecture. `arch` names a preset (`SiT-XL/2`); the explicit fields
/// override it, which is how tiny test models are described.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    #[serde(default)]
    pub arch: Option<String>,
    #[serde(default)]
    pub depth: Option<i64>,
    #[serde(default)]
    pub hidden_size: Option<i64>,
    #[serde(default)]
    pub num_heads: Option<i64>,
    #[serde(default)]
    pub patch_size: Option<i64>,
    /// Latent side (32 for 256 px images through the f8 VAE).
    #[serde(default = "d_input_size")]
    pub input_size: i64,
    #[serde(default = "d_in_channels")]
    pub in_channels: i64,
    #[serde(default = "d_num_classes")]
    pub num_classes: i64,
    /// 1-based block after which the REPA projector reads the tokens.
    #[serde(default)]
    pub encoder_depth: Option<i64>,
    /// Encoder width (768 for DINOv2-B).
    #[serde(default = "d_z_dim")]
    pub z_dim: i64,
    #[serde(default = "d_projector_dim")]
    pub projector_dim: i64,
    #[serde(default)]
    pub qk_norm: bool,
    #[serde(default = "d_mlp_ratio")]
    pub mlp_ratio: f64,
    #[serde(default = "d_class_dropout")]
    pub class_dropout_prob: f64,
    /// Where the REPA/REG targets come from: `precomputed` shard features, or `online`:
    /// DINOv2 (`data.encoder_path`) run on the shard's images inside the step.
    #[serde(default)]
    pub encoder: EncoderMode,
    /// `class` (labels) or `text` (captions, through the CLIP text tower in
    /// `data.text_encoder_path`). `class_dropout_prob` drops the caption too (to the
    /// empty caption), for guidance.
    #[serde(default, skip_serializing_if = "is_default")]
    pub condition: Condition,
    /// With captions: the text encoder's width (768 for CLIP ViT-L/14's text tower).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text_dim: Option<i64>,
    /// With captions: tokens per caption (77 for CLIP).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text_len: Option<i64>,
    /// With captions: `online` (token ids in the shards, CLIP runs inside the step) or
    /// `precomputed` (hidden states in the shards, `prepare --text-precomputed`).
    #[serde(default, skip_serializing_if = "is_default")]
    pub text_encoder: TextEncoderMode,
    /// `false`: the REG token's input is zero (a constant register token), for plain SiT
    /// and SiT + REPA baselines (with `loss.cls_coeff: 0`, and `loss.proj_coeff: 0` for SiT).
    #[serde(default = "d_true", skip_serializing_if = "is_true")]
    pub reg_token: bool,
}

fn d_true() -> bool {
    true
}

fn is_true(v: &bool) -> bool {
    *v
}

fn is_default<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
}

/// What the model is conditioned on.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Condition {
    #[default]
    Class,
    Text,
}

/// Where a caption's hidden states come from.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum TextEncoderMode {
    #[default]
    Online,
    Precomputed,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum EncoderMode {
    #[default]
    Precomputed,
    Online,
}

fn d_input_size() -> i64 {
    32
}
fn d_in_channels() -> i64 {
    4
}
fn d_num_classes() -> i64 {
    1000
}
fn d_z_dim() -> i64 {
    768
}
fn d_projector_dim() -> i64 {
    2048
}
fn d_mlp_ratio() -> f64 {
    4.0
}
fn d_class_dropout() -> f64 {
    0.1
}

impl ModelConfig {
    /// Resolves the preset and overrides; `file` names the source in errors.
    pub fn dims(&self, file: &str) -> Result<SitDims> {
        self.resolve().map_err(|e| bad_input(format!("{file}: {e}")))
    }

    /// The preset with the explicit fields over it, checked. Errors name the field.
    fn resolve(&self) -> Result<SitDims> {
        let preset = match &self.arch {
            Some(arch) => match crate::model::dims::parse_arch(arch) {
                Some(p) => Some(p),
                None => bail_input!("model.arch: unknown architecture {arch:?} (expected SiT-S|B|L|XL/2|4|8)"),
            },
            None => None,
        };
        let pick = |explicit: Option<i64>, preset: Option<i64>, field: &str| -> Result<i64> {
            explicit.or(preset).ok_or_else(|| bad_input(format!("model.{field}: missing (give model.arch or model.{field})")))
        };
        let dims = SitDims {
            depth: pick(self.depth, preset.map(|(p, _)| p.depth), "depth")?,
            hidden_size: pick(self.hidden_size, preset.map(|(p, _)| p.hidden_size), "hidden_size")?,
            num_heads: pick(self.num_heads, preset.map(|(p, _)| p.num_heads), "num_heads")?,
            patch_size: pick(self.patch_size, preset.map(|(_, patch)| patch), "patch_size")?,
            input_size: self.input_size,
            in_channels: self.in_channels,
            num_classes: self.num_classes,
            encoder_depth: pick(self.encoder_depth, preset.map(|(p, _)| p.encoder_depth), "encoder_depth")?,
            z_dim: self.z_dim,
            projector_dim: self.projector_dim,
            qk_norm: self.qk_norm,
            mlp_ratio: self.mlp_ratio,
            text_dim: 0,
            text_len: 0,
            reg_token: self.reg_token,
        };
        let mut dims = dims;
        match self.condition {
            Condition::Text => {
                dims.text_dim = self.text_dim.unwrap_or(768);
                dims.text_len = self.text_len.unwrap_or(77);
                if dims.text_dim <= 0 || dims.text_len <= 0 {
                    bail_input!("model.text_dim / model.text_len: must be positive");
                }
            }
            Condition::Class if self.text_dim.is_some() || self.text_len.is_some() => {
                bail_input!("model.text_dim / model.text_len: given, but model.condition is class")
            }
            Condition::Class => {}
        }
        let sizes = [
            ("depth", dims.depth),
            ("hidden_size", dims.hidden_size),
            ("num_heads", dims.num_heads),
            ("patch_size", dims.patch_size),
            ("input_size", dims.input_size),
            ("in_channels", dims.in_channels),
            ("num_classes", dims.num_classes),
            ("encoder_depth", dims.encoder_depth),
            ("z_dim", dims.z_dim),
            ("projector_dim", dims.projector_dim),
        ];
        for (field, v) in sizes {
            if v <= 0 {
                bail_input!("model.{field}: must be positive, got {v}");
            }
        }
        if dims.input_size % dims.patch_size != 0 {
            bail_input!("model.patch_size: {} does not divide the latent size {}", dims.patch_size, dims.input_size);
        }
        if dims.hidden_size % dims.num_heads != 0 {
            bail_input!("model.num_heads: {} does not divide hidden_size {}", dims.num_heads, dims.hidden_size);
        }
        // The 2-D sin-cos table splits the width in four (rows/cols x sin/cos).
        if dims.hidden_size % 4 != 0 {
            bail_input!("model.hidden_size: {} is not a multiple of 4", dims.hidden_size);
        }
        if dims.encoder_depth > dims.depth {
            bail_input!("model.encoder_depth: {} is greater than depth {}", dims.encoder_depth, dims.depth);
        }
        if !positive(self.mlp_ratio) {
            bail_input!("model.mlp_ratio: must be positive");
        }
        if !(0.0..1.0).contains(&self.class_dropout_prob) {
            bail_input!("model.class_dropout_prob: must be in [0, 1)");
        }
        Ok(dims)
    }
}

/// Compute precision. `auto` is bf16 on CUDA and fp32 on CPU.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    Auto,
    Bf16,
    Fp32,
}

impl Precision {
    /// The compute dtype on `device`.
    pub fn kind_on(self, device: Device) -> Kind {
        match self {
            Precision::Bf16 => Kind::BFloat16,
            Precision::Fp32 => Kind::Float,
            Precision::Auto if device.is_cuda() => Kind::BFloat16,
            Precision::Auto => Kind::Float,
        }
    }
}

impl std::str::FromStr for Precision {
    type Err = String;
    /// The command-line spelling, the same as the config's.
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(Precision::Auto),
            "bf16" => Ok(Precision::Bf16),
            "fp32" => Ok(Precision::Fp32),
            _ => Err(format!("{s:?}: expected auto, bf16 or fp32")),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// Run name: outputs go to `<output_dir>/<name>/`.
    pub name: String,
    #[serde(default = "d_output_dir")]
    pub output_dir: String,
    pub global_batch: i64,
    /// Samples per forward/backward pass; a rank's batch is processed in
    /// `local batch / micro_batch` passes whose gradients are summed (gradient
    /// accumulation). Unset: the whole local batch in one pass. With a power-of-two
    /// number of passes and ranks, training is bit-identical across world sizes that
    /// keep `micro_batch` (the sums form the same tree).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub micro_batch: Option<i64>,
    pub steps: i64,
    #[serde(default)]
    pub seed: u64,
    #[serde(default = "d_precision")]
    pub precision: Precision,
    #[serde(default = "d_log_every")]
    pub log_every: i64,
    #[serde(default = "d_checkpoint_every")]
    pub checkpoint_every: i64,
    /// `auto`, `cpu`, `cuda` or `cuda:N`.
    #[serde(default = "d_device")]
    pub device: String,
    /// Complete checkpoints kept (at least 2).
    #[serde(default = "d_keep")]
    pub keep_checkpoints: i64,
    /// Consecutive non-finite steps (skipped) tolerated before the run stops.
    #[serde(default = "d_max_skips")]
    pub max_consecutive_skips: i64,
    /// On CUDA, copy a checkpoint's state to pinned host memory on a side stream,
    /// overlapped with the next step, instead of a blocking copy. Off until it has
    /// been measured on a card (docs/training.md).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub async_checkpoint_copy: bool,
}

fn d_keep() -> i64 {
    3
}
fn d_max_skips() -> i64 {
    20
}

fn d_output_dir() -> String {
    "checkpoints".into()
}
fn d_precision() -> Precision {
    Precision::Auto
}
fn d_log_every() -> i64 {
    100
}
fn d_checkpoint_every() -> i64 {
    50_000
}
fn d_device() -> String {
    "auto".into()
}

/// Where training batches come from.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum DataSource {
    /// Class-conditioned random latents and features (tests, benchmarks).
    Synthetic,
    /// A dataset folder written by `reg-ddp prepare` (`data.path`).
    Shards,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// Defaults to `shards` when `path` is given, `synthetic` otherwise.
    pub source: Option<DataSource>,
    /// Dataset folder (with `index.json`).
    pub path: Option<String>,
    /// Batches assembled ahead by the loader thread.
    pub prefetch: usize,
    /// Check each shard's SHA-256 the first time it is read.
    pub verify_checksums: bool,
    /// DINOv2 model folder (transformers layout) for `model.encoder: online`.
    pub encoder_path: Option<String>,
    /// CLIP folder (transformers layout, with its tokenizer) for `model.condition: text`:
    /// encodes the captions online, and the prompts of grids and FID samples.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text_encoder_path: Option<String>,
}

impl Default for DataConfig {
    fn default() -> Self {
        DataConfig { source: None, path: None, prefetch: 4, verify_checksums: true, encoder_path: None, text_encoder_path: None }
    }
}

impl DataConfig {
    pub fn resolved_source(&self) -> DataSource {
        self.source.unwrap_or(if self.path.is_some() { DataSource::Shards } else { DataSource::Synthetic })
    }
}

impl Config {
    /// Reads `path`, applies `key=value` overrides, validates. Every failure is an
    /// input error naming the file and the field.
    pub fn load(path: &Path, sets: &[String]) -> Result<Config> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| bad_input(format!("{file}: cannot read: {e}")))?;
        Self::from_yaml(&text, &file, sets)
    }

    /// As `load`, from text; `file` names the source in errors.
    pub fn from_yaml(text: &str, file: &str, sets: &[String]) -> Result<Config> {
        let mut doc: serde_yaml::Value = serde_yaml::from_str(text).map_err(|e| bad_input(format!("{file}: malformed YAML: {e}")))?;
        for set in sets {
            apply_set(&mut doc, set).map_err(|e| bad_input(format!("--set {set}: {e}")))?;
        }
        let cfg: Config = serde_path_to_error::deserialize(doc).map_err(|e| {
            let msg = strip_location(&e.inner().to_string());
            // Validation runs on the whole document (path "."); its messages name the field.
            match e.path().to_string().as_str() {
                "." => bad_input(format!("{file}: {msg}")),
                field => bad_input(format!("{file}: {field}: {msg}")),
            }
        })?;
        cfg.check_inputs().map_err(|e| bad_input(format!("{file}: {e}")))?;
        Ok(cfg)
    }

    /// The model's dimensions, resolved at load.
    pub fn dims(&self) -> SitDims {
        self.dims
    }

    /// Everything that does not depend on the machine. Errors name the field.
    fn validate(&self) -> Result<()> {
        let t = &self.train;
        if t.global_batch <= 0 {
            bail_input!("train.global_batch: must be positive, got {}", t.global_batch);
        }
        if let Some(m) = t.micro_batch.filter(|m| *m <= 0) {
            bail_input!("train.micro_batch: must be positive, got {m}");
        }
        if t.steps < 0 {
            bail_input!("train.steps: must not be negative");
        }
        if t.log_every <= 0 || t.checkpoint_every <= 0 {
            bail_input!("train.log_every / train.checkpoint_every: must be positive");
        }
        if t.keep_checkpoints < 2 {
            bail_input!("train.keep_checkpoints: must be at least 2, got {}", t.keep_checkpoints);
        }
        if t.max_consecutive_skips < 0 {
            bail_input!("train.max_consecutive_skips: must not be negative");
        }
        if t.name.is_empty() || t.name.contains('/') {
            bail_input!("train.name: must be a non-empty folder name");
        }
        let o = &self.optim;
        if !positive(o.lr) || !(0.0..1.0).contains(&o.beta1) || !(0.0..1.0).contains(&o.beta2) || !positive(o.eps) {
            bail_input!("optim: lr and eps must be positive, betas in [0, 1)");
        }
        if !(0.0..=1.0).contains(&o.ema_decay) {
            bail_input!("optim.ema_decay: must be in [0, 1]");
        }
        if o.weight_decay < 0.0 || o.max_grad_norm < 0.0 {
            bail_input!("optim.weight_decay / optim.max_grad_norm: must not be negative");
        }
        match (self.data.resolved_source(), &self.data.path) {
            (DataSource::Shards, None) => bail_input!("data.path: missing (data.source is shards)"),
            (DataSource::Synthetic, Some(_)) => bail_input!("data.path: given, but data.source is synthetic"),
            _ => {}
        }
        if self.model.encoder == EncoderMode::Online {
            if self.data.encoder_path.is_none() {
                bail_input!("data.encoder_path: missing (model.encoder is online)");
            }
            if self.data.resolved_source() != DataSource::Shards {
                bail_input!("model.encoder: online needs a dataset with images (data.path)");
            }
        }
        if self.model.condition == Condition::Text {
            let shards = self.data.resolved_source() == DataSource::Shards;
            let needs_encoder =
                (shards && self.model.text_encoder == TextEncoderMode::Online) || self.sample.every > 0 || self.eval.fid_every > 0;
            if needs_encoder && self.data.text_encoder_path.is_none() {
                bail_input!("data.text_encoder_path: missing (a CLIP folder; model.condition is text)");
            }
            if self.sample.every > 0 && self.sample.prompts.is_empty() {
                bail_input!("sample.prompts: missing (sample.every > 0 and model.condition is text)");
            }
        }
        let sm = &self.sample;
        if sm.every < 0 || sm.num <= 0 || self.sample.sampler().check().is_err() {
            bail_input!("sample: every >= 0, num > 0, steps >= 2, mode sde|ode, non-negative scales");
        }
        let e = &self.eval;
        if e.fid_every < 0 || e.fid_num < 2 || e.batch <= 0 || self.eval.sampler().check().is_err() {
            bail_input!("eval: fid_every >= 0, fid_num >= 2, batch > 0, steps >= 2, mode sde|ode, non-negative scales");
        }
        if !positive(self.dist.bucket_mb) || !positive(self.dist.timeout_s) {
            bail_input!("dist.bucket_mb / dist.timeout_s: must be positive");
        }
        if !positive(self.loss.latent_scale) {
            bail_input!("loss.latent_scale: must be positive");
        }
        Ok(())
    }

    /// The files a run reads from are there (checked when a run starts, not when a
    /// checkpoint's config is read back on another machine).
    fn check_inputs(&self) -> Result<()> {
        let e = &self.eval;
        if e.fid_every > 0 {
            for (field, v) in [("ref", &e.reference), ("inception", &e.inception), ("vae", &e.vae.clone().or(self.sample.vae.clone()))] {
                match v {
                    None => bail_input!("eval.{field}: missing (eval.fid_every is {})", e.fid_every),
                    // `identity` / `identity:K` (the pixel-space path) names no file.
                    Some(p) if !(Path::new(p).exists() || field == "vae" && (p == "identity" || p.starts_with("identity:"))) => {
                        bail_input!("eval.{field}: {p} does not exist")
                    }
                    _ => {}
                }
            }
        }
        Ok(())
    }

    /// The global batch split over `world` ranks; an input error when it does not divide.
    pub fn local_batch(&self, world: i64) -> Result<i64> {
        if self.train.global_batch % world != 0 {
            bail_input!("train.global_batch: {} is not divisible by the world size {world}", self.train.global_batch);
        }
        let local = self.train.global_batch / world;
        if let Some(m) = self.train.micro_batch.filter(|m| local % m != 0) {
            bail_input!("train.micro_batch: {m} does not divide the local batch {local} (train.global_batch over {world} ranks)");
        }
        Ok(local)
    }

    /// Samples per forward/backward pass on each of `world` ranks (checked by
    /// `local_batch`).
    pub fn micro_batch(&self, world: i64) -> i64 {
        self.train.micro_batch.unwrap_or(self.train.global_batch / world)
    }
}

/// `x > 0`, false for NaN (which a plain `x <= 0` check would let through).
fn positive(x: f64) -> bool {
    x > 0.0
}

/// serde_yaml appends " at line L column C" which points into the re-serialised
/// document after `--set`, not the user's file; the field path says where instead.
fn strip_location(msg: &str) -> String {
    match msg.find(" at line ") {
        Some(i) => msg[..i].to_string(),
        None => msg.to_string(),
    }
}

/// `a.b.c=value`: the value is parsed as YAML, so numbers, bools and lists work.
fn apply_set(doc: &mut serde_yaml::Value, set: &str) -> Result<()> {
    let (key, value) = set.split_once('=').ok_or_else(|| anyhow::anyhow!("expected key=value"))?;
    let value: serde_yaml::Value = serde_yaml::from_str(value)?;
    let mut node = doc;
    let parts: Vec<&str> = key.split('.').collect();
    for (i, part) in parts.iter().enumerate() {
        if part.is_empty() {
            anyhow::bail!("empty key segment");
        }
        let map = match node {
            serde_yaml::Value::Mapping(m) => m,
            serde_yaml::Value::Null => {
                *node = serde_yaml::Value::Mapping(Default::default());
                node.as_mapping_mut().unwrap()
            }
            _ => anyhow::bail!("{} is not a mapping", parts[..i].join(".")),
        };
        let k = serde_yaml::Value::String(part.to_string());
        if i + 1 == parts.len() {
            map.insert(k, value);
            return Ok(());
        }
        node = map.entry(k).or_insert(serde_yaml::Value::Null);
    }
    unreachable!("split always yields at least one part")
}

#[cfg(test)]
mod tests {
    use super::*;

    const TINY: &str = "model: {depth: 2, hidden_size: 32, num_heads: 2, patch_size: 2, input_size: 8, encoder_depth: 1, z_dim: 16, projector_dim: 32, num_classes: 4}\ntrain: {name: t, global_batch: 4, steps: 1}\n";

    #[test]
    fn presets_resolve() {
        let m: ModelConfig = serde_yaml::from_str("arch: SiT-XL/2").unwrap();
        let d = m.dims("x").unwrap();
        let c = Config::from_yaml("model: {arch: SiT-XL/2}\ntrain: {name: t, global_batch: 4, steps: 1}", "t.yaml", &[]).unwrap();
        assert_eq!(c.dims(), d);
        assert_eq!((d.depth, d.hidden_size, d.num_heads, d.patch_size, d.encoder_depth), (28, 1152, 16, 2, 8));
        let m: ModelConfig = serde_yaml::from_str("arch: SiT-B/4").unwrap();
        assert_eq!(m.dims("x").unwrap().encoder_depth, 4);
    }

    #[test]
    fn set_overrides_nested_values() {
        let c = Config::from_yaml(TINY, "t.yaml", &["optim.lr=0.5".into(), "train.seed=7".into()]).unwrap();
        assert_eq!(c.optim.lr, 0.5);
        assert_eq!(c.train.seed, 7);
    }

    #[test]
    fn errors_name_file_and_field() {
        let e = Config::from_yaml(TINY, "t.yaml", &["train.bogus=1".into()]).unwrap_err();
        let s = format!("{e:#}");
        assert!(s.contains("t.yaml") && s.contains("bogus"), "{s}");
        let e = Config::from_yaml(TINY, "t.yaml", &["model.patch_size=3".into()]).unwrap_err();
        assert!(format!("{e:#}").contains("model.patch_size"));
        let e = Config::from_yaml(TINY, "t.yaml", &["model.encoder_depth=3".into()]).unwrap_err();
        assert!(format!("{e:#}").contains("model.encoder_depth"));
    }

    #[test]
    fn micro_batch_divides_the_local_batch() {
        let c = Config::from_yaml(TINY, "t.yaml", &["train.micro_batch=2".into()]).unwrap();
        assert_eq!((c.local_batch(2).unwrap(), c.micro_batch(2)), (2, 2));
        assert!(format!("{:#}", c.local_batch(4).unwrap_err()).contains("train.micro_batch: 2 does not divide the local batch 1"));
        assert_eq!(Config::from_yaml(TINY, "t.yaml", &[]).unwrap().micro_batch(2), 2, "unset: the whole local batch");
        let e = Config::from_yaml(TINY, "t.yaml", &["train.micro_batch=0".into()]).unwrap_err();
        assert!(format!("{e:#}").contains("train.micro_batch: must be positive"));
    }
}
