//! File formats that know no model: safetensors weights, the restricted `torch.save`
//! reader, NumPy npy/npz, zip archives (one reader), TensorBoard event files, images under limits,
//! image decoding and resampling exactly as Pillow does them.

pub mod images;
pub mod npy;
pub mod pillow_decode;
pub mod pillow_resample;
pub mod stored_zip;
pub mod tboard;
pub mod torchfile;
pub mod weights;
pub mod zip_reader;
