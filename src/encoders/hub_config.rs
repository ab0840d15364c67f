//! The `config.json` of a published network (transformers, diffusers) read into a serde
//! struct: every error is one line naming the file and the field's path.

use crate::bail_input;
use crate::error::bad_input;
use anyhow::Result;
use serde::de::{DeserializeOwned, Error};
use serde::{Deserialize, Deserializer};
use serde_json::Value;

/// The JSON object of a config file. transformers and diffusers read a `null` field as
/// "take the default", so null fields are dropped (at every depth) before parsing.
pub fn object(text: &str, file: &str) -> Result<Value> {
    let mut root: Value = serde_json::from_str(text).map_err(|e| bad_input(format!("{file}: not valid JSON: {e}")))?;
    if !root.is_object() {
        bail_input!("{file}: expected a JSON object");
    }
    drop_nulls(&mut root);
    Ok(root)
}

fn drop_nulls(v: &mut Value) {
    if let Value::Object(m) = v {
        m.retain(|_, x| !x.is_null());
        m.values_mut().for_each(drop_nulls);
    }
}

/// Parses `text` (the contents of `file`) as a `T`; fields it does not name are ignored,
/// as the published configs carry many that do not shape the network.
pub fn parse<T: DeserializeOwned>(text: &str, file: &str) -> Result<T> {
    from_value(object(text, file)?, file)
}

/// A parsed config object as a `T`, errors naming `file` and the field.
pub fn from_value<T: DeserializeOwned>(v: Value, file: &str) -> Result<T> {
    serde_path_to_error::deserialize(v).map_err(|e| {
        let msg = e.inner().to_string();
        match e.path().to_string().as_str() {
            "." => bad_input(format!("{file}: {msg}")),
            field => bad_input(format!("{file}: field {field}: {msg}")),
        }
    })
}

/// A positive integer field.
pub fn positive<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<i64, D::Error> {
    match i64::deserialize(d)? {
        n if n > 0 => Ok(n),
        n => Err(D::Error::custom(format!("must be positive, found {n}"))),
    }
}

/// A finite positive number field.
pub fn positive_float<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<f64, D::Error> {
    match f64::deserialize(d)? {
        x if x.is_finite() && x > 0.0 => Ok(x),
        x => Err(D::Error::custom(format!("must be a positive number, found {x}"))),
    }
}

/// The nonlinearity named by `hidden_act`, in transformers' names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
pub enum Activation {
    /// `quick_gelu`: `x * sigmoid(1.702 x)`, what OpenAI's CLIP was trained with.
    #[serde(rename = "quick_gelu")]
    QuickGelu,
    /// `gelu`: exact, with erf (DINOv2's).
    #[serde(rename = "gelu")]
    Gelu,
    /// `gelu_new`, `gelu_pytorch_tanh`, `gelu_fast`: tanh approximation.
    #[serde(rename = "gelu_new", alias = "gelu_pytorch_tanh", alias = "gelu_fast")]
    GeluTanh,
    #[serde(rename = "relu")]
    Relu,
    /// `silu`, `swish`.
    #[serde(rename = "silu", alias = "swish")]
    Silu,
}

impl Activation {
    /// Its name in a config transformers writes.
    pub fn name(self) -> &'static str {
        match self {
            Activation::QuickGelu => "quick_gelu",
            Activation::Gelu => "gelu",
            Activation::GeluTanh => "gelu_pytorch_tanh",
            Activation::Relu => "relu",
            Activation::Silu => "silu",
        }
    }

    pub fn apply(self, x: &tch::Tensor) -> tch::Tensor {
        match self {
            Activation::QuickGelu => x * (x * 1.702).sigmoid(),
            Activation::Gelu => x.gelu("none"),
            Activation::GeluTanh => x.gelu("tanh"),
            Activation::Relu => x.relu(),
            Activation::Silu => x.silu(),
        }
    }
}
