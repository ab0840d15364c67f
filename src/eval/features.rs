//! Inception features of an image set, split over ranks: rank r takes a contiguous block
//! of the images, and one all-gather puts every rank's features back in image order.

use crate::bail_input;
use crate::dist::{all_ok, Comm};
use crate::encoders::inception::{Inception, InceptionOutput};
use crate::error::bad_input;
use crate::formats::images;
use crate::formats::npy::NpzArray;
use anyhow::Result;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

/// Widths of the three outputs, packed side by side for the gather.
const POOL: i64 = 2048;
const SPATIAL: i64 = 2023;
const PROBS: i64 = 1008;

/// Rank `rank`'s block `[lo, hi)` of `n` items; blocks differ in size by at most one.
pub fn block(n: i64, rank: i64, world: i64) -> (i64, i64) {
    (n * rank / world, n * (rank + 1) / world)
}

/// Inception outputs of this rank's images, batch by batch (f32, on the CPU).
#[derive(Default)]
struct Collector {
    parts: Vec<Tensor>,
}

impl Collector {
    /// Runs one batch of [B, H, W, 3] u8 images through the network in f32.
    fn add(&mut self, net: &Inception, images: &Tensor) {
        let o = net.features(images, Kind::Float);
        self.parts.push(Tensor::cat(&[o.pool, o.spatial, o.probs], 1).to_device(Device::Cpu));
    }

    /// All `n` images' outputs in image order on every rank, each rank having collected
    /// its `block` of them.
    fn gather(self, n: i64, comm: &dyn Comm) -> Result<InceptionOutput> {
        let (rank, world) = (comm.rank(), comm.world());
        let width = POOL + SPATIAL + PROBS;
        let local = if self.parts.is_empty() { Tensor::zeros([0, width], (Kind::Float, Device::Cpu)) } else { Tensor::cat(&self.parts, 0) };
        let (lo, hi) = block(n, rank, world);
        anyhow::ensure!(local.size()[0] == hi - lo, "rank {rank} collected {} images, its block has {}", local.size()[0], hi - lo);
        let all = if world == 1 {
            local
        } else {
            // Equal-sized pieces for the collective: every block padded to the largest.
            let per = (n + world - 1) / world;
            let padded = Tensor::zeros([per, width], (Kind::Float, comm.device()));
            padded.narrow(0, 0, hi - lo).copy_(&local);
            let out = Tensor::zeros([world * per, width], (Kind::Float, comm.device()));
            comm.all_gather(&padded, &out)?;
            let blocks: Vec<Tensor> = (0..world)
                .map(|r| {
                    let (lo, hi) = block(n, r, world);
                    out.narrow(0, r * per, hi - lo)
                })
                .collect();
            Tensor::cat(&blocks, 0).to_device(Device::Cpu)
        };
        Ok(InceptionOutput {
            pool: all.narrow(1, 0, POOL).contiguous(),
            spatial: all.narrow(1, POOL, SPATIAL).contiguous(),
            probs: all.narrow(1, POOL + SPATIAL, PROBS).contiguous(),
        })
    }
}

/// Images to score: `arr_0` of an ADM `.npz`, or a folder of PNGs (sorted by name).
pub enum ImageSet {
    Npz(NpzArray),
    Pngs(Vec<PathBuf>),
}

/// An image array must be [N, H, W, 3] u8 with N, H, W > 0 (images of no pixels would
/// pass the size check of any file, and fail only inside the network).
pub fn check_images(kind: Kind, shape: &[i64], what: &str) -> Result<()> {
    if kind != Kind::Uint8 || shape.len() != 4 || shape[3] != 3 || shape[..3].contains(&0) {
        bail_input!("{what}: arr_0: expected non-empty [N, H, W, 3] uint8 images, got {kind:?} {shape:?}");
    }
    Ok(())
}

impl ImageSet {
    /// A PNG folder or an `.npz`, whose `arr_0` must hold the images.
    pub fn open(path: &Path) -> Result<ImageSet> {
        let file = path.display().to_string();
        if path.is_dir() {
            let entries = std::fs::read_dir(path).map_err(|e| bad_input(format!("{file}: {e}")))?;
            let mut pngs: Vec<PathBuf> =
                entries.flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|x| x == "png")).collect();
            pngs.sort();
            if pngs.is_empty() {
                bail_input!("{file}: no PNG images");
            }
            return Ok(ImageSet::Pngs(pngs));
        }
        match NpzArray::open(path, "arr_0")? {
            Some(a) => {
                check_images(a.kind, &a.shape, &file)?;
                Ok(ImageSet::Npz(a))
            }
            None => bail_input!("{file}: arr_0: missing (an ADM sample batch holds its images there)"),
        }
    }

    pub fn len(&self) -> i64 {
        match self {
            ImageSet::Npz(a) => a.shape[0],
            ImageSet::Pngs(p) => p.len() as i64,
        }
    }

    /// (height, width) of the images (of the first one in a PNG folder).
    pub fn size(&self) -> Result<(i64, i64)> {
        match self {
            ImageSet::Npz(a) => Ok((a.shape[1], a.shape[2])),
            ImageSet::Pngs(p) => {
                let (w, h) = image::image_dimensions(&p[0]).map_err(|e| bad_input(format!("{}: {e}", p[0].display())))?;
                Ok((h as i64, w as i64))
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Image `i` alone, at its own size (CLIP preprocesses each image on its own).
    pub fn image(&self, i: i64) -> Result<image::RgbImage> {
        match self {
            ImageSet::Npz(a) => {
                let t = a.rows(i, 1).get(0).contiguous();
                let (h, w) = (t.size()[0] as u32, t.size()[1] as u32);
                let data = Vec::<u8>::try_from(t.flatten(0, -1))?;
                Ok(image::RgbImage::from_raw(w, h, data).expect("[H, W, 3] u8 holds H * W * 3 bytes"))
            }
            ImageSet::Pngs(p) => {
                let p = &p[i as usize];
                Ok(images::open(p).map_err(|e| bad_input(format!("{}: {}", p.display(), images::why(&e))))?.to_rgb8())
            }
        }
    }

    /// Images `[lo, lo + n)` as [n, H, W, 3] u8. PNGs must all have the first one's size.
    pub fn rows(&self, lo: i64, n: i64) -> Result<Tensor> {
        let pngs = match self {
            ImageSet::Npz(a) => return Ok(a.rows(lo, n)),
            ImageSet::Pngs(p) => p,
        };
        let read = |p: &Path| -> Result<Tensor> {
            let img = images::open(p).map_err(|e| bad_input(format!("{}: {}", p.display(), images::why(&e))))?.to_rgb8();
            Ok(Tensor::from_slice(img.as_raw()).view([img.height() as i64, img.width() as i64, 3]))
        };
        let size = image::image_dimensions(&pngs[0]).map_err(|e| bad_input(format!("{}: {e}", pngs[0].display())))?;
        let imgs: Vec<Tensor> = pngs[lo as usize..(lo + n) as usize].iter().map(|p| read(p)).collect::<Result<_>>()?;
        for (p, t) in pngs[lo as usize..].iter().zip(&imgs) {
            if t.size() != [size.1 as i64, size.0 as i64, 3] {
                bail_input!("{}: size {:?} differs from the first image's {}x{}", p.display(), t.size(), size.1, size.0);
            }
        }
        Ok(Tensor::stack(&imgs, 0))
    }
}

/// Inception outputs of `n` images in `batch`-sized pieces, each rank computing its block;
/// every rank gets all of them. `images(lo, count)` reads or makes images
/// `[lo, lo + count)` as [count, H, W, 3] u8. A failure on one rank ends every rank:
/// none is left waiting in the gather.
pub fn features_by_rank(
    n: i64,
    batch: i64,
    net: &Inception,
    comm: &dyn Comm,
    mut images: impl FnMut(i64, i64) -> Result<Tensor>,
) -> Result<InceptionOutput> {
    let (lo, hi) = block(n, comm.rank(), comm.world());
    let mut c = Collector::default();
    let local = (lo..hi).step_by(batch as usize).try_for_each(|at| -> Result<()> {
        c.add(net, &images(at, batch.min(hi - at))?);
        Ok(())
    });
    all_ok(local, comm)?;
    c.gather(n, comm)
}

/// Inception outputs of every image of the set (see `features_by_rank`).
pub fn features_of(set: &ImageSet, net: &Inception, batch: i64, comm: &dyn Comm) -> Result<InceptionOutput> {
    features_by_rank(set.len(), batch, net, comm, |at, count| set.rows(at, count))
}

#[cfg(test)]
mod tests {
    use super::block;

    #[test]
    fn blocks_cover_every_item_once() {
        for n in [0, 1, 7, 250, 5001] {
            for world in 1..=9 {
                let mut next = 0;
                for r in 0..world {
                    let (lo, hi) = block(n, r, world);
                    assert_eq!(lo, next);
                    assert!(hi - lo <= (n + world - 1) / world);
                    next = hi;
                }
                assert_eq!(next, n);
            }
        }
    }
}
