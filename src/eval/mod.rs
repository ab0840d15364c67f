//! Sample-quality metrics over Inception features, as the ADM evaluator defines them:
//! FID and sFID (Frechet distance of Gaussian statistics), Inception Score, and
//! precision/recall of k-nearest-neighbour manifolds (k = 3); CLIP score.

pub mod clip_score;
pub mod features;
pub mod reference;

pub use clip_score::clip_score;

use tch::{Kind, Tensor};

/// Mean and covariance of a feature set (float64).
pub struct Stats {
    /// [D]
    pub mu: Tensor,
    /// [D, D], unbiased (`np.cov(x, rowvar=False)`).
    pub sigma: Tensor,
}

impl Stats {
    /// features: [N, D]
    pub fn of(features: &Tensor) -> Stats {
        let x = features.to_kind(Kind::Double);
        let n = x.size()[0];
        let mu = x.mean_dim(0, false, Kind::Double);
        let c = &x - mu.unsqueeze(0);
        let sigma = c.transpose(0, 1).matmul(&c) / (n - 1).max(1) as f64;
        Stats { mu, sigma }
    }
}

/// Square root of a symmetric positive semi-definite matrix (eigenvalues below zero,
/// rounding noise, are clamped).
pub fn sqrtm_psd(m: &Tensor) -> Tensor {
    let (w, v) = m.to_kind(Kind::Double).linalg_eigh("L");
    let s = w.clamp_min(0.0).sqrt();
    (&v * s.unsqueeze(0)).matmul(&v.transpose(0, 1))
}

/// `tr(sqrtm(s1 s2))`. The product of two PSD matrices has the eigenvalues of the
/// symmetric `sqrt(s1) s2 sqrt(s1)`, so two symmetric eigendecompositions give the
/// trace exactly (scipy's general `sqrtm` of the product reaches the same value).
pub fn trace_sqrt_product(s1: &Tensor, s2: &Tensor) -> f64 {
    let r = sqrtm_psd(s1);
    let m = r.matmul(&s2.to_kind(Kind::Double)).matmul(&r);
    let m = (&m + m.transpose(0, 1)) * 0.5;
    let w = m.linalg_eigvalsh("L");
    // Eigenvalues at rounding level are zeros of a rank-deficient covariance (fewer
    // samples than dimensions); their square roots would add up to a visible error.
    let tol = w.max().double_value(&[]).max(0.0) * w.size()[0] as f64 * f64::EPSILON;
    let w = w.where_self(&w.gt(tol), &w.zeros_like());
    w.sqrt().sum(Kind::Double).double_value(&[])
}

/// `|mu1 - mu2|^2 + tr(s1 + s2 - 2 sqrtm(s1 s2))`.
pub fn frechet_distance(a: &Stats, b: &Stats) -> f64 {
    let d = (&a.mu - &b.mu).square().sum(Kind::Double).double_value(&[]);
    let tr = a.sigma.trace().double_value(&[]) + b.sigma.trace().double_value(&[]);
    d + tr - 2.0 * trace_sqrt_product(&a.sigma, &b.sigma)
}

/// Inception Score over `splits` equal parts of the softmax outputs [N, C]:
/// `exp(mean_i KL(p_i || p_split))` per part; (mean, std) over parts.
pub fn inception_score(probs: &Tensor, splits: i64) -> (f64, f64) {
    let p = probs.to_kind(Kind::Double);
    let n = p.size()[0];
    let size = (n / splits.max(1)).max(1);
    let scores: Vec<f64> = (0..splits)
        .filter(|i| i * size < n)
        .map(|i| {
            let part = p.narrow(0, i * size, size.min(n - i * size));
            let py = part.mean_dim(0, true, Kind::Double);
            let kl = (&part * (part.log() - py.log())).sum_dim_intlist(1, false, Kind::Double).mean(Kind::Double);
            kl.exp().double_value(&[])
        })
        .collect();
    let m = scores.iter().sum::<f64>() / scores.len() as f64;
    let var = scores.iter().map(|s| (s - m).powi(2)).sum::<f64>() / scores.len() as f64;
    (m, var.sqrt())
}

/// Squared Euclidean distances between rows. a: [N, D], b: [M, D] -> [N, M]
fn sq_dist(a: &Tensor, b: &Tensor) -> Tensor {
    let na = a.square().sum_dim_intlist(1, true, Kind::Float);
    let nb = b.square().sum_dim_intlist(1, true, Kind::Float);
    (na - a.matmul(&b.transpose(0, 1)) * 2.0 + nb.transpose(0, 1)).clamp_min(0.0)
}

/// Rows compared at a time (bounds the distance matrix in memory).
const ROWS: i64 = 4096;

/// Squared distance from each feature to its `k`-th nearest neighbour in the same set
/// (the point itself counts as the 0-th). [N]
pub fn manifold_radii(features: &Tensor, k: i64) -> Tensor {
    let x = features.to_kind(Kind::Float);
    let n = x.size()[0];
    let parts: Vec<Tensor> = (0..n)
        .step_by(ROWS as usize)
        .map(|lo| {
            let d = sq_dist(&x.narrow(0, lo, ROWS.min(n - lo)), &x);
            let (v, _) = d.topk(k + 1, 1, false, true);
            v.select(1, k)
        })
        .collect();
    Tensor::cat(&parts, 0)
}

/// Fraction of `query` rows inside at least one ball (`center_j`, `radius_j`).
fn coverage(query: &Tensor, centers: &Tensor, radii: &Tensor) -> f64 {
    let n = query.size()[0];
    let mut inside = 0i64;
    for lo in (0..n).step_by(ROWS as usize) {
        let d = sq_dist(&query.narrow(0, lo, ROWS.min(n - lo)), centers);
        inside += d.le_tensor(&radii.unsqueeze(0)).any_dim(1, false).sum(Kind::Int64).int64_value(&[]);
    }
    inside as f64 / n.max(1) as f64
}

/// ADM precision (samples inside the reference manifold) and recall (references
/// inside the sample manifold), manifolds from `k`-NN radii.
pub fn precision_recall(reference: &Tensor, samples: &Tensor, k: i64) -> (f64, f64) {
    let (r, s) = (reference.to_kind(Kind::Float), samples.to_kind(Kind::Float));
    let (rr, rs) = (manifold_radii(&r, k), manifold_radii(&s, k));
    (coverage(&s, &r, &rr), coverage(&r, &s, &rs))
}
