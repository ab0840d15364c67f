//! The Loader that hands out the tensors of a published weights file by name, and the
//! layers built from it.

use crate::bail_input;
use crate::formats::weights;
use crate::layers::{Conv2d, GroupNorm, LayerNorm, Linear};
use anyhow::Result;
use std::collections::HashMap;
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// Hands out the tensors of one weights file by name, checking shape and dtype, so a
/// wrong file fails at load with the tensor named rather than mid-forward.
pub struct Loader {
    tensors: HashMap<String, Tensor>,
    file: String,
    device: Device,
}

impl Loader {
    /// Reads all of `path` onto the CPU; each tensor moves to `device` when taken.
    pub fn open(path: &Path, device: Device) -> Result<Loader> {
        Self::open_renamed(path, device, str::to_string)
    }

    /// Hands out `tensors` (already in memory) as if read from `file`. A tensor already f32
    /// on `device` is handed out as is, not copied: variables that require grad stay the
    /// leaves of the graph.
    pub fn from_tensors(tensors: HashMap<String, Tensor>, file: &str, device: Device) -> Loader {
        Loader { tensors, file: file.to_string(), device }
    }

    /// As `open`, with every stored name passed through `rename` (an older naming of the
    /// same network). A file holding one tensor under two names that map to the same new
    /// name is an input error: which copy to use would be a guess.
    pub fn open_renamed(path: &Path, device: Device, rename: impl Fn(&str) -> String) -> Result<Loader> {
        let file = path.display().to_string();
        let mut tensors = HashMap::new();
        for (name, t) in weights::read(path)? {
            let new = rename(&name);
            if tensors.insert(new.clone(), t).is_some() {
                bail_input!("{file}: tensor {new} is stored twice (under its old and its new name)");
            }
        }
        Ok(Loader { tensors, file, device })
    }

    /// Takes the tensor `name`, which must have exactly `shape`, as f32 on the device (weights
    /// are kept in f32 and cast per forward, so one load serves f32 and bf16).
    pub fn get(&mut self, name: &str, shape: &[i64]) -> Result<Tensor> {
        let Some(t) = self.tensors.remove(name) else {
            bail_input!("{}: tensor {name}: missing", self.file);
        };
        if t.size() != shape {
            bail_input!("{}: tensor {name}: expected shape {shape:?}, found {:?}", self.file, t.size());
        }
        if !matches!(t.kind(), Kind::Float | Kind::Half | Kind::BFloat16 | Kind::Double) {
            bail_input!("{}: tensor {name}: expected a floating-point dtype, found {:?}", self.file, t.kind());
        }
        Ok(t.to_kind(Kind::Float).to_device(self.device))
    }

    /// As `get`, but a tensor stored with shape `alt` (the same numbers in an older layout)
    /// is accepted too and reshaped to `shape`.
    pub fn get_or_reshape(&mut self, name: &str, shape: &[i64], alt: &[i64]) -> Result<Tensor> {
        if let Some(t) = self.tensors.get_mut(name).filter(|t| t.size() == alt) {
            *t = t.reshape(shape);
        }
        self.get(name, shape)
    }

    /// Whether the file holds `name` (not yet taken): for networks whose published files
    /// differ in naming, to choose the naming before taking anything.
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// Drops the tensors whose names `unused` accepts (buffers the forward pass recomputes,
    /// or parts of the file not loaded), so that `finish` judges only the rest.
    pub fn discard(&mut self, unused: impl Fn(&str) -> bool) {
        self.tensors.retain(|name, _| !unused(name));
    }

    /// Every tensor must have been taken: a leftover means the file holds another network
    /// than `what` (say one with more layers), which would otherwise run with silently
    /// missing layers.
    pub fn finish(self, what: &str) -> Result<()> {
        let mut left: Vec<&String> = self.tensors.keys().collect();
        left.sort();
        if let Some(name) = left.first() {
            bail_input!("{}: tensor {name} is not part of {what} ({} such tensors)", self.file, left.len());
        }
        Ok(())
    }
}

/// `nn.Linear`. weight: [out, in], bias: [out]
/// Layers read from a file: each takes its tensors from the loader by name.
impl Linear {
    /// `{name}.weight` (and `{name}.bias` when `bias`).
    pub fn load(ld: &mut Loader, name: &str, d_in: i64, d_out: i64, bias: bool) -> Result<Self> {
        Ok(Linear {
            weight: ld.get(&format!("{name}.weight"), &[d_out, d_in])?,
            bias: if bias { Some(ld.get(&format!("{name}.bias"), &[d_out])?) } else { None },
        })
    }
}

impl LayerNorm {
    pub fn load(ld: &mut Loader, name: &str, dim: i64, eps: f64) -> Result<Self> {
        Ok(LayerNorm { weight: ld.get(&format!("{name}.weight"), &[dim])?, bias: ld.get(&format!("{name}.bias"), &[dim])?, eps })
    }
}

impl GroupNorm {
    pub fn load(ld: &mut Loader, name: &str, channels: i64, groups: i64, eps: f64) -> Result<Self> {
        Ok(GroupNorm {
            weight: ld.get(&format!("{name}.weight"), &[channels])?,
            bias: ld.get(&format!("{name}.bias"), &[channels])?,
            groups,
            eps,
        })
    }
}

impl Conv2d {
    /// `{name}.weight` (and `{name}.bias` when `bias`), stride 1 and no padding (`stride`
    /// and `padding` set others).
    pub fn load(ld: &mut Loader, name: &str, c_in: i64, c_out: i64, kernel: [i64; 2], bias: bool) -> Result<Self> {
        let weight = ld.get(&format!("{name}.weight"), &[c_out, c_in, kernel[0], kernel[1]])?;
        let bias = if bias { Some(ld.get(&format!("{name}.bias"), &[c_out])?) } else { None };
        Ok(Conv2d::new(weight, bias))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(tensors: &[(&str, Tensor)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let owned: Vec<(String, Tensor)> = tensors.iter().map(|(n, t)| (n.to_string(), t.shallow_clone())).collect();
        weights::write(&dir.path().join("w.safetensors"), &owned, None).unwrap();
        dir
    }

    #[test]
    fn old_layout_is_reshaped_and_leftovers_are_refused() {
        let w = Tensor::arange(4, (Kind::Float, Device::Cpu));
        let dir = file(&[("a.weight", w.reshape([2, 2, 1, 1])), ("b", w.shallow_clone())]);
        let mut ld = Loader::open(&dir.path().join("w.safetensors"), Device::Cpu).unwrap();
        let got = ld.get_or_reshape("a.weight", &[2, 2], &[2, 2, 1, 1]).unwrap();
        assert!(got.equal(&w.reshape([2, 2])));
        let msg = ld.finish("the test net").unwrap_err().to_string();
        assert!(msg.contains("tensor b is not part of the test net (1 such tensors)"), "{msg}");
    }

    #[test]
    fn two_names_for_one_tensor_are_refused() {
        let w = Tensor::zeros([2], (Kind::Float, Device::Cpu));
        let dir = file(&[("old.x", w.shallow_clone()), ("new.x", w)]);
        let msg =
            Loader::open_renamed(&dir.path().join("w.safetensors"), Device::Cpu, |n| n.replace("old.", "new.")).err().unwrap().to_string();
        assert!(msg.contains("tensor new.x is stored twice"), "{msg}");
    }
}
