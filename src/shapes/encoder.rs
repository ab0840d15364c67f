//! The shapes encoder (`train-encoder`): a small DINOv2-layout ViT trained on the encoder split of the shapes set (attribute heads on the class token, object targets on the patch tokens), saved in transformers' `Dinov2Model` layout for `--encoder`.
//
// The network is `encoders::dinov2::Dinov2` itself, built over the variables of a
// `VarStore` (through `Loader::from_tensors`), so the trained forward pass is the one
// `prepare` and online REG later run, and the saved file is read by `Dinov2::load`.
// Its variables live in a `VarStore` trained by tch's AdamW, not in the model's flat
// parameter store (`model::params`): this network trains in one process, with no ZeRO
// shard, EMA or checkpoint, so the flat store's bucketed, rank-padded layout would buy
// nothing, and the store's init order would change every trained shapes encoder.
// The objective is supervised (the set's attributes are known
// exactly, and a self-supervised objective would not learn them in minutes on 2 cores).

use crate::bail_input;
use crate::encoders::dinov2::{Dinov2, Dinov2Config};
use crate::encoders::hub_config::Activation;
use crate::encoders::loader::Loader;
use crate::error::bad_input;
use crate::formats::weights;
use crate::shapes::{self, Colour, Position, Record, Shape, Size, Value};
use anyhow::{Context, Result};
use serde::Serialize;
use std::collections::HashMap;
use std::path::Path;
use tch::nn::{self, Module, OptimizerConfig};
use tch::{Device, Kind, Reduction, Tensor};

/// The size of the ViT (`train-encoder --hidden --layers --heads --patch --resolution`).
#[derive(Clone, Copy, Debug, Serialize)]
pub struct EncoderSize {
    pub hidden: i64,
    pub layers: i64,
    pub heads: i64,
    pub patch: i64,
    /// Image side it is trained at; also its `image_size` (the position table's grid).
    pub resolution: i64,
}

impl EncoderSize {
    /// Its `Dinov2Config`: DINOv2's defaults otherwise (MLP ratio 4, exact GELU, eps 1e-6).
    pub fn config(&self) -> Result<Dinov2Config> {
        for (flag, v) in [("--hidden", self.hidden), ("--layers", self.layers), ("--heads", self.heads), ("--patch", self.patch)] {
            if v <= 0 {
                bail_input!("{flag}: must be positive, found {v}");
            }
        }
        if self.hidden % self.heads != 0 {
            bail_input!("--heads: {} does not divide --hidden {}", self.heads, self.hidden);
        }
        if self.resolution <= 0 || self.resolution % self.patch != 0 {
            bail_input!("--resolution: {} is not a positive multiple of --patch {}", self.resolution, self.patch);
        }
        Ok(Dinov2Config {
            hidden_size: self.hidden,
            num_hidden_layers: self.layers,
            num_attention_heads: self.heads,
            mlp_ratio: 4.0,
            patch_size: self.patch,
            image_size: self.resolution,
            num_channels: 3,
            layer_norm_eps: 1e-6,
            hidden_act: Activation::Gelu,
            qkv_bias: true,
            use_swiglu_ffn: false,
            num_register_tokens: 0,
        })
    }
}

/// Images of the shapes set with their attributes and per-patch object coverage.
pub struct Labelled {
    /// [N, 3, R, R] u8
    pub images: Tensor,
    /// [N, 4] i64: shape, colour, size, position (indices into each `Value::ALL`).
    pub labels: Tensor,
    /// [N, G * G] f32, patches row by row: the fraction of the patch's pixels on the shape.
    pub coverage: Tensor,
}

impl Labelled {
    pub fn len(&self) -> i64 {
        self.images.size()[0]
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The rows `index` ([B] i64).
    pub fn select(&self, index: &Tensor) -> Labelled {
        Labelled {
            images: self.images.index_select(0, index),
            labels: self.labels.index_select(0, index),
            coverage: self.coverage.index_select(0, index),
        }
    }

    /// The images mirrored left to right where `flip` [N] bool is set, with their labels:
    /// every shape is symmetric about its vertical axis and the centres' jitter about the
    /// image's, so a mirrored image is another draw of the set, its position on the other side.
    pub fn mirrored(&self, flip: &Tensor) -> Labelled {
        let n = self.len();
        let g = (self.coverage.size()[1] as f64).sqrt().round() as i64;
        let other_side: Vec<i64> = Position::ALL
            .iter()
            .map(|p| {
                let (right, bottom) = p.halves();
                Position::from_halves(!right, bottom).index() as i64
            })
            .collect();
        let position = self.labels.select(1, 3);
        let swapped = Tensor::from_slice(&other_side).index_select(0, &position);
        let labels = self.labels.copy();
        labels.select(1, 3).copy_(&swapped.where_self(flip, &position));
        let coverage = self.coverage.view([n, g, g]);
        Labelled {
            images: self.images.flip([3]).where_self(&flip.view([n, 1, 1, 1]), &self.images),
            labels,
            coverage: coverage.flip([2]).where_self(&flip.view([n, 1, 1]), &coverage).view([n, g * g]),
        }
    }

    fn narrow(&self, start: i64, len: i64) -> Labelled {
        Labelled {
            images: self.images.narrow(0, start, len),
            labels: self.labels.narrow(0, start, len),
            coverage: self.coverage.narrow(0, start, len),
        }
    }
}

/// Reads a set written by `demo-images --captioned` (`attributes.jsonl` and its PNGs, which
/// must be `resolution` pixels square); the patch targets come from each image's
/// foreground (`shapes::is_foreground`) pooled over `patch` x `patch` pixels.
pub fn read_set(dir: &Path, resolution: i64, patch: i64) -> Result<Labelled> {
    let jsonl = dir.join("attributes.jsonl");
    let file = jsonl.display().to_string();
    let text = std::fs::read_to_string(&jsonl).map_err(|e| bad_input(format!("{file}: cannot read: {e}")))?;
    let (mut pixels, mut labels, mut mask) = (Vec::new(), Vec::new(), Vec::new());
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let rec: Record = serde_json::from_str(line).map_err(|e| bad_input(format!("{file}: line {}: {e}", i + 1)))?;
        let png = dir.join(&rec.file);
        let img =
            image::open(&png).map_err(|e| bad_input(format!("{}: cannot read (line {} of {file}): {e}", png.display(), i + 1)))?.to_rgb8();
        if (img.width() as i64, img.height() as i64) != (resolution, resolution) {
            bail_input!("{}: {}x{} image, --resolution is {resolution}", png.display(), img.width(), img.height());
        }
        mask.extend(img.pixels().map(|p| shapes::is_foreground(p.0) as u8 as f32));
        pixels.extend_from_slice(img.as_raw());
        let a = rec.attributes;
        labels.extend([a.shape.index(), a.colour.index(), a.size.index(), a.position.index()].map(|v| v as i64));
    }
    let n = labels.len() as i64 / 4;
    if n == 0 {
        bail_input!("{file}: no images");
    }
    let r = resolution;
    let images = Tensor::from_slice(&pixels).view([n, r, r, 3]).permute([0, 3, 1, 2]).contiguous();
    let mask = Tensor::from_slice(&mask).view([n, 1, r, r]);
    let coverage = mask.avg_pool2d([patch, patch], [patch, patch], [0, 0], false, true, None::<i64>).view([n, -1]);
    Ok(Labelled { images, labels: Tensor::from_slice(&labels).view([n, 4]), coverage })
}

/// Values of each attribute, in the order of `Labelled::labels`' columns.
const CLASSES: [(&str, usize); 4] =
    [("shape", Shape::ALL.len()), ("colour", Colour::ALL.len()), ("size", Size::ALL.len()), ("position", Position::ALL.len())];

/// The ViT with its training heads (under `head.`, never saved).
pub struct ShapeEncoder {
    pub vs: nn::VarStore,
    pub model: Dinov2,
    /// One linear head per attribute on the class token, in `CLASSES` order.
    heads: Vec<nn::Linear>,
    /// On each patch token: 1 object logit, then shape and colour logits.
    patch_head: nn::Linear,
}

/// Accuracy of the heads on a labelled set.
#[derive(Clone, Debug, Serialize)]
pub struct HeadAccuracy {
    pub images: i64,
    pub shape: f64,
    pub colour: f64,
    pub size: f64,
    pub position: f64,
    /// All four attributes right.
    pub all: f64,
    /// Patches called object (p > 0.5) or background as the majority of their pixels are.
    pub patch_object: f64,
    /// Shape and colour read right from each patch mostly on the object.
    pub patch_shape: f64,
    pub patch_colour: f64,
}

/// How to train.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct TrainOptions {
    pub steps: i64,
    pub batch: i64,
    /// Peak learning rate (AdamW, weight decay 0.01): linear warm-up over the first 5% of
    /// the steps, then cosine to zero.
    pub lr: f64,
}

/// What training did.
#[derive(Clone, Debug, Serialize)]
pub struct TrainReport {
    /// Loss of the first batch, before any update.
    pub loss_start: f64,
    /// Mean loss of the last 10 steps (or all, when fewer).
    pub loss_end: f64,
    pub seconds: f64,
}

impl ShapeEncoder {
    /// A randomly initialised network as transformers initialises `Dinov2Model`: weights
    /// N(0, 0.02) (truncated there, plain here), biases 0, LayerNorms 1 and 0, layer
    /// scales 1.0, the (unused) mask token 0; the global torch seed decides the draws.
    pub fn new(config: Dinov2Config) -> Result<ShapeEncoder> {
        let device = Device::Cpu;
        let vs = nn::VarStore::new(device);
        let root = vs.root();
        let (w, one, zero) = (nn::Init::Randn { mean: 0.0, stdev: 0.02 }, nn::Init::Const(1.0), nn::Init::Const(0.0));
        let (d, p, g) = (config.hidden_size, config.patch_size, config.image_size / config.patch_size);
        // Registers a variable in the store; the network takes it back by name below.
        let var = |path: &nn::Path, name: &str, dims: &[i64], init: nn::Init| {
            let _ = path.var(name, dims, init);
        };
        let linear = |path: nn::Path, d_in: i64, d_out: i64| {
            var(&path, "weight", &[d_out, d_in], w);
            var(&path, "bias", &[d_out], zero);
        };
        let norm = |path: nn::Path| {
            var(&path, "weight", &[d], one);
            var(&path, "bias", &[d], zero);
        };
        let e = &root / "embeddings";
        var(&e, "cls_token", &[1, 1, d], w);
        let _ = e.zeros_no_train("mask_token", &[1, d]);
        var(&e, "position_embeddings", &[1, 1 + g * g, d], w);
        let proj = &e / "patch_embeddings" / "projection";
        var(&proj, "weight", &[d, config.num_channels, p, p], w);
        var(&proj, "bias", &[d], zero);
        let h = config.mlp_hidden();
        for i in 0..config.num_hidden_layers {
            let l = &root / "encoder" / "layer" / i;
            norm(&l / "norm1");
            let a = &l / "attention";
            for qkv in ["query", "key", "value"] {
                linear(&a / "attention" / qkv, d, d);
            }
            linear(&a / "output" / "dense", d, d);
            var(&(&l / "layer_scale1"), "lambda1", &[d], one);
            norm(&l / "norm2");
            linear(&l / "mlp" / "fc1", d, h);
            linear(&l / "mlp" / "fc2", h, d);
            var(&(&l / "layer_scale2"), "lambda1", &[d], one);
        }
        norm(&root / "layernorm");
        // Built before the heads exist, so every variable the loader holds is the ViT's.
        let mut ld = Loader::from_tensors(vs.variables(), "train-encoder", device);
        let model = Dinov2::from_loader(config, &mut ld, device, g * p, "train-encoder")?;
        let head = &root / "head";
        let heads = CLASSES.iter().map(|(name, n)| nn::linear(&head / *name, d, *n as i64, Default::default())).collect();
        let patch_head = nn::linear(&head / "patch", d, 1 + CLASSES[0].1 as i64 + CLASSES[1].1 as i64, Default::default());
        Ok(ShapeEncoder { vs, model, heads, patch_head })
    }

    /// Class-token logits per attribute and patch logits [N, T, 1 + shapes + colours].
    fn logits(&self, images: &Tensor) -> (Vec<Tensor>, Tensor) {
        let out = self.model.forward(&self.model.preprocess(images), Kind::Float);
        let cls = out.select(1, 0);
        let t = out.size()[1] - 1;
        (self.heads.iter().map(|h| h.forward(&cls)).collect(), self.patch_head.forward(&out.narrow(1, 1, t)))
    }

    /// The objective: cross-entropy of the four attributes from the class token, plus on
    /// the patch tokens the object coverage (binary cross-entropy against the covered
    /// fraction) and the object's shape and colour (cross-entropy weighted by coverage,
    /// so background patches say nothing about them). Seven terms, summed.
    pub fn loss(&self, b: &Labelled) -> Tensor {
        let (cls, patch) = self.logits(&b.images);
        let mut loss = Tensor::zeros([], (Kind::Float, Device::Cpu));
        for (k, logits) in cls.iter().enumerate() {
            loss += logits.cross_entropy_for_logits(&b.labels.select(1, k as i64));
        }
        let (n, t) = (b.coverage.size()[0], b.coverage.size()[1]);
        let object = patch.select(2, 0);
        loss += object.binary_cross_entropy_with_logits::<Tensor>(&b.coverage, None, None, Reduction::Mean);
        let weight = b.coverage.sum(Kind::Float).clamp_min(1.0);
        let mut start = 1;
        for (k, (_, classes)) in CLASSES.iter().take(2).enumerate() {
            let c = *classes as i64;
            let logp = patch.narrow(2, start, c).log_softmax(-1, Kind::Float);
            let target = b.labels.select(1, k as i64).view([n, 1, 1]).expand([n, t, 1], false);
            let nll = -logp.gather(2, &target, false).squeeze_dim(2);
            loss += (nll * &b.coverage).sum(Kind::Float) / &weight;
            start += c;
        }
        loss
    }

    /// Accuracy of the heads on `set`, `batch` images at a time.
    pub fn evaluate(&self, set: &Labelled, batch: i64) -> HeadAccuracy {
        tch::no_grad(|| {
            let n = set.len();
            let (mut right, mut all) = ([0i64; 4], 0i64);
            let (mut obj, mut patches, mut on, mut shape, mut colour) = (0i64, 0i64, 0i64, 0i64, 0i64);
            let mut s = 0;
            while s < n {
                let b = set.narrow(s, batch.min(n - s));
                let (cls, patch) = self.logits(&b.images);
                let mut ok = Tensor::ones([b.len()], (Kind::Bool, Device::Cpu));
                for (k, logits) in cls.iter().enumerate() {
                    let hit = logits.argmax(-1, false).eq_tensor(&b.labels.select(1, k as i64));
                    right[k] += hit.sum(Kind::Int64).int64_value(&[]);
                    ok = ok.logical_and(&hit);
                }
                all += ok.sum(Kind::Int64).int64_value(&[]);
                let truth = b.coverage.ge(0.5);
                obj += patch.select(2, 0).gt(0.0).eq_tensor(&truth).sum(Kind::Int64).int64_value(&[]);
                patches += b.coverage.numel() as i64;
                on += truth.sum(Kind::Int64).int64_value(&[]);
                let t = b.coverage.size()[1];
                let mut start = 1;
                for (k, count) in [&mut shape, &mut colour].into_iter().enumerate() {
                    let c = CLASSES[k].1 as i64;
                    let guess = patch.narrow(2, start, c).argmax(-1, false);
                    let want = b.labels.select(1, k as i64).view([-1, 1]).expand([b.len(), t], false);
                    *count += guess.eq_tensor(&want).logical_and(&truth).sum(Kind::Int64).int64_value(&[]);
                    start += c;
                }
                s += b.len();
            }
            let frac = |a: i64, b: i64| a as f64 / b.max(1) as f64;
            HeadAccuracy {
                images: n,
                shape: frac(right[0], n),
                colour: frac(right[1], n),
                size: frac(right[2], n),
                position: frac(right[3], n),
                all: frac(all, n),
                patch_object: frac(obj, patches),
                patch_shape: frac(shape, on),
                patch_colour: frac(colour, on),
            }
        })
    }

    /// Trains on `data` for `opts.steps` steps of `opts.batch` images drawn without
    /// replacement, epoch by epoch in an order the global torch seed decides, half of them
    /// mirrored (`Labelled::mirrored`).
    pub fn train(&mut self, data: &Labelled, opts: &TrainOptions, mut progress: impl FnMut(i64, f64)) -> Result<TrainReport> {
        if opts.steps <= 0 || opts.batch <= 0 {
            bail_input!("--steps and --batch: must be positive, found {} and {}", opts.steps, opts.batch);
        }
        if !(opts.lr.is_finite() && opts.lr > 0.0) {
            bail_input!("--lr: must be a positive number, found {}", opts.lr);
        }
        let start = std::time::Instant::now();
        let mut opt = nn::AdamW::default().build(&self.vs, opts.lr)?;
        let n = data.len();
        let batch = opts.batch.min(n);
        let warmup = (opts.steps / 20).max(1);
        let mut order = Tensor::randperm(n, (Kind::Int64, Device::Cpu));
        let mut at = 0;
        let (mut first, mut last) = (f64::NAN, Vec::new());
        for step in 0..opts.steps {
            if at + batch > n {
                order = Tensor::randperm(n, (Kind::Int64, Device::Cpu));
                at = 0;
            }
            // Each image mirrored with probability 1/2: twice the distinct images.
            let b = data.select(&order.narrow(0, at, batch));
            let b = b.mirrored(&Tensor::rand([batch], (Kind::Float, Device::Cpu)).lt(0.5));
            at += batch;
            let lr = if step < warmup {
                opts.lr * (step + 1) as f64 / warmup as f64
            } else {
                let f = (step - warmup) as f64 / (opts.steps - warmup).max(1) as f64;
                opts.lr * 0.5 * (1.0 + (std::f64::consts::PI * f).cos())
            };
            opt.set_lr(lr);
            let loss = self.loss(&b);
            let v = loss.double_value(&[]);
            if !v.is_finite() {
                anyhow::bail!("train-encoder: the loss is {v} at step {step}; try a lower --lr");
            }
            opt.backward_step(&loss);
            if step == 0 {
                first = v;
            }
            last.push(v);
            if last.len() > 10 {
                last.remove(0);
            }
            progress(step, v);
        }
        Ok(TrainReport {
            loss_start: first,
            loss_end: last.iter().sum::<f64>() / last.len() as f64,
            seconds: start.elapsed().as_secs_f64(),
        })
    }

    /// Writes `dir/config.json` and `dir/model.safetensors` (the ViT only, f32, names and
    /// shapes as transformers' `Dinov2Model.save_pretrained` writes them, mask token
    /// included), for `Dinov2::load` and `Dinov2Model.from_pretrained`.
    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create", dir.display()))?;
        let config = serde_json::to_string_pretty(&self.model.config.to_json())?;
        std::fs::write(dir.join("config.json"), config + "\n").with_context(|| format!("{}: cannot write config.json", dir.display()))?;
        let mut named: Vec<(String, Tensor)> = self
            .vs
            .variables()
            .into_iter()
            .filter(|(name, _)| !name.starts_with("head."))
            .map(|(name, t)| (name, t.detach().contiguous()))
            .collect();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
        weights::write(&dir.join("model.safetensors"), &named, Some(meta))
    }

    /// Parameters of the ViT (heads excluded).
    pub fn parameters(&self) -> i64 {
        self.vs.trainable_variables().iter().map(|t| t.numel() as i64).sum::<i64>()
            - self
                .heads
                .iter()
                .chain([&self.patch_head])
                .map(|l| l.ws.numel() as i64 + l.bs.as_ref().map_or(0, |b| b.numel() as i64))
                .sum::<i64>()
    }
}
