//! What SiT is conditioned on: a class label, or a caption as the text encoder sees it.

use tch::{Device, Tensor};

/// A caption's encoding: every token's state and the pooled end-of-text state.
pub struct Caption {
    /// Text encoder's last hidden state. [N, L, Dt]
    pub hidden: Tensor,
    /// Its pooled end-of-text state. [N, Dt]
    pub pooled: Tensor,
}

/// The condition of N samples.
pub enum Cond {
    /// Class labels; the null label `num_classes` means none. [N] i64
    Class(Tensor),
    /// Caption encodings; the empty caption's encoding means none.
    Text(Caption),
}

impl Cond {
    /// Another handle on the same tensors.
    pub fn shallow_clone(&self) -> Cond {
        match self {
            Cond::Class(y) => Cond::Class(y.shallow_clone()),
            Cond::Text(c) => Cond::Text(Caption { hidden: c.hidden.shallow_clone(), pooled: c.pooled.shallow_clone() }),
        }
    }

    /// Rows.
    pub fn len(&self) -> i64 {
        match self {
            Cond::Class(y) => y.size()[0],
            Cond::Text(c) => c.pooled.size()[0],
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Rows of `self`, then rows of `other` (the doubled batch of guidance).
    pub fn cat(&self, other: &Cond) -> Cond {
        match (self, other) {
            (Cond::Class(a), Cond::Class(b)) => Cond::Class(Tensor::cat(&[a, b], 0)),
            (Cond::Text(a), Cond::Text(b)) => {
                Cond::Text(Caption { hidden: Tensor::cat(&[&a.hidden, &b.hidden], 0), pooled: Tensor::cat(&[&a.pooled, &b.pooled], 0) })
            }
            _ => panic!("a class condition and a text condition do not stack"),
        }
    }

    /// Rows `[lo, lo + n)` on `device`.
    pub fn rows(&self, lo: i64, n: i64, device: Device) -> Cond {
        let r = |x: &Tensor| x.narrow(0, lo, n).to_device(device);
        match self {
            Cond::Class(y) => Cond::Class(r(y)),
            Cond::Text(c) => Cond::Text(Caption { hidden: r(&c.hidden), pooled: r(&c.pooled) }),
        }
    }

    /// Where `drop` [N] bool is set, the row becomes `null` (one row, or N rows).
    pub fn drop_to(&self, drop: &Tensor, null: &Cond) -> Cond {
        let keep = drop.logical_not();
        match (self, null) {
            (Cond::Class(y), Cond::Class(n)) => Cond::Class(y.where_self(&keep, &n.to_device(y.device()))),
            (Cond::Text(c), Cond::Text(n)) => {
                let pick = |x: &Tensor, nx: &Tensor| {
                    let shape: Vec<i64> = (0..x.dim()).map(|i| if i == 0 { -1 } else { 1 }).collect();
                    x.where_self(&keep.view(shape.as_slice()), &nx.to_device(x.device()).to_kind(x.kind()))
                };
                Cond::Text(Caption { hidden: pick(&c.hidden, &n.hidden), pooled: pick(&c.pooled, &n.pooled) })
            }
            _ => panic!("a class condition and a text condition do not mix"),
        }
    }

    /// The null condition for as many rows as `self`, given one null row (`null_text`,
    /// for captions; classes use the label `num_classes`).
    pub fn null_like(&self, num_classes: i64, null_text: Option<&Caption>) -> Cond {
        match self {
            Cond::Class(y) => Cond::Class(y.full_like(num_classes)),
            Cond::Text(c) => {
                let n = null_text.expect("a text condition needs the empty caption's encoding");
                let rows = c.pooled.size()[0];
                let grow = |x: &Tensor, like: &Tensor| {
                    let mut shape = x.size();
                    shape[0] = rows;
                    x.to_device(like.device()).to_kind(like.kind()).expand(shape.as_slice(), false).contiguous()
                };
                Cond::Text(Caption { hidden: grow(&n.hidden, &c.hidden), pooled: grow(&n.pooled, &c.pooled) })
            }
        }
    }
}
