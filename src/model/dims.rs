//! SiT + REG as numbers: the resolved dimensions of one model, the named presets
//! (S, B, L, XL with patch 2, 4 or 8) and what they cost in FLOPs.

/// The fully resolved architecture (no options left).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SitDims {
    pub depth: i64,
    pub hidden_size: i64,
    pub num_heads: i64,
    pub patch_size: i64,
    pub input_size: i64,
    pub in_channels: i64,
    pub num_classes: i64,
    pub encoder_depth: i64,
    pub z_dim: i64,
    pub projector_dim: i64,
    pub qk_norm: bool,
    pub mlp_ratio: f64,
    /// Width of the caption encoder's states; 0 for the class model.
    pub text_dim: i64,
    /// Caption tokens in the sequence (77 for CLIP); 0 for the class model.
    pub text_len: i64,
    /// The REG token carries the noised encoder class token; without it (plain SiT and
    /// SiT + REPA arms of a study) its input is zero, a constant register token.
    pub reg_token: bool,
}

/// The numbers a size name fixes; patch size, input and encoder widths come separately.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Preset {
    pub depth: i64,
    pub hidden_size: i64,
    pub num_heads: i64,
    /// 1-based block after which the REPA projector reads the tokens (REG's default).
    pub encoder_depth: i64,
}

/// The SiT sizes (depth / width / heads). With patch 2, 32x32 latents, 1000 classes
/// and the DINOv2-B projector, the parameter counts (fixed position table included) are
/// B/2 139,028,496, L/2 467,533,328 and XL/2 685,017,360 (684,721,296 trainable).
pub fn preset(size: &str) -> Option<Preset> {
    let (depth, hidden_size, num_heads, encoder_depth) = match size {
        "S" => (12, 384, 6, 4),
        "B" => (12, 768, 12, 4),
        "L" => (24, 1024, 16, 8),
        "XL" => (28, 1152, 16, 8),
        _ => return None,
    };
    Some(Preset { depth, hidden_size, num_heads, encoder_depth })
}

/// `SiT-XL/2` -> the XL preset and patch size 2.
pub fn parse_arch(arch: &str) -> Option<(Preset, i64)> {
    let (size, patch) = arch.strip_prefix("SiT-")?.split_once('/')?;
    let patch = patch.parse::<i64>().ok()?;
    Some((preset(size)?, patch))
}

impl SitDims {
    /// Image tokens `T = (H / p)^2`.
    pub fn num_patches(&self) -> i64 {
        (self.input_size / self.patch_size).pow(2)
    }
    pub fn head_dim(&self) -> i64 {
        self.hidden_size / self.num_heads
    }
    pub fn mlp_hidden(&self) -> i64 {
        (self.hidden_size as f64 * self.mlp_ratio) as i64
    }

    /// Training FLOPs per image (forward + backward = 3 x forward), counted from the
    /// shapes. Matmuls count 2 FLOPs per multiply-add; adaLN and the embedders act once
    /// per image, everything else once per token. A caption's tokens join every block
    /// (`text_len` more tokens in the sequence); the frozen text encoder is not counted.
    pub fn train_flops_per_image(&self) -> f64 {
        let (h, t) = (self.hidden_size as f64, (self.num_patches() + 1) as f64);
        let (p, c, z, pd) = (self.patch_size as f64, self.in_channels as f64, self.z_dim as f64, self.projector_dim as f64);
        let (l, dt) = (self.text_len as f64, self.text_dim as f64);
        let seq = t + l;
        let mlp = self.mlp_hidden() as f64;
        let per_token_block = 2.0 * (3.0 * h * h + h * h + 2.0 * h * mlp) + 4.0 * seq * h;
        let blocks = self.depth as f64 * (seq * per_token_block + 2.0 * h * 6.0 * h);
        let embed = (t - 1.0) * 2.0 * c * p * p * h + 2.0 * z * h + 2.0 * (256.0 * h + h * h);
        let text = l * 2.0 * dt * h + if l > 0.0 { 2.0 * (dt * h + h * h) } else { 0.0 };
        let projector = t * 2.0 * (h * pd + pd * pd + pd * z);
        let head = 2.0 * h * 2.0 * h + (t - 1.0) * 2.0 * h * p * p * c + 2.0 * h * z;
        3.0 * (blocks + embed + text + projector + head)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn xl2() -> SitDims {
        let (p, patch) = parse_arch("SiT-XL/2").unwrap();
        SitDims {
            depth: p.depth,
            hidden_size: p.hidden_size,
            num_heads: p.num_heads,
            patch_size: patch,
            input_size: 32,
            in_channels: 4,
            num_classes: 1000,
            encoder_depth: p.encoder_depth,
            z_dim: 768,
            projector_dim: 2048,
            qk_norm: false,
            mlp_ratio: 4.0,
            text_dim: 0,
            text_len: 0,
            reg_token: true,
        }
    }

    #[test]
    fn arch_names_parse() {
        assert_eq!(parse_arch("SiT-B/4").map(|(p, n)| (p.depth, p.hidden_size, n)), Some((12, 768, 4)));
        for bad in ["SiT-M/2", "SiT-XL/x", "DiT-XL/2", "SiT-XL"] {
            assert!(parse_arch(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn xl2_flops_match_the_design_figure() {
        let tflop_batch32 = xl2().train_flops_per_image() * 32.0 / 1e12;
        // 22.8 TFLOP is the transformer blocks' share (the figure MFU is quoted against
        // in docs/performance.md); the REPA projector
        // (2048-wide, on all 257 tokens) adds 0.40 and embedders + head 0.07.
        let projector: f64 = 3.0 * 257.0 * 2.0 * (1152.0 * 2048.0 + 2048.0 * 2048.0 + 2048.0 * 768.0) * 32.0 / 1e12;
        assert!((projector - 0.402).abs() < 0.005, "{projector}");
        assert!((tflop_batch32 - projector - 22.8).abs() < 0.1, "{tflop_batch32}");
    }
}
