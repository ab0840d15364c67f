//! Pillow-compatible BOX/BICUBIC resampling and the ADM (guided-diffusion) center crop.
//
// ImageNet is prepared with guided-diffusion's `center_crop_arr`, which resizes with
// Pillow; other resamplers (the `image` crate's included) land a few grey levels
// away. So this module re-implements the algorithm of Pillow's
// `libImaging/Resample.c` (8-bit path, Pillow 13.0): two separable passes, each
// rounding to u8 in between; per output index a window of taps whose support widens
// with the downscale factor (antialiasing); taps normalised to sum 1 in f64, then
// turned into 22-bit fixed point and accumulated in i32. The f64 expressions keep
// Pillow's operation order so that the fixed-point taps come out bit-identical, and
// the results match Pillow exactly (tests/crop.rs).

use std::ops::Range;

use image::RgbImage;

/// Resampling filter, as Pillow's `Image.BOX` and `Image.BICUBIC`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Filter {
    Box,
    Bicubic,
}

/// Fractional bits of the fixed-point taps: 8 bits of pixel value and 2 bits of
/// headroom (bicubic taps can sum above 1 on one side of zero) keep the i32
/// accumulator from overflowing.
const PRECISION_BITS: u32 = 32 - 8 - 2;
/// Accumulators start at one half so that the final shift rounds to nearest.
const HALF: i32 = 1 << (PRECISION_BITS - 1);

impl Filter {
    /// Half-width of the kernel at scale 1.
    fn support(self) -> f64 {
        match self {
            Filter::Box => 0.5,
            Filter::Bicubic => 2.0,
        }
    }

    fn weight(self, x: f64) -> f64 {
        match self {
            // Half-open on the left so that each source pixel falls in exactly one box.
            Filter::Box => {
                if x > -0.5 && x <= 0.5 {
                    1.0
                } else {
                    0.0
                }
            }
            // Keys cubic convolution with a = -0.5, written in Pillow's operation order.
            Filter::Bicubic => {
                const A: f64 = -0.5;
                let x = x.abs();
                if x < 1.0 {
                    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * A
                } else {
                    0.0
                }
            }
        }
    }
}

/// Fixed-point taps of one resampling pass, for a contiguous range of output indices.
struct Coeffs {
    /// Stride of `taps`: the most taps any output index can have.
    ksize: usize,
    /// Per output index: first source index and number of taps.
    bounds: Vec<(usize, usize)>,
    /// `ksize` taps per output index; only the first `bounds[i].1` are used.
    taps: Vec<i32>,
    /// Every output index has exactly `ksize` taps (see `pad`).
    fixed: bool,
}

impl Coeffs {
    /// Taps mapping `in_size` source samples onto `out_size`, for outputs in `range`.
    /// An output's taps do not depend on its neighbours, so a sub-range yields exactly
    /// the taps that the full resize would use there.
    ///
    /// With `pad`, each window is widened to `ksize` taps with zero weights (shifted
    /// left at the right edge), so that the horizontal pass can run a loop of constant
    /// length; zero taps add nothing, so the sums are unchanged.
    fn new(in_size: u32, out_size: u32, filter: Filter, range: Range<usize>, pad: bool) -> Self {
        let scale = f64::from(in_size) / f64::from(out_size);
        // Downscaling stretches the kernel over the source: that is the antialiasing.
        let filterscale = scale.max(1.0);
        let support = filter.support() * filterscale;
        let ksize = support.ceil() as usize * 2 + 1;
        let inv = 1.0 / filterscale;

        let fixed = pad && in_size as usize >= ksize;
        let n = range.len();
        let mut bounds = Vec::with_capacity(n);
        let mut taps = vec![0i32; n * ksize];
        let mut w = vec![0f64; ksize];
        for (xx, k) in range.zip(taps.chunks_exact_mut(ksize)) {
            let center = (xx as f64 + 0.5) * scale;
            // Truncating casts, as C's `(int)`, then clamped to the image.
            let xmin = ((center - support + 0.5) as i64).max(0);
            let xmax = ((center + support + 0.5) as i64).min(i64::from(in_size));
            let len = (xmax - xmin).clamp(0, ksize as i64) as usize;
            let mut sum = 0.0;
            for (x, wx) in w[..len].iter_mut().enumerate() {
                *wx = filter.weight(((x as i64 + xmin) as f64 - center + 0.5) * inv);
                sum += *wx;
            }
            for (kx, wx) in k.iter_mut().zip(&mut w[..len]) {
                if sum != 0.0 {
                    *wx /= sum;
                }
                // Round half away from zero, as Pillow's `normalize_coeffs_8bpc`.
                let f = *wx * f64::from(1u32 << PRECISION_BITS);
                *kx = if f < 0.0 { (f - 0.5) as i32 } else { (f + 0.5) as i32 };
            }
            let mut start = xmin as usize;
            if fixed && len < ksize {
                let shift = start - start.min(in_size as usize - ksize);
                k.copy_within(..len, shift);
                k[..shift].fill(0);
                k[shift + len..].fill(0);
                start -= shift;
            }
            bounds.push((start, if fixed { ksize } else { len }));
        }
        Coeffs { ksize, bounds, taps, fixed }
    }

    fn get(&self, i: usize) -> (usize, &[i32]) {
        let (start, len) = self.bounds[i];
        (start, &self.taps[i * self.ksize..][..len])
    }

    /// Source indices touched by any output index.
    fn source_span(&self) -> Range<usize> {
        let lo = self.bounds.iter().map(|b| b.0).min().unwrap_or(0);
        let hi = self.bounds.iter().map(|b| b.0 + b.1).max().unwrap_or(0);
        lo..hi.max(lo)
    }
}

#[inline]
fn clip8(acc: i32) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// A window of an interleaved RGB image: buffer row `r` is image row `row0 + r`,
/// buffer column `c` is image column `col0 + c`; rows are `stride` pixels long.
struct View<'a> {
    data: &'a [u8],
    stride: usize,
    col0: usize,
    row0: usize,
}

impl View<'_> {
    fn row(&self, y: usize) -> &[u8] {
        let n = self.stride * 3;
        &self.data[(y - self.row0) * n..][..n]
    }
}

/// Horizontal pass over image rows `rows`: one output row per row, `c.bounds.len()`
/// pixels wide.
fn horizontal(src: &View, rows: Range<usize>, c: &Coeffs) -> Vec<u8> {
    let out_w = c.bounds.len();
    let mut out = vec![0u8; out_w * 3 * rows.len()];
    if out_w == 0 {
        return out;
    }
    #[cfg(target_arch = "x86_64")]
    if c.fixed && std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2, checked just above.
        unsafe { avx2::horizontal(src, rows, c, &mut out) };
        return out;
    }
    // Constant tap counts let the compiler unroll the inner loop and drop its bounds
    // checks. 3: BOX halving; 5: upscaling; 7, 9: the ADM bicubic step (its scale is
    // below 2 after the halvings).
    match (c.fixed, c.ksize) {
        (true, 3) => horizontal_fixed::<3>(src, rows, c, &mut out),
        (true, 5) => horizontal_fixed::<5>(src, rows, c, &mut out),
        (true, 7) => horizontal_fixed::<7>(src, rows, c, &mut out),
        (true, 9) => horizontal_fixed::<9>(src, rows, c, &mut out),
        _ => horizontal_any(src, rows, c, &mut out),
    }
    out
}

fn horizontal_fixed<const K: usize>(src: &View, rows: Range<usize>, c: &Coeffs, out: &mut [u8]) {
    let out_w = c.bounds.len();
    for (y, out_row) in rows.zip(out.chunks_exact_mut(out_w * 3)) {
        let row = src.row(y);
        let windows = c.bounds.iter().zip(c.taps.chunks_exact(K));
        for (o, (&(start, _), k)) in out_row.chunks_exact_mut(3).zip(windows) {
            let px = &row[(start - src.col0) * 3..][..K * 3];
            let (mut r, mut g, mut b) = (HALF, HALF, HALF);
            for j in 0..K {
                r += i32::from(px[3 * j]) * k[j];
                g += i32::from(px[3 * j + 1]) * k[j];
                b += i32::from(px[3 * j + 2]) * k[j];
            }
            o[0] = clip8(r);
            o[1] = clip8(g);
            o[2] = clip8(b);
        }
    }
}

fn horizontal_any(src: &View, rows: Range<usize>, c: &Coeffs, out: &mut [u8]) {
    let out_w = c.bounds.len();
    for (y, out_row) in rows.zip(out.chunks_exact_mut(out_w * 3)) {
        let row = src.row(y);
        for (xx, o) in out_row.chunks_exact_mut(3).enumerate() {
            let (start, k) = c.get(xx);
            let px = &row[(start - src.col0) * 3..][..k.len() * 3];
            let (mut r, mut g, mut b) = (HALF, HALF, HALF);
            for (p, &w) in px.chunks_exact(3).zip(k) {
                r += i32::from(p[0]) * w;
                g += i32::from(p[1]) * w;
                b += i32::from(p[2]) * w;
            }
            o[0] = clip8(r);
            o[1] = clip8(g);
            o[2] = clip8(b);
        }
    }
}

/// Vertical pass over image columns `cols`: `c.bounds.len()` output rows, each
/// `cols.len()` pixels wide.
fn vertical(src: &View, cols: Range<usize>, c: &Coeffs) -> Vec<u8> {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2, checked just above.
        return unsafe { avx2::vertical(src, cols, c) };
    }
    vertical_body(src, cols, c)
}

// Plain Rust that auto-vectorises well; inlined into the AVX2 copy, where the
// 8-lane u8 -> i32 widening and multiply make it about 4x faster than with SSE2.
#[inline(always)]
fn vertical_body(src: &View, cols: Range<usize>, c: &Coeffs) -> Vec<u8> {
    let w3 = cols.len() * 3;
    let x0 = (cols.start - src.col0) * 3;
    let mut out = vec![0u8; w3 * c.bounds.len()];
    if w3 == 0 {
        return out;
    }
    // Row-at-a-time accumulation: contiguous loads.
    let mut acc = vec![0i32; w3];
    for (yy, out_row) in out.chunks_exact_mut(w3).enumerate() {
        let (start, k) = c.get(yy);
        acc.fill(HALF);
        for (j, &wt) in k.iter().enumerate() {
            let row = &src.row(start + j)[x0..][..w3];
            for (a, &p) in acc.iter_mut().zip(row) {
                *a += i32::from(p) * wt;
            }
        }
        for (o, &a) in out_row.iter_mut().zip(&acc) {
            *o = clip8(a);
        }
    }
    out
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;
    use std::ops::Range;

    use super::{Coeffs, View, HALF, PRECISION_BITS};

    /// # Safety
    /// The CPU must support AVX2.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn vertical(src: &View, cols: Range<usize>, c: &Coeffs) -> Vec<u8> {
        super::vertical_body(src, cols, c)
    }

    /// Horizontal pass for `c.fixed` taps. Packed RGB does not map onto SIMD lanes,
    /// so each source row is widened to RGBX once; an output pixel is then two taps
    /// (8 lanes: 2 pixels x 4 channels) per multiply-add against taps repeated per
    /// channel. The compiler does not find this itself (it scalarises the unused X
    /// lane). An odd tap count gets one zero tap, which may read the zero pixel
    /// appended to the row.
    ///
    /// # Safety
    /// The CPU must support AVX2.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn horizontal(src: &View, rows: Range<usize>, c: &Coeffs, out: &mut [u8]) {
        // A constant pair count unrolls the tap loop.
        match c.ksize.div_ceil(2) {
            2 => horizontal_pairs::<2>(src, rows, c, out),
            3 => horizontal_pairs::<3>(src, rows, c, out),
            4 => horizontal_pairs::<4>(src, rows, c, out),
            5 => horizontal_pairs::<5>(src, rows, c, out),
            _ => horizontal_pairs::<0>(src, rows, c, out),
        }
    }

    /// `P` tap pairs per output pixel; 0: read it from `c.ksize` at run time.
    #[inline(always)]
    fn horizontal_pairs<const P: usize>(src: &View, rows: Range<usize>, c: &Coeffs, out: &mut [u8]) {
        let pairs = if P == 0 { c.ksize.div_ceil(2) } else { P };
        let out_w = c.bounds.len();
        let mut taps = vec![0i32; out_w * pairs * 8];
        for (t, k) in taps.chunks_exact_mut(pairs * 8).zip(c.taps.chunks_exact(c.ksize)) {
            for (d, &w) in t.chunks_exact_mut(4).zip(k) {
                d.fill(w);
            }
        }
        // Only the source columns that some window touches are widened.
        let span = c.source_span();
        let mut rgbx = vec![0u8; (span.len() + 1) * 4];
        let (s0, s1) = (span.start - src.col0, span.end - src.col0);
        // SAFETY (all intrinsics here): the caller guarantees AVX2.
        unsafe {
            let half = _mm_set1_epi32(HALF);
            for (y, out_row) in rows.zip(out.chunks_exact_mut(out_w * 3)) {
                let row = &src.row(y)[s0 * 3..s1 * 3];
                for (d, s) in rgbx.chunks_exact_mut(4).zip(row.chunks_exact(3)) {
                    d[..3].copy_from_slice(s);
                }
                let windows = c.bounds.iter().zip(taps.chunks_exact(pairs * 8));
                for (o, (&(start, _), k)) in out_row.chunks_exact_mut(3).zip(windows) {
                    let px = &rgbx[(start - span.start) * 4..][..pairs * 8];
                    let mut acc = _mm256_setzero_si256();
                    for i in 0..pairs {
                        // In bounds: px holds pairs * 8 bytes, k pairs * 8 i32s.
                        let p = _mm_loadl_epi64(px.as_ptr().add(i * 8).cast());
                        let w = _mm256_loadu_si256(k.as_ptr().add(i * 8).cast());
                        let p = _mm256_cvtepu8_epi32(p);
                        acc = _mm256_add_epi32(acc, _mm256_mullo_epi32(p, w));
                    }
                    let lo = _mm256_castsi256_si128(acc);
                    let sum = _mm_add_epi32(lo, _mm256_extracti128_si256::<1>(acc));
                    // clip8 on 4 lanes: the shifted sums lie within +-640, so the
                    // saturating packs clamp exactly to 0..=255.
                    let v = _mm_srai_epi32::<{ PRECISION_BITS as i32 }>(_mm_add_epi32(sum, half));
                    let v = _mm_packus_epi16(_mm_packs_epi32(v, v), v);
                    let rgba = (_mm_cvtsi128_si32(v) as u32).to_le_bytes();
                    o.copy_from_slice(&rgba[..3]);
                }
            }
        }
    }
}

/// Copy of the `cols` x `rows` window, for a pass that Pillow skips.
fn copy(src: &View, cols: Range<usize>, rows: Range<usize>) -> Vec<u8> {
    let x0 = (cols.start - src.col0) * 3;
    let mut out = Vec::with_capacity(cols.len() * 3 * rows.len());
    for y in rows {
        out.extend_from_slice(&src.row(y)[x0..][..cols.len() * 3]);
    }
    out
}

/// The window `xr` x `yr` of Pillow's `resize((out_w, out_h), filter)` of `img`,
/// computing only the source rows and columns that the window needs.
fn resample_window(img: &RgbImage, out_w: u32, out_h: u32, filter: Filter, xr: Range<u32>, yr: Range<u32>) -> RgbImage {
    let (w, h) = img.dimensions();
    let (xr, yr) = (xr.start as usize..xr.end as usize, yr.start as usize..yr.end as usize);
    let (ww, wh) = (xr.len(), yr.len());
    // Pillow skips a pass whose size is unchanged (a pass at scale 1 would be the
    // identity anyway, but the copy is cheaper).
    let hc = (out_w != w).then(|| Coeffs::new(w, out_w, filter, xr.clone(), true));
    let vc = (out_h != h).then(|| Coeffs::new(h, out_h, filter, yr.clone(), false));
    // Pillow 13 runs the vertical pass first when the height shrinks by more than
    // twice as many pixels as the width (Pillow <= 12 always went horizontal first).
    // The order changes the u8 rounding in between, so it is mirrored here.
    let (dh, dw) = (i64::from(h) - i64::from(out_h), i64::from(w) - i64::from(out_w));
    let horizontal_first = !(dh > 0 && dh > dw * 2);

    let src = View { data: img.as_raw(), stride: w as usize, col0: 0, row0: 0 };
    let data = if horizontal_first {
        let rows = vc.as_ref().map_or(yr.clone(), Coeffs::source_span);
        let tmp = match &hc {
            Some(c) => horizontal(&src, rows.clone(), c),
            None => copy(&src, xr.clone(), rows.clone()),
        };
        let mid = View { data: &tmp, stride: ww, col0: xr.start, row0: rows.start };
        match &vc {
            Some(c) => vertical(&mid, xr, c),
            None => tmp,
        }
    } else {
        let cols = hc.as_ref().map_or(xr.clone(), Coeffs::source_span);
        let tmp = match &vc {
            Some(c) => vertical(&src, cols.clone(), c),
            None => copy(&src, cols.clone(), yr.clone()),
        };
        let mid = View { data: &tmp, stride: cols.len(), col0: cols.start, row0: yr.start };
        match &hc {
            Some(c) => horizontal(&mid, yr, c),
            None => tmp,
        }
    };
    RgbImage::from_raw(ww as u32, wh as u32, data).expect("buffer matches window size")
}

/// Pillow-compatible resize of an RGB image (filters: Box, Bicubic).
///
/// Matches `PIL.Image.resize((w, h), resample=filter)` (no `reducing_gap`) exactly
/// for 8-bit RGB.
pub fn resize(img: &RgbImage, w: u32, h: u32, filter: Filter) -> RgbImage {
    assert!(w > 0 && h > 0, "resize: target size must be positive, got {w}x{h}");
    resample_window(img, w, h, filter, 0..w, 0..h)
}

/// ADM center crop of an RGB image to `size x size`.
///
/// guided-diffusion's `center_crop_arr`: halve with BOX while the short side is at
/// least `2 * size`, BICUBIC-resize the short side to `size`, then cut the center.
/// Only the cropped window of the bicubic resize is computed; the result is the same
/// as resizing the whole image. Panics if `size` is 0 or the image is empty.
pub fn center_crop_adm(img: &RgbImage, size: u32) -> RgbImage {
    assert!(size > 0, "center_crop_adm: size must be positive");
    assert!(img.width() > 0 && img.height() > 0, "center_crop_adm: empty image");
    let mut halved: Option<RgbImage> = None;
    loop {
        let cur = halved.as_ref().unwrap_or(img);
        let (w, h) = cur.dimensions();
        if u64::from(w.min(h)) < 2 * u64::from(size) {
            break;
        }
        halved = Some(resize(cur, w / 2, h / 2, Filter::Box));
    }
    let cur = halved.as_ref().unwrap_or(img);
    let (w, h) = cur.dimensions();

    // Python: scale = size / min(w, h); round(x * scale), which rounds half to even.
    let scale = f64::from(size) / f64::from(w.min(h));
    let nw = (f64::from(w) * scale).round_ties_even() as u32;
    let nh = (f64::from(h) * scale).round_ties_even() as u32;
    // The short side lands on `size` exactly; the max() only guards the arithmetic.
    let (nw, nh) = (nw.max(size), nh.max(size));
    let x0 = (nw - size) / 2;
    let y0 = (nh - size) / 2;
    resample_window(cur, nw, nh, Filter::Bicubic, x0..x0 + size, y0..y0 + size)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic noisy RGB bytes (xorshift), with runs of 0 and 255 so that
    /// bicubic overshoot hits both clamps.
    fn noise(w: usize, h: usize) -> Vec<u8> {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        (0..w * h * 3)
            .map(|i| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                match (i / 97) % 5 {
                    0 => 0,
                    1 => 255,
                    _ => x as u8,
                }
            })
            .collect()
    }

    /// The SIMD passes (used wherever the CPU has AVX2, so by the golden tests) must
    /// agree bit for bit with the scalar ones that other CPUs run.
    #[test]
    fn simd_and_scalar_passes_agree() {
        let (w, h) = (203, 61);
        let data = noise(w, h);
        let src = View { data: &data, stride: w, col0: 0, row0: 0 };
        for filter in [Filter::Box, Filter::Bicubic] {
            for out in [1, 2, 7, 50, 101, 102, 150, 203, 300, 517] {
                let hc = Coeffs::new(w as u32, out, filter, 0..out as usize, true);
                let hv = Coeffs::new(w as u32, out, filter, 0..out as usize, false);
                let mut want = vec![0u8; out as usize * 3 * h];
                horizontal_any(&src, 0..h, &hv, &mut want);
                assert_eq!(horizontal(&src, 0..h, &hc), want, "{filter:?} {w} -> {out}");
                let mut fixed = vec![0u8; want.len()];
                if hc.fixed && hc.ksize <= 9 {
                    match hc.ksize {
                        3 => horizontal_fixed::<3>(&src, 0..h, &hc, &mut fixed),
                        5 => horizontal_fixed::<5>(&src, 0..h, &hc, &mut fixed),
                        7 => horizontal_fixed::<7>(&src, 0..h, &hc, &mut fixed),
                        _ => horizontal_fixed::<9>(&src, 0..h, &hc, &mut fixed),
                    }
                    assert_eq!(fixed, want, "fixed {filter:?} {w} -> {out}");
                }
                let vc = Coeffs::new(h as u32, out, filter, 0..out as usize, false);
                let v = vertical(&src, 0..w, &vc);
                assert_eq!(v, vertical_body(&src, 0..w, &vc), "{filter:?} {h} -> {out}");
            }
        }
    }
}
