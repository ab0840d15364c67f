//! Parameters as views of one flat fp32 buffer (and gradients as views of another),
//! so that clipping, AdamW, EMA and gradient reduction are a handful of large kernels.

use crate::bail_input;
use crate::formats::weights;
use crate::shim;
use anyhow::Result;
use std::collections::HashMap;
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// How a parameter starts (the reference SiT initialisation).
#[derive(Debug, Clone, Copy)]
pub enum Init {
    /// Xavier-uniform with the given fans (a conv counts as a Linear over its patch).
    XavierUniform {
        fan_in: i64,
        fan_out: i64,
    },
    Normal {
        std: f64,
    },
    Zeros,
    Ones,
}

/// One trainable tensor's place in the flat buffer.
#[derive(Debug, Clone)]
pub struct Entry {
    pub name: String,
    pub shape: Vec<i64>,
    pub offset: i64,
    pub numel: i64,
}

/// Collects the parameters a model declares; `finish` lays them out flat.
pub struct ParamBuilder {
    device: Device,
    specs: Vec<(String, Vec<i64>, Init, Tensor)>,
    buffers: Vec<(String, Tensor)>,
}

impl ParamBuilder {
    pub fn new(device: Device) -> Self {
        ParamBuilder { device, specs: Vec::new(), buffers: Vec::new() }
    }

    pub fn device(&self) -> Device {
        self.device
    }

    /// Declares a trainable parameter. The returned handle is an empty placeholder
    /// until `finish` points it at its slice of the flat buffer.
    pub fn param(&mut self, name: &str, shape: &[i64], init: Init) -> Tensor {
        let handle = Tensor::empty([0], (Kind::Float, self.device));
        self.specs.push((name.to_string(), shape.to_vec(), init, handle.shallow_clone()));
        handle
    }

    /// Declares a fixed (non-trained) tensor that is still saved under its name.
    pub fn buffer(&mut self, name: &str, value: Tensor) -> Tensor {
        let value = value.to_device(self.device);
        self.buffers.push((name.to_string(), value.shallow_clone()));
        value
    }

    /// Elements declared so far: (trainable, fixed buffers). Counts a model without
    /// allocating it.
    pub fn declared_numel(&self) -> (i64, i64) {
        let params = self.specs.iter().map(|(_, s, _, _)| s.iter().product::<i64>()).sum();
        let buffers = self.buffers.iter().map(|(_, t)| t.numel() as i64).sum();
        (params, buffers)
    }

    /// Allocates the flat weight and gradient buffers, points every parameter at its
    /// slice, and draws the initial values from a generator seeded with `seed`. The
    /// buffers are zero-padded to a multiple of `pad_to` (the world size, so each
    /// rank's shard has the same length); parameter offsets do not depend on it.
    pub fn finish(self, seed: u64, pad_to: i64) -> Result<Params> {
        let total: i64 = self.specs.iter().map(|(_, s, _, _)| s.iter().product::<i64>()).sum();
        let padded = (total + pad_to - 1) / pad_to * pad_to;
        let flat = Tensor::zeros([padded], (Kind::Float, self.device));
        let grad = Tensor::zeros([padded], (Kind::Float, self.device));
        let mut entries = Vec::with_capacity(self.specs.len());
        let mut handles = Vec::with_capacity(self.specs.len());
        let mut offset = 0;
        tch::manual_seed(seed as i64);
        for (name, shape, init, mut handle) in self.specs {
            let numel: i64 = shape.iter().product();
            let view = flat.narrow(0, offset, numel).view(shape.as_slice());
            {
                let _g = tch::no_grad_guard();
                let _ = match init {
                    Init::XavierUniform { fan_in, fan_out } => {
                        let bound = (6.0 / (fan_in + fan_out) as f64).sqrt();
                        view.shallow_clone().uniform_(-bound, bound)
                    }
                    Init::Normal { std } => view.shallow_clone().normal_(0.0, std),
                    Init::Zeros => view.shallow_clone().zero_(),
                    Init::Ones => view.shallow_clone().fill_(1.0),
                };
            }
            handle.set_data(&view);
            let _ = handle.set_requires_grad(true);
            shim::set_grad(&handle, &grad.narrow(0, offset, numel).view(shape.as_slice()))?;
            entries.push(Entry { name, shape, offset, numel });
            handles.push(handle);
            offset += numel;
        }
        Ok(Params { flat, grad, entries, handles, buffers: self.buffers, total })
    }
}

/// The trainable parameters of a model, flat, plus its fixed named buffers.
pub struct Params {
    /// All trainable weights, fp32, in declaration order.
    pub flat: Tensor,
    /// Their gradients; backward accumulates here in place.
    pub grad: Tensor,
    pub entries: Vec<Entry>,
    handles: Vec<Tensor>,
    buffers: Vec<(String, Tensor)>,
    /// Trainable elements (the flat buffers may be longer: padding).
    total: i64,
}

impl Params {
    /// Trainable element count.
    pub fn numel(&self) -> i64 {
        self.total
    }

    /// Length of the flat buffers, padding included.
    pub fn padded_len(&self) -> i64 {
        self.flat.size()[0]
    }

    /// Elements of the fixed buffers (the position table).
    pub fn buffer_numel(&self) -> i64 {
        self.buffers.iter().map(|(_, t)| t.numel() as i64).sum()
    }

    pub fn zero_grad(&self) {
        let _ = self.grad.shallow_clone().zero_();
    }

    /// The parameter tensors (leaves of autograd), in flat order.
    pub fn handles(&self) -> &[Tensor] {
        &self.handles
    }

    /// Every tensor under its checkpoint name, sliced out of `flat` (the live
    /// weights, or any other buffer with the same layout such as the EMA).
    pub fn named(&self, flat: &Tensor) -> Vec<(String, Tensor)> {
        let mut out: Vec<(String, Tensor)> =
            self.entries.iter().map(|e| (e.name.clone(), flat.narrow(0, e.offset, e.numel).view(e.shape.as_slice()))).collect();
        out.extend(self.buffers.iter().map(|(n, t)| (n.clone(), t.shallow_clone())));
        out
    }

    /// Copies named tensors into `flat` (same layout as the weights). Strict: every
    /// parameter must be present with its shape, and nothing else may be there;
    /// `source` names the origin in errors.
    pub fn load_into(&self, flat: &Tensor, tensors: &HashMap<String, Tensor>, source: &str) -> Result<()> {
        let known: std::collections::HashSet<&str> =
            self.entries.iter().map(|e| e.name.as_str()).chain(self.buffers.iter().map(|(n, _)| n.as_str())).collect();
        let mut unexpected: Vec<&String> = tensors.keys().filter(|k| !known.contains(k.as_str())).collect();
        unexpected.sort();
        if let Some(k) = unexpected.first() {
            bail_input!("{source}: tensor {k}: not a parameter of this model ({} unexpected)", unexpected.len());
        }
        let _g = tch::no_grad_guard();
        let named = self.named(flat);
        for (name, dst) in &named {
            let Some(src) = tensors.get(name) else {
                bail_input!("{source}: tensor {name}: missing");
            };
            if src.size() != dst.size() {
                bail_input!("{source}: tensor {name}: shape {:?}, the model expects {:?}", src.size(), dst.size());
            }
            if !src.is_floating_point() {
                bail_input!("{source}: tensor {name}: dtype {:?} is not floating point", src.kind());
            }
        }
        for (name, mut dst) in named {
            dst.copy_(&tensors[&name]);
        }
        Ok(())
    }

    /// Loads weights saved under the REG names into the live parameters.
    pub fn load_file(&self, path: &Path) -> Result<()> {
        let tensors = weights::read_map(path)?;
        self.load_into(&self.flat, &tensors, &path.display().to_string())
    }

    /// Saves `flat` (weights or EMA) under the REG names, as float32.
    pub fn save_file(&self, flat: &Tensor, path: &Path) -> Result<()> {
        weights::write(path, &self.named(flat), None)
    }
}
