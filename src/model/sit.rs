//! SiT with the REG token (Wu et al. 2025): names and layout mirror the REG `state_dict`.

use crate::layers::{LayerNorm, Linear};
use crate::model::cond::{Caption, Cond};
use crate::model::dims::SitDims;
use crate::model::params::{Init, ParamBuilder};
use tch::{Kind, Tensor};

/// The trained layers take their weights from the parameter store, with REG's init
/// (xavier-uniform weight, zero bias) unless told otherwise. They compute in the dtype
/// of their input: fp32 master weights are cast on the way in, and their gradients come
/// back in fp32.
impl Linear {
    pub fn new(pb: &mut ParamBuilder, name: &str, d_in: i64, d_out: i64) -> Self {
        let init = Init::XavierUniform { fan_in: d_in, fan_out: d_out };
        Self::with_init(pb, name, d_in, d_out, init)
    }

    /// A Linear that starts at zero (adaLN-Zero and the output heads).
    pub fn zeros(pb: &mut ParamBuilder, name: &str, d_in: i64, d_out: i64) -> Self {
        Self::with_init(pb, name, d_in, d_out, Init::Zeros)
    }

    fn with_init(pb: &mut ParamBuilder, name: &str, d_in: i64, d_out: i64, init: Init) -> Self {
        Linear {
            weight: pb.param(&format!("{name}.weight"), &[d_out, d_in], init),
            bias: Some(pb.param(&format!("{name}.bias"), &[d_out], Init::Zeros)),
        }
    }
}

/// `nn.LayerNorm(D, elementwise_affine=True)`, starting as the identity.
impl LayerNorm {
    pub fn new(pb: &mut ParamBuilder, name: &str, dim: i64, eps: f64) -> Self {
        LayerNorm {
            weight: pb.param(&format!("{name}.weight"), &[dim], Init::Ones),
            bias: pb.param(&format!("{name}.bias"), &[dim], Init::Zeros),
            eps,
        }
    }
}

/// LayerNorm without affine parameters, eps 1e-6 (SiT's norm1/norm2/norm_final).
fn norm(x: &Tensor) -> Tensor {
    let d = *x.size().last().unwrap();
    x.layer_norm([d], None::<Tensor>, None::<Tensor>, 1e-6, true)
}

/// `x * (1 + scale) + shift`, broadcast over tokens. x: [N, T, D], shift/scale: [N, D]
fn modulate(x: &Tensor, shift: &Tensor, scale: &Tensor) -> Tensor {
    x * (scale.unsqueeze(1) + 1.0) + shift.unsqueeze(1)
}

/// Patch embedding: a `p x p` conv with stride `p`, flattened to tokens.
pub struct PatchEmbed {
    pub weight: Tensor,
    pub bias: Tensor,
    patch: i64,
}

impl PatchEmbed {
    pub fn new(pb: &mut ParamBuilder, d: &SitDims) -> Self {
        let (c, p, h) = (d.in_channels, d.patch_size, d.hidden_size);
        // Initialised like a Linear over the flattened patch (as SiT does).
        let init = Init::XavierUniform { fan_in: c * p * p, fan_out: h };
        PatchEmbed {
            weight: pb.param("x_embedder.proj.weight", &[h, c, p, p], init),
            bias: pb.param("x_embedder.proj.bias", &[h], Init::Zeros),
            patch: p,
        }
    }

    /// x: [N, C, H, W] -> [N, T, D]
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let k = x.kind();
        let p = self.patch;
        x.conv2d(&self.weight.to_kind(k), Some(self.bias.to_kind(k)), [p, p], [0, 0], [1, 1], 1).flatten(2, -1).transpose(1, 2)
    }
}

/// Sinusoidal features of `t` in [0, 1] (not scaled by 1000) through a 2-layer MLP.
pub struct TimestepEmbedder {
    pub mlp_0: Linear,
    pub mlp_2: Linear,
}

const FREQ_DIM: i64 = 256;

impl TimestepEmbedder {
    pub fn new(pb: &mut ParamBuilder, hidden: i64) -> Self {
        let n = |pb: &mut ParamBuilder, name: &str, i, o| Linear {
            weight: pb.param(&format!("{name}.weight"), &[o, i], Init::Normal { std: 0.02 }),
            bias: Some(pb.param(&format!("{name}.bias"), &[o], Init::Zeros)),
        };
        TimestepEmbedder { mlp_0: n(pb, "t_embedder.mlp.0", FREQ_DIM, hidden), mlp_2: n(pb, "t_embedder.mlp.2", hidden, hidden) }
    }

    /// `[cos(t f_k), sin(t f_k)]`, `f_k = exp(-ln(10000) k / 128)`. t: [N] -> [N, 256] f32
    pub fn frequencies(t: &Tensor) -> Tensor {
        let half = FREQ_DIM / 2;
        let k = Tensor::arange(half, (Kind::Float, t.device()));
        let freqs = (k * (-(10000f64.ln()) / half as f64)).exp();
        let args = t.to_kind(Kind::Float).unsqueeze(1) * freqs.unsqueeze(0);
        Tensor::cat(&[args.cos(), args.sin()], -1)
    }

    /// t: [N] -> [N, D] in `kind`
    pub fn forward(&self, t: &Tensor, kind: Kind) -> Tensor {
        let f = Self::frequencies(t).to_kind(kind);
        self.mlp_2.forward(&self.mlp_0.forward(&f).silu())
    }
}

/// Label table with one extra row, the null label `num_classes` used for guidance.
pub struct LabelEmbedder {
    pub embedding_table: Tensor,
}

impl LabelEmbedder {
    pub fn new(pb: &mut ParamBuilder, num_classes: i64, hidden: i64) -> Self {
        let init = Init::Normal { std: 0.02 };
        LabelEmbedder { embedding_table: pb.param("y_embedder.embedding_table.weight", &[num_classes + 1, hidden], init) }
    }

    /// y: [N] i64 (label dropout already applied by the caller) -> [N, D]
    pub fn forward(&self, y: &Tensor, kind: Kind) -> Tensor {
        self.embedding_table.to_kind(kind).index_select(0, y)
    }
}

/// A caption into the model: its token states projected to the model width join the
/// sequence (`context_embedder`), and its pooled state through a 2-layer MLP joins the
/// timestep in `c` (`pooled_embedder`), as SD3's MMDiT feeds CLIP.
pub struct TextEmbedder {
    pub context_embedder: Linear,
    pub pooled_mlp_0: Linear,
    pub pooled_mlp_2: Linear,
}

impl TextEmbedder {
    pub fn new(pb: &mut ParamBuilder, text_dim: i64, hidden: i64) -> Self {
        let normal = |pb: &mut ParamBuilder, name: &str, i, o| Linear {
            weight: pb.param(&format!("{name}.weight"), &[o, i], Init::Normal { std: 0.02 }),
            bias: Some(pb.param(&format!("{name}.bias"), &[o], Init::Zeros)),
        };
        TextEmbedder {
            context_embedder: Linear::new(pb, "context_embedder", text_dim, hidden),
            pooled_mlp_0: normal(pb, "pooled_embedder.mlp.0", text_dim, hidden),
            pooled_mlp_2: normal(pb, "pooled_embedder.mlp.2", hidden, hidden),
        }
    }

    /// Caption tokens in the model width. [N, L, Dt] -> [N, L, D]
    pub fn tokens(&self, c: &Caption, kind: Kind) -> Tensor {
        self.context_embedder.forward(&c.hidden.to_kind(kind))
    }

    /// The pooled caption's share of `c`. [N, Dt] -> [N, D]
    pub fn pooled(&self, c: &Caption, kind: Kind) -> Tensor {
        self.pooled_mlp_2.forward(&self.pooled_mlp_0.forward(&c.pooled.to_kind(kind)).silu())
    }
}

/// Multi-head self-attention (timm's `Attention`, optional qk-norm).
pub struct Attention {
    pub qkv: Linear,
    pub proj: Linear,
    pub q_norm: Option<LayerNorm>,
    pub k_norm: Option<LayerNorm>,
    heads: i64,
}

impl Attention {
    pub fn new(pb: &mut ParamBuilder, name: &str, d: &SitDims) -> Self {
        let h = d.hidden_size;
        let qkv = Linear::new(pb, &format!("{name}.qkv"), h, 3 * h);
        let (q_norm, k_norm) = if d.qk_norm {
            (
                Some(LayerNorm::new(pb, &format!("{name}.q_norm"), d.head_dim(), 1e-5)),
                Some(LayerNorm::new(pb, &format!("{name}.k_norm"), d.head_dim(), 1e-5)),
            )
        } else {
            (None, None)
        };
        let proj = Linear::new(pb, &format!("{name}.proj"), h, h);
        Attention { qkv, proj, q_norm, k_norm, heads: d.num_heads }
    }

    /// x: [N, T, D] -> [N, T, D]
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let (n, t, d) = x.size3().unwrap();
        let qkv = self.qkv.forward(x).reshape([n, t, 3, self.heads, d / self.heads]).permute([2, 0, 3, 1, 4]);
        let (mut q, mut k, v) = (qkv.get(0), qkv.get(1), qkv.get(2));
        if let (Some(qn), Some(kn)) = (&self.q_norm, &self.k_norm) {
            q = qn.forward(&q);
            k = kn.forward(&k);
        }
        let o = Tensor::scaled_dot_product_attention(&q, &k, &v, None::<Tensor>, 0.0, false, None, false);
        self.proj.forward(&o.transpose(1, 2).reshape([n, t, d]))
    }
}

/// Feed-forward `D -> 4D -> D` with tanh-approximated GELU.
pub struct Mlp {
    pub fc1: Linear,
    pub fc2: Linear,
}

impl Mlp {
    pub fn new(pb: &mut ParamBuilder, name: &str, d: &SitDims) -> Self {
        Mlp {
            fc1: Linear::new(pb, &format!("{name}.fc1"), d.hidden_size, d.mlp_hidden()),
            fc2: Linear::new(pb, &format!("{name}.fc2"), d.mlp_hidden(), d.hidden_size),
        }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        self.fc2.forward(&self.fc1.forward(x).gelu("tanh"))
    }
}

/// A transformer block with adaLN-Zero conditioning.
pub struct SiTBlock {
    pub attn: Attention,
    pub mlp: Mlp,
    pub adaln_modulation_1: Linear,
}

impl SiTBlock {
    pub fn new(pb: &mut ParamBuilder, i: usize, d: &SitDims) -> Self {
        let name = format!("blocks.{i}");
        SiTBlock {
            attn: Attention::new(pb, &format!("{name}.attn"), d),
            mlp: Mlp::new(pb, &format!("{name}.mlp"), d),
            adaln_modulation_1: Linear::zeros(pb, &format!("{name}.adaLN_modulation.1"), d.hidden_size, 6 * d.hidden_size),
        }
    }

    /// x: [N, T, D], c: [N, D] -> [N, T, D]
    pub fn forward(&self, x: &Tensor, c: &Tensor) -> Tensor {
        let m = self.adaln_modulation_1.forward(&c.silu()).chunk(6, -1);
        let (shift_msa, scale_msa, gate_msa) = (&m[0], &m[1], &m[2]);
        let (shift_mlp, scale_mlp, gate_mlp) = (&m[3], &m[4], &m[5]);
        let x = x + gate_msa.unsqueeze(1) * self.attn.forward(&modulate(&norm(x), shift_msa, scale_msa));
        &x + gate_mlp.unsqueeze(1) * self.mlp.forward(&modulate(&norm(&x), shift_mlp, scale_mlp))
    }
}

/// Output head: modulated LayerNorm, then `linear_cls` for the REG token and
/// `linear` for the image tokens.
pub struct FinalLayer {
    pub adaln_modulation_1: Linear,
    pub linear: Linear,
    pub linear_cls: Linear,
}

impl FinalLayer {
    pub fn new(pb: &mut ParamBuilder, d: &SitDims) -> Self {
        let h = d.hidden_size;
        let out = d.patch_size * d.patch_size * d.in_channels;
        FinalLayer {
            linear: Linear::zeros(pb, "final_layer.linear", h, out),
            linear_cls: Linear::zeros(pb, "final_layer.linear_cls", h, d.z_dim),
            adaln_modulation_1: Linear::zeros(pb, "final_layer.adaLN_modulation.1", h, 2 * h),
        }
    }

    /// x: [N, T+1, D], c: [N, D] -> ([N, T, p*p*C], [N, Dz])
    pub fn forward(&self, x: &Tensor, c: &Tensor) -> (Tensor, Tensor) {
        let m = self.adaln_modulation_1.forward(&c.silu()).chunk(2, -1);
        let x = modulate(&norm(x), &m[0], &m[1]);
        let cls = self.linear_cls.forward(&x.select(1, 0));
        let img = self.linear.forward(&x.narrow(1, 1, x.size()[1] - 1));
        (img, cls)
    }
}

/// REPA projector `D -> P -> P -> Dz` with SiLU (names `projectors.0.{0,2,4}`).
pub struct Projector {
    pub l0: Linear,
    pub l2: Linear,
    pub l4: Linear,
}

impl Projector {
    pub fn new(pb: &mut ParamBuilder, d: &SitDims) -> Self {
        Projector {
            l0: Linear::new(pb, "projectors.0.0", d.hidden_size, d.projector_dim),
            l2: Linear::new(pb, "projectors.0.2", d.projector_dim, d.projector_dim),
            l4: Linear::new(pb, "projectors.0.4", d.projector_dim, d.z_dim),
        }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        self.l4.forward(&self.l2.forward(&self.l0.forward(x).silu()).silu())
    }
}

/// What one forward pass returns.
pub struct SitOutput {
    /// Velocity of the latents. [N, C, H, W]
    pub x: Tensor,
    /// Projector output at `encoder_depth` for all tokens, REG token first. [N, T+1, Dz]
    pub zs: Tensor,
    /// Velocity of the REG token. [N, Dz]
    pub cls: Tensor,
}

/// SiT + REG.
pub struct SiT {
    pub dims: SitDims,
    pub x_embedder: PatchEmbed,
    pub t_embedder: TimestepEmbedder,
    /// The class model's label table.
    pub y_embedder: Option<LabelEmbedder>,
    /// The text model's caption projections.
    pub text_embedder: Option<TextEmbedder>,
    /// Fixed 2-D sin-cos table, row 0 (the REG token) zero. [1, T+1, D]
    pub pos_embed: Tensor,
    pub blocks: Vec<SiTBlock>,
    pub projector: Projector,
    pub final_layer: FinalLayer,
    pub cls_projectors2: Linear,
    pub wg_norm: LayerNorm,
}

impl SiT {
    /// Declares every parameter on `pb` (call `pb.finish` afterwards).
    pub fn new(pb: &mut ParamBuilder, d: &SitDims) -> Self {
        let x_embedder = PatchEmbed::new(pb, d);
        let t_embedder = TimestepEmbedder::new(pb, d.hidden_size);
        // Declared where the label table is, so a class model's layout is unchanged.
        let (y_embedder, text_embedder) = if d.text_dim > 0 {
            (None, Some(TextEmbedder::new(pb, d.text_dim, d.hidden_size)))
        } else {
            (Some(LabelEmbedder::new(pb, d.num_classes, d.hidden_size)), None)
        };
        let grid = d.input_size / d.patch_size;
        let pos_embed = pb.buffer("pos_embed", pos_embed_2d(d.hidden_size, grid));
        let blocks = (0..d.depth as usize).map(|i| SiTBlock::new(pb, i, d)).collect();
        let projector = Projector::new(pb, d);
        let final_layer = FinalLayer::new(pb, d);
        let cls_projectors2 = Linear::new(pb, "cls_projectors2", d.z_dim, d.hidden_size);
        let wg_norm = LayerNorm::new(pb, "wg_norm", d.hidden_size, 1e-6);
        SiT {
            dims: *d,
            x_embedder,
            t_embedder,
            y_embedder,
            text_embedder,
            pos_embed,
            blocks,
            projector,
            final_layer,
            cls_projectors2,
            wg_norm,
        }
    }

    /// Tokens after embedding: REG token in front, position table added. [N, T+1, D]
    pub fn embed(&self, x: &Tensor, cls: &Tensor, kind: Kind) -> Tensor {
        let img = self.x_embedder.forward(&x.to_kind(kind));
        let cls = if self.dims.reg_token { cls.to_kind(kind) } else { cls.zeros_like().to_kind(kind) };
        let reg = self.wg_norm.forward(&self.cls_projectors2.forward(&cls));
        Tensor::cat(&[reg.unsqueeze(1), img], 1) + self.pos_embed.to_kind(kind)
    }

    /// Conditioning `c = t_emb + y_emb` (class) or `t_emb + pooled_emb` (text). [N, D]
    pub fn condition(&self, t: &Tensor, y: &Cond, kind: Kind) -> Tensor {
        let t_emb = self.t_embedder.forward(t, kind);
        match (y, &self.y_embedder, &self.text_embedder) {
            (Cond::Class(y), Some(table), _) => t_emb + table.forward(y, kind),
            (Cond::Text(c), _, Some(text)) => t_emb + text.pooled(c, kind),
            _ => panic!("the condition does not match model.condition"),
        }
    }

    /// Output head and unpatchify: tokens [N, T+1, D] -> (velocity [N, C, H, W], REG velocity [N, Dz]).
    pub fn head(&self, h: &Tensor, c: &Tensor) -> (Tensor, Tensor) {
        let (img, cls) = self.final_layer.forward(h, c);
        (self.unpatchify(&img), cls)
    }

    /// The class model: x: [N, C, H, W], t: [N] in [0, 1], y: [N] i64, cls: [N, Dz]; computes in `kind`.
    pub fn forward(&self, x: &Tensor, t: &Tensor, y: &Tensor, cls: &Tensor, kind: Kind) -> SitOutput {
        self.forward_cond(x, t, &Cond::Class(y.shallow_clone()), cls, kind)
    }

    /// Any condition. A caption's L tokens go in front, `[text | REG token | patches]`, and
    /// every block attends over all of them; the projector and the head read the REG
    /// token and patches only, so the REPA and REG terms are those of the class model.
    pub fn forward_cond(&self, x: &Tensor, t: &Tensor, y: &Cond, cls: &Tensor, kind: Kind) -> SitOutput {
        let mut h = self.embed(x, cls, kind);
        let c = self.condition(t, y, kind);
        let text_len = match (y, &self.text_embedder) {
            (Cond::Text(caption), Some(text)) => {
                let tokens = text.tokens(caption, kind);
                let l = tokens.size()[1];
                h = Tensor::cat(&[tokens, h], 1);
                l
            }
            _ => 0,
        };
        let image = |h: &Tensor| if text_len > 0 { h.narrow(1, text_len, h.size()[1] - text_len) } else { h.shallow_clone() };
        let mut zs = None;
        for (i, block) in self.blocks.iter().enumerate() {
            h = block.forward(&h, &c);
            if i as i64 + 1 == self.dims.encoder_depth {
                zs = Some(self.projector.forward(&image(&h)));
            }
        }
        let (x, cls) = self.head(&image(&h), &c);
        SitOutput { x, zs: zs.expect("encoder_depth <= depth is validated"), cls }
    }

    /// [N, T, p*p*C] -> [N, C, H, W] (`n h w p q c -> n c h p w q`).
    pub fn unpatchify(&self, x: &Tensor) -> Tensor {
        let (n, p, c) = (x.size()[0], self.dims.patch_size, self.dims.in_channels);
        let g = self.dims.input_size / p;
        x.reshape([n, g, g, p, p, c]).permute([0, 5, 1, 3, 2, 4]).reshape([n, c, g * p, g * p])
    }
}

/// MAE-style 2-D sin-cos table for a `grid x grid` layout with one leading zero row
/// for the REG token. The first half of the channels encodes the column, the second
/// the row (the reference builds its grid with `meshgrid(w, h)`). -> [1, 1 + grid^2, D]
pub fn pos_embed_2d(dim: i64, grid: i64) -> Tensor {
    let half = dim / 2;
    let quarter = half / 2;
    let omega: Vec<f64> = (0..quarter).map(|k| 1.0 / 10000f64.powf(k as f64 / quarter as f64)).collect();
    let mut table = vec![0f64; ((1 + grid * grid) * dim) as usize];
    for i in 0..grid {
        for j in 0..grid {
            let row = &mut table[((1 + i * grid + j) * dim) as usize..][..dim as usize];
            for (part, pos) in [(0usize, j as f64), (1usize, i as f64)] {
                for (k, w) in omega.iter().enumerate() {
                    let base = part * half as usize;
                    row[base + k] = (pos * w).sin();
                    row[base + quarter as usize + k] = (pos * w).cos();
                }
            }
        }
    }
    Tensor::from_slice(&table).to_kind(Kind::Float).reshape([1, 1 + grid * grid, dim])
}
