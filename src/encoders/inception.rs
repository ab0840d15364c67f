//! The FID Inception-v3: the 2015-12-05 TensorFlow graph (`classify_image_graph_def.pb`, used by
//! TTUR's FID and the ADM evaluator) as ported by pytorch-fid (`pytorch_fid.inception.fid_inception_v3()`
//! inside `InceptionV3([3], resize_input=True, normalize_input=True)`), frozen, in eval mode.
//!
//! It is torchvision's `Inception3` with 1008 classes and no aux head, whose Mixed blocks are the
//! FID variants: `Mixed_5b..5d` `FIDInceptionA` and `Mixed_6b..6e` `FIDInceptionC` (branch average
//! pool with `count_include_pad=False`, as TensorFlow pools), `Mixed_7b` `FIDInceptionE_1` (the same),
//! `Mixed_7c` `FIDInceptionE_2` (a 3x3 max pool in `branch_pool`); `Mixed_6a` / `Mixed_7a` are
//! torchvision's `InceptionB` / `InceptionD`. Every conv is `BasicConv2d`: conv without bias,
//! BatchNorm (eps 0.001, running statistics), ReLU.
//!
//! Weights: a safetensors file with the parameter names of pytorch-fid's state dict
//! (`Conv2d_1a_3x3.conv.weight`, `Conv2d_1a_3x3.bn.{weight,bias,running_mean,running_var}`,
//! `Mixed_5b.branch1x1.conv.weight`, ..., `fc.weight`, `fc.bias`; `num_batches_tracked` is ignored).
//! pytorch-fid's published weights (a bare state dict saved with `torch.save`) convert with our
//! importer in one line:
//!
//! ```text
//! reg-ddp import pt_inception-2015-12-05-6726825d.pth --out inception.safetensors
//! ```

use crate::encoders::loader::Loader;
use crate::layers::{Conv2d, Linear};
use anyhow::Result;
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// The resolution the network runs at.
pub const INPUT_SIZE: i64 = 299;
/// Width of the pool features.
pub const POOL_DIM: i64 = 2048;
/// Logits of the 2015 graph (1000 ImageNet classes plus 8 unused).
pub const NUM_CLASSES: i64 = 1008;
/// Channels of `Mixed_6d`'s output kept for sFID.
pub const SPATIAL_CHANNELS: i64 = 7;
/// 17 * 17 * 7.
pub const SPATIAL_DIM: i64 = 17 * 17 * SPATIAL_CHANNELS;

/// BatchNorm eps of `BasicConv2d`.
const BN_EPS: f64 = 0.001;

/// `nn.BatchNorm2d(C, eps=0.001)` in eval mode. All [C] f32.
pub struct BatchNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub running_mean: Tensor,
    pub running_var: Tensor,
}

/// `BasicConv2d`: `conv` (no bias) -> `bn` -> ReLU.
pub struct BasicConv2d {
    pub conv: Conv2d,
    pub bn: BatchNorm,
    /// `bn.weight / sqrt(running_var + eps)` [1, C_out, 1, 1] f32
    scale: Tensor,
    /// `bn.bias - running_mean * scale` [1, C_out, 1, 1] f32
    shift: Tensor,
}

impl BasicConv2d {
    /// `{name}.conv.weight` [c_out, c_in, kh, kw] and `{name}.bn.*` [c_out].
    fn load(ld: &mut Loader, name: &str, c_in: i64, c_out: i64, kernel: [i64; 2], stride: i64, padding: [i64; 2]) -> Result<Self> {
        let conv = Conv2d::load(ld, &format!("{name}.conv"), c_in, c_out, kernel, false)?.stride(stride).padding(padding);
        let mut bn = |p: &str| ld.get(&format!("{name}.bn.{p}"), &[c_out]);
        let bn = BatchNorm { weight: bn("weight")?, bias: bn("bias")?, running_mean: bn("running_mean")?, running_var: bn("running_var")? };
        let scale = &bn.weight / (&bn.running_var + BN_EPS).sqrt();
        let shift = &bn.bias - &bn.running_mean * &scale;
        Ok(BasicConv2d { conv, bn, scale: scale.reshape([1, c_out, 1, 1]), shift: shift.reshape([1, c_out, 1, 1]) })
    }

    /// [N, C_in, H, W] -> [N, C_out, H', W'] in x's dtype.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let k = x.kind();
        (self.conv.forward(x) * self.scale.to_kind(k) + self.shift.to_kind(k)).relu()
    }
}

/// 3x3 average pool, stride 1, padding 1, zeros not counted (TensorFlow's pool; the FID blocks).
fn avg_pool_tf(x: &Tensor) -> Tensor {
    x.avg_pool2d([3, 3], [1, 1], [1, 1], false, false, None)
}

/// 3x3 max pool, stride 2, no padding (`nn.MaxPool2d(kernel_size=3, stride=2)`).
fn max_pool_s2(x: &Tensor) -> Tensor {
    x.max_pool2d([3, 3], [2, 2], [0, 0], [1, 1], false)
}

/// `Mixed_5b..5d`: `FIDInceptionA`. [N, C, 35, 35] -> [N, 224 + pool_features, 35, 35]
pub struct InceptionA {
    pub branch1x1: BasicConv2d,
    pub branch5x5_1: BasicConv2d,
    pub branch5x5_2: BasicConv2d,
    pub branch3x3dbl_1: BasicConv2d,
    pub branch3x3dbl_2: BasicConv2d,
    pub branch3x3dbl_3: BasicConv2d,
    pub branch_pool: BasicConv2d,
}

impl InceptionA {
    fn load(ld: &mut Loader, name: &str, c: i64, pool_features: i64) -> Result<Self> {
        let n = |b: &str| format!("{name}.{b}");
        Ok(InceptionA {
            branch1x1: BasicConv2d::load(ld, &n("branch1x1"), c, 64, [1, 1], 1, [0, 0])?,
            branch5x5_1: BasicConv2d::load(ld, &n("branch5x5_1"), c, 48, [1, 1], 1, [0, 0])?,
            branch5x5_2: BasicConv2d::load(ld, &n("branch5x5_2"), 48, 64, [5, 5], 1, [2, 2])?,
            branch3x3dbl_1: BasicConv2d::load(ld, &n("branch3x3dbl_1"), c, 64, [1, 1], 1, [0, 0])?,
            branch3x3dbl_2: BasicConv2d::load(ld, &n("branch3x3dbl_2"), 64, 96, [3, 3], 1, [1, 1])?,
            branch3x3dbl_3: BasicConv2d::load(ld, &n("branch3x3dbl_3"), 96, 96, [3, 3], 1, [1, 1])?,
            branch_pool: BasicConv2d::load(ld, &n("branch_pool"), c, pool_features, [1, 1], 1, [0, 0])?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let b1 = self.branch1x1.forward(x);
        let b5 = self.branch5x5_2.forward(&self.branch5x5_1.forward(x));
        let b3 = self.branch3x3dbl_3.forward(&self.branch3x3dbl_2.forward(&self.branch3x3dbl_1.forward(x)));
        let bp = self.branch_pool.forward(&avg_pool_tf(x));
        Tensor::cat(&[b1, b5, b3, bp], 1)
    }
}

/// `Mixed_6a`: torchvision's `InceptionB`. [N, 288, 35, 35] -> [N, 768, 17, 17]
pub struct InceptionB {
    pub branch3x3: BasicConv2d,
    pub branch3x3dbl_1: BasicConv2d,
    pub branch3x3dbl_2: BasicConv2d,
    pub branch3x3dbl_3: BasicConv2d,
}

impl InceptionB {
    fn load(ld: &mut Loader, name: &str, c: i64) -> Result<Self> {
        let n = |b: &str| format!("{name}.{b}");
        Ok(InceptionB {
            branch3x3: BasicConv2d::load(ld, &n("branch3x3"), c, 384, [3, 3], 2, [0, 0])?,
            branch3x3dbl_1: BasicConv2d::load(ld, &n("branch3x3dbl_1"), c, 64, [1, 1], 1, [0, 0])?,
            branch3x3dbl_2: BasicConv2d::load(ld, &n("branch3x3dbl_2"), 64, 96, [3, 3], 1, [1, 1])?,
            branch3x3dbl_3: BasicConv2d::load(ld, &n("branch3x3dbl_3"), 96, 96, [3, 3], 2, [0, 0])?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let b3 = self.branch3x3.forward(x);
        let bd = self.branch3x3dbl_3.forward(&self.branch3x3dbl_2.forward(&self.branch3x3dbl_1.forward(x)));
        Tensor::cat(&[b3, bd, max_pool_s2(x)], 1)
    }
}

/// `Mixed_6b..6e`: `FIDInceptionC`. [N, 768, 17, 17] -> [N, 768, 17, 17]
pub struct InceptionC {
    pub branch1x1: BasicConv2d,
    pub branch7x7_1: BasicConv2d,
    pub branch7x7_2: BasicConv2d,
    pub branch7x7_3: BasicConv2d,
    pub branch7x7dbl_1: BasicConv2d,
    pub branch7x7dbl_2: BasicConv2d,
    pub branch7x7dbl_3: BasicConv2d,
    pub branch7x7dbl_4: BasicConv2d,
    pub branch7x7dbl_5: BasicConv2d,
    pub branch_pool: BasicConv2d,
}

impl InceptionC {
    fn load(ld: &mut Loader, name: &str, c: i64, c7: i64) -> Result<Self> {
        let n = |b: &str| format!("{name}.{b}");
        let (row, col) = (([1, 7], [0, 3]), ([7, 1], [3, 0]));
        Ok(InceptionC {
            branch1x1: BasicConv2d::load(ld, &n("branch1x1"), c, 192, [1, 1], 1, [0, 0])?,
            branch7x7_1: BasicConv2d::load(ld, &n("branch7x7_1"), c, c7, [1, 1], 1, [0, 0])?,
            branch7x7_2: BasicConv2d::load(ld, &n("branch7x7_2"), c7, c7, row.0, 1, row.1)?,
            branch7x7_3: BasicConv2d::load(ld, &n("branch7x7_3"), c7, 192, col.0, 1, col.1)?,
            branch7x7dbl_1: BasicConv2d::load(ld, &n("branch7x7dbl_1"), c, c7, [1, 1], 1, [0, 0])?,
            branch7x7dbl_2: BasicConv2d::load(ld, &n("branch7x7dbl_2"), c7, c7, col.0, 1, col.1)?,
            branch7x7dbl_3: BasicConv2d::load(ld, &n("branch7x7dbl_3"), c7, c7, row.0, 1, row.1)?,
            branch7x7dbl_4: BasicConv2d::load(ld, &n("branch7x7dbl_4"), c7, c7, col.0, 1, col.1)?,
            branch7x7dbl_5: BasicConv2d::load(ld, &n("branch7x7dbl_5"), c7, 192, row.0, 1, row.1)?,
            branch_pool: BasicConv2d::load(ld, &n("branch_pool"), c, 192, [1, 1], 1, [0, 0])?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let b1 = self.branch1x1.forward(x);
        let b7 = self.branch7x7_3.forward(&self.branch7x7_2.forward(&self.branch7x7_1.forward(x)));
        let mut bd = self.branch7x7dbl_1.forward(x);
        for conv in [&self.branch7x7dbl_2, &self.branch7x7dbl_3, &self.branch7x7dbl_4, &self.branch7x7dbl_5] {
            bd = conv.forward(&bd);
        }
        let bp = self.branch_pool.forward(&avg_pool_tf(x));
        Tensor::cat(&[b1, b7, bd, bp], 1)
    }
}

/// `Mixed_7a`: torchvision's `InceptionD`. [N, 768, 17, 17] -> [N, 1280, 8, 8]
pub struct InceptionD {
    pub branch3x3_1: BasicConv2d,
    pub branch3x3_2: BasicConv2d,
    pub branch7x7x3_1: BasicConv2d,
    pub branch7x7x3_2: BasicConv2d,
    pub branch7x7x3_3: BasicConv2d,
    pub branch7x7x3_4: BasicConv2d,
}

impl InceptionD {
    fn load(ld: &mut Loader, name: &str, c: i64) -> Result<Self> {
        let n = |b: &str| format!("{name}.{b}");
        Ok(InceptionD {
            branch3x3_1: BasicConv2d::load(ld, &n("branch3x3_1"), c, 192, [1, 1], 1, [0, 0])?,
            branch3x3_2: BasicConv2d::load(ld, &n("branch3x3_2"), 192, 320, [3, 3], 2, [0, 0])?,
            branch7x7x3_1: BasicConv2d::load(ld, &n("branch7x7x3_1"), c, 192, [1, 1], 1, [0, 0])?,
            branch7x7x3_2: BasicConv2d::load(ld, &n("branch7x7x3_2"), 192, 192, [1, 7], 1, [0, 3])?,
            branch7x7x3_3: BasicConv2d::load(ld, &n("branch7x7x3_3"), 192, 192, [7, 1], 1, [3, 0])?,
            branch7x7x3_4: BasicConv2d::load(ld, &n("branch7x7x3_4"), 192, 192, [3, 3], 2, [0, 0])?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let b3 = self.branch3x3_2.forward(&self.branch3x3_1.forward(x));
        let mut b7 = self.branch7x7x3_1.forward(x);
        for conv in [&self.branch7x7x3_2, &self.branch7x7x3_3, &self.branch7x7x3_4] {
            b7 = conv.forward(&b7);
        }
        Tensor::cat(&[b3, b7, max_pool_s2(x)], 1)
    }
}

/// The pool in front of `branch_pool` of an E block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EPool {
    /// `FIDInceptionE_1` (`Mixed_7b`): 3x3 average, zeros not counted.
    Avg,
    /// `FIDInceptionE_2` (`Mixed_7c`): 3x3 max, stride 1, padding 1.
    Max,
}

/// `Mixed_7b` / `Mixed_7c`: `FIDInceptionE_1` / `FIDInceptionE_2`. [N, C, 8, 8] -> [N, 2048, 8, 8]
pub struct InceptionE {
    pub branch1x1: BasicConv2d,
    pub branch3x3_1: BasicConv2d,
    pub branch3x3_2a: BasicConv2d,
    pub branch3x3_2b: BasicConv2d,
    pub branch3x3dbl_1: BasicConv2d,
    pub branch3x3dbl_2: BasicConv2d,
    pub branch3x3dbl_3a: BasicConv2d,
    pub branch3x3dbl_3b: BasicConv2d,
    pub branch_pool: BasicConv2d,
    pub pool: EPool,
}

impl InceptionE {
    fn load(ld: &mut Loader, name: &str, c: i64, pool: EPool) -> Result<Self> {
        let n = |b: &str| format!("{name}.{b}");
        Ok(InceptionE {
            branch1x1: BasicConv2d::load(ld, &n("branch1x1"), c, 320, [1, 1], 1, [0, 0])?,
            branch3x3_1: BasicConv2d::load(ld, &n("branch3x3_1"), c, 384, [1, 1], 1, [0, 0])?,
            branch3x3_2a: BasicConv2d::load(ld, &n("branch3x3_2a"), 384, 384, [1, 3], 1, [0, 1])?,
            branch3x3_2b: BasicConv2d::load(ld, &n("branch3x3_2b"), 384, 384, [3, 1], 1, [1, 0])?,
            branch3x3dbl_1: BasicConv2d::load(ld, &n("branch3x3dbl_1"), c, 448, [1, 1], 1, [0, 0])?,
            branch3x3dbl_2: BasicConv2d::load(ld, &n("branch3x3dbl_2"), 448, 384, [3, 3], 1, [1, 1])?,
            branch3x3dbl_3a: BasicConv2d::load(ld, &n("branch3x3dbl_3a"), 384, 384, [1, 3], 1, [0, 1])?,
            branch3x3dbl_3b: BasicConv2d::load(ld, &n("branch3x3dbl_3b"), 384, 384, [3, 1], 1, [1, 0])?,
            branch_pool: BasicConv2d::load(ld, &n("branch_pool"), c, 192, [1, 1], 1, [0, 0])?,
            pool,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let b1 = self.branch1x1.forward(x);
        let t = self.branch3x3_1.forward(x);
        let b3 = Tensor::cat(&[self.branch3x3_2a.forward(&t), self.branch3x3_2b.forward(&t)], 1);
        let t = self.branch3x3dbl_2.forward(&self.branch3x3dbl_1.forward(x));
        let bd = Tensor::cat(&[self.branch3x3dbl_3a.forward(&t), self.branch3x3dbl_3b.forward(&t)], 1);
        let pooled = match self.pool {
            EPool::Avg => avg_pool_tf(x),
            EPool::Max => x.max_pool2d([3, 3], [1, 1], [1, 1], [1, 1], false),
        };
        let bp = self.branch_pool.forward(&pooled);
        Tensor::cat(&[b1, b3, bd, bp], 1)
    }
}

/// The features `Inception::features` returns, all f32.
pub struct InceptionOutput {
    /// 2048-d pool features (FID, precision/recall). [N, 2048]
    pub pool: Tensor,
    /// Spatial features for sFID, as the ADM evaluator (guided-diffusion `evaluations/evaluator.py`)
    /// takes them: `mixed_6/conv:0[..., :7]` reshaped to [N, -1]. In the TF graph `mixed_6` is the
    /// third 17x17 block, i.e. `Mixed_6d` here (`mixed` = `Mixed_5b`, ..., `mixed_3` = `Mixed_6a`,
    /// `mixed_4..7` = `Mixed_6b..6e`), and its `conv` is `branch1x1` (after BatchNorm and ReLU),
    /// which is the first 192 channels of `Mixed_6d`'s output. So: `Mixed_6d` output
    /// [N, 768, 17, 17], channels 0..7, permuted to [N, 17, 17, 7] (TF's NHWC order) and
    /// flattened. [N, 2023]
    pub spatial: Tensor,
    /// Softmax over the 1008 logits (Inception Score). [N, 1008]
    pub probs: Tensor,
}

/// pytorch-fid's FID Inception-v3, named like its state dict.
pub struct Inception {
    pub conv2d_1a_3x3: BasicConv2d,
    pub conv2d_2a_3x3: BasicConv2d,
    pub conv2d_2b_3x3: BasicConv2d,
    pub conv2d_3b_1x1: BasicConv2d,
    pub conv2d_4a_3x3: BasicConv2d,
    pub mixed_5b: InceptionA,
    pub mixed_5c: InceptionA,
    pub mixed_5d: InceptionA,
    pub mixed_6a: InceptionB,
    pub mixed_6b: InceptionC,
    pub mixed_6c: InceptionC,
    pub mixed_6d: InceptionC,
    pub mixed_6e: InceptionC,
    pub mixed_7a: InceptionD,
    pub mixed_7b: InceptionE,
    pub mixed_7c: InceptionE,
    /// `fc`: 2048 -> 1008
    pub fc: Linear,
    device: Device,
}

impl Inception {
    /// Loads a safetensors file with pytorch-fid's parameter names onto `device`.
    pub fn load(path: &Path, device: Device) -> Result<Inception> {
        let ld = &mut Loader::open(path, device)?;
        let model = Inception {
            conv2d_1a_3x3: BasicConv2d::load(ld, "Conv2d_1a_3x3", 3, 32, [3, 3], 2, [0, 0])?,
            conv2d_2a_3x3: BasicConv2d::load(ld, "Conv2d_2a_3x3", 32, 32, [3, 3], 1, [0, 0])?,
            conv2d_2b_3x3: BasicConv2d::load(ld, "Conv2d_2b_3x3", 32, 64, [3, 3], 1, [1, 1])?,
            conv2d_3b_1x1: BasicConv2d::load(ld, "Conv2d_3b_1x1", 64, 80, [1, 1], 1, [0, 0])?,
            conv2d_4a_3x3: BasicConv2d::load(ld, "Conv2d_4a_3x3", 80, 192, [3, 3], 1, [0, 0])?,
            mixed_5b: InceptionA::load(ld, "Mixed_5b", 192, 32)?,
            mixed_5c: InceptionA::load(ld, "Mixed_5c", 256, 64)?,
            mixed_5d: InceptionA::load(ld, "Mixed_5d", 288, 64)?,
            mixed_6a: InceptionB::load(ld, "Mixed_6a", 288)?,
            mixed_6b: InceptionC::load(ld, "Mixed_6b", 768, 128)?,
            mixed_6c: InceptionC::load(ld, "Mixed_6c", 768, 160)?,
            mixed_6d: InceptionC::load(ld, "Mixed_6d", 768, 160)?,
            mixed_6e: InceptionC::load(ld, "Mixed_6e", 768, 192)?,
            mixed_7a: InceptionD::load(ld, "Mixed_7a", 768)?,
            mixed_7b: InceptionE::load(ld, "Mixed_7b", 1280, EPool::Avg)?,
            mixed_7c: InceptionE::load(ld, "Mixed_7c", 2048, EPool::Max)?,
            fc: Linear::load(ld, "fc", POOL_DIM, NUM_CLASSES, true)?,
            device,
        };
        // Left over: BatchNorm's num_batches_tracked (and an aux head, if a torchvision file):
        // not used by the forward pass.
        Ok(model)
    }

    /// Images [N, H, W, 3] u8 (as in the ADM .npz) -> features. As pytorch-fid: x / 255, bilinear
    /// resize to 299x299 (align_corners = false, `F.interpolate`'s default scale handling), then
    /// `2 * x - 1`, all in f32; the network then runs in `kind`. Outputs are f32; the final fc and
    /// softmax are computed in f32 from the pool features. No grad.
    ///
    /// Panics if `images` is not [N, H, W, 3] u8.
    pub fn features(&self, images: &Tensor, kind: Kind) -> InceptionOutput {
        tch::no_grad(|| {
            let (n, _, _, c) = images.size4().expect("images are [N, H, W, 3]");
            assert_eq!(c, 3, "images are [N, H, W, 3]");
            assert_eq!(images.kind(), Kind::Uint8, "images are u8");
            let x = images.to_device(self.device).permute([0, 3, 1, 2]).to_kind(Kind::Float) / 255.0;
            let x = x.upsample_bilinear2d([INPUT_SIZE, INPUT_SIZE], false, None, None);
            let x = (x * 2.0 - 1.0).to_kind(kind);
            let x = self.conv2d_1a_3x3.forward(&x);
            let x = self.conv2d_2a_3x3.forward(&x);
            let x = max_pool_s2(&self.conv2d_2b_3x3.forward(&x));
            let x = self.conv2d_3b_1x1.forward(&x);
            let x = max_pool_s2(&self.conv2d_4a_3x3.forward(&x));
            let x = self.mixed_5d.forward(&self.mixed_5c.forward(&self.mixed_5b.forward(&x)));
            let x = self.mixed_6a.forward(&x);
            let x = self.mixed_6d.forward(&self.mixed_6c.forward(&self.mixed_6b.forward(&x)));
            let spatial = x.narrow(1, 0, SPATIAL_CHANNELS).permute([0, 2, 3, 1]).reshape([n, -1]).to_kind(Kind::Float);
            let x = self.mixed_6e.forward(&x);
            let x = self.mixed_7c.forward(&self.mixed_7b.forward(&self.mixed_7a.forward(&x)));
            let pool = x.adaptive_avg_pool2d([1, 1]).flatten(1, -1).to_kind(Kind::Float);
            let probs = self.fc.forward(&pool).softmax(-1, Kind::Float);
            InceptionOutput { pool, spatial, probs }
        })
    }
}
