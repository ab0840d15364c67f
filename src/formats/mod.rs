//! File formats that know no model: safetensors weights, the restricted `torch.save`
//! reader, NumPy npy/npz, TensorBoard event files.

pub mod npy;
pub mod tboard;
pub mod torchfile;
pub mod weights;
