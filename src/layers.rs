//! The tensor layers the networks are built from (Linear, LayerNorm, GroupNorm, Conv2d,
//! self-attention): weights and forward passes, computed in the dtype of the input. Who
//! makes the weights is not their concern: the trained model's parameter store
//! (`model::params`) or a published file (`encoders::loader`).

use tch::Tensor;

/// `nn.Linear`: y = x W^T + b.
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

impl Linear {
    /// x: [..., in] -> [..., out], computed in the dtype of `x`.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let k = x.kind();
        x.linear(&self.weight.to_kind(k), self.bias.as_ref().map(|b| b.to_kind(k)))
    }
}

/// Multi-head self-attention as the hub's ViT and CLIP layers compute it: `q`, `k`, `v`
/// projections of x [N, T, D] split into `heads`, SDPA at its default scale
/// 1/sqrt(head_dim) without dropout (`causal`: each token sees those before it), heads
/// joined, then `out`.
pub fn self_attention(x: &Tensor, q: &Linear, k: &Linear, v: &Linear, out: &Linear, heads: i64, causal: bool) -> Tensor {
    let (n, t, d) = x.size3().expect("attention input is [N, T, D]");
    let split = |l: &Linear| l.forward(x).reshape([n, t, heads, d / heads]).transpose(1, 2);
    let o = Tensor::scaled_dot_product_attention(&split(q), &split(k), &split(v), None::<Tensor>, 0.0, causal, None, false);
    out.forward(&o.transpose(1, 2).reshape([n, t, d]))
}

/// `nn.LayerNorm(D, eps)` over the last dimension, with affine parameters.
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub eps: f64,
}

impl LayerNorm {
    /// x: [..., D], in the dtype of `x`.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let k = x.kind();
        let d = *x.size().last().expect("LayerNorm input has a last dimension");
        x.layer_norm([d], Some(self.weight.to_kind(k)), Some(self.bias.to_kind(k)), self.eps, true)
    }
}

/// `nn.GroupNorm(groups, C, eps)` with affine parameters.
pub struct GroupNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub groups: i64,
    pub eps: f64,
}

impl GroupNorm {
    /// x: [N, C, ...], in the dtype of `x`.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let k = x.kind();
        x.group_norm(self.groups, Some(self.weight.to_kind(k)), Some(self.bias.to_kind(k)), self.eps, true)
    }
}

/// `nn.Conv2d` (dilation 1, one group); stride 1 and no padding unless `stride` and
/// `padding` set others.
pub struct Conv2d {
    /// [C_out, C_in, kh, kw]
    pub weight: Tensor,
    /// [C_out]
    pub bias: Option<Tensor>,
    stride: [i64; 2],
    padding: [i64; 2],
}

impl Conv2d {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Conv2d { weight, bias, stride: [1, 1], padding: [0, 0] }
    }

    /// The same stride along H and W.
    pub fn stride(self, s: i64) -> Self {
        Conv2d { stride: [s, s], ..self }
    }

    /// Zero padding [along H, along W].
    pub fn padding(self, padding: [i64; 2]) -> Self {
        Conv2d { padding, ..self }
    }

    /// x: [N, C_in, H, W] -> [N, C_out, H', W'], in the dtype of `x`.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let k = x.kind();
        x.conv2d(&self.weight.to_kind(k), self.bias.as_ref().map(|b| b.to_kind(k)), self.stride, self.padding, [1, 1], 1)
    }
}
