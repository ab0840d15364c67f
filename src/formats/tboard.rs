//! TensorBoard event files: TFRecord framing (masked CRC32C) around `Event` protobufs.

use anyhow::{Context, Result};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

/// The subset of tensorflow's `Event` we write.
#[derive(Clone, PartialEq, prost::Message)]
struct Event {
    #[prost(double, tag = "1")]
    wall_time: f64,
    #[prost(int64, tag = "2")]
    step: i64,
    #[prost(string, optional, tag = "3")]
    file_version: Option<String>,
    #[prost(message, optional, tag = "5")]
    summary: Option<Summary>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct Summary {
    #[prost(message, repeated, tag = "1")]
    value: Vec<SummaryValue>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct SummaryValue {
    #[prost(string, tag = "1")]
    tag: String,
    #[prost(float, optional, tag = "2")]
    simple_value: Option<f32>,
    #[prost(message, optional, tag = "4")]
    image: Option<Image>,
}

/// `Summary.Image`: an encoded PNG.
#[derive(Clone, PartialEq, prost::Message)]
struct Image {
    #[prost(int32, tag = "1")]
    height: i32,
    #[prost(int32, tag = "2")]
    width: i32,
    #[prost(int32, tag = "3")]
    colorspace: i32,
    #[prost(bytes = "vec", tag = "4")]
    encoded_image_string: Vec<u8>,
}

fn masked_crc(data: &[u8]) -> u32 {
    let c = crc32c::crc32c(data);
    c.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// Appends events to `events.out.tfevents.<time>.<host>` in a log folder.
pub struct EventWriter {
    out: BufWriter<File>,
    path: PathBuf,
}

fn now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

impl EventWriter {
    pub fn create(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create log folder", dir.display()))?;
        let host = std::fs::read_to_string("/etc/hostname").unwrap_or_else(|_| "localhost".into());
        let name = format!("events.out.tfevents.{}.{}", now() as u64, host.trim());
        let path = dir.join(name);
        let f = File::create(&path).with_context(|| format!("{}: cannot create", path.display()))?;
        let mut w = EventWriter { out: BufWriter::new(f), path };
        w.write(&Event { wall_time: now(), step: 0, file_version: Some("brain.Event:2".into()), summary: None })?;
        Ok(w)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn write(&mut self, e: &Event) -> Result<()> {
        let data = prost::Message::encode_to_vec(e);
        let len = (data.len() as u64).to_le_bytes();
        self.out.write_all(&len)?;
        self.out.write_all(&masked_crc(&len).to_le_bytes())?;
        self.out.write_all(&data)?;
        self.out.write_all(&masked_crc(&data).to_le_bytes())?;
        Ok(())
    }

    /// Several scalars of one step in one event.
    pub fn scalars(&mut self, step: i64, values: &[(&str, f64)]) -> Result<()> {
        let value =
            values.iter().map(|(tag, v)| SummaryValue { tag: tag.to_string(), simple_value: Some(*v as f32), image: None }).collect();
        self.write(&Event { wall_time: now(), step, file_version: None, summary: Some(Summary { value }) })
    }

    /// An image given as PNG bytes.
    pub fn image_png(&mut self, step: i64, tag: &str, png: Vec<u8>, height: i32, width: i32, channels: i32) -> Result<()> {
        let image = Image { height, width, colorspace: channels, encoded_image_string: png };
        let value = vec![SummaryValue { tag: tag.into(), simple_value: None, image: Some(image) }];
        self.write(&Event { wall_time: now(), step, file_version: None, summary: Some(Summary { value }) })
    }

    pub fn flush(&mut self) -> Result<()> {
        self.out.flush()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn masked_crc_matches_tensorflow() {
        // tf's masked_crc32c of b"" is 0xa282ead8; of the 8 zero bytes of an empty length field:
        assert_eq!(super::masked_crc(b""), 0xa282_ead8);
    }
}
