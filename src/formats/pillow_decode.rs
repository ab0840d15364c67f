//! Image bytes -> RGB pixels exactly as REG's preprocessing sees them, i.e. as Pillow's
//! `Image.open(f).convert('RGB')` returns them: JPEG through libjpeg-turbo (Pillow's own
//! decoder) with Pillow's settings and CMYK conversion, other formats through `image`.

use anyhow::{bail, Result};
use image::RgbImage;
use std::ffi::CStr;
use turbojpeg_sys as tj;

/// Decodes an image file's bytes to RGB. The format comes from the content, not the
/// file name, as with Pillow (ImageNet has a PNG named `.JPEG`). No EXIF rotation:
/// REG does not call `exif_transpose`. Other formats decode under the limits of
/// `formats::images` (Pillow's own pixel limit applies to JPEGs).
pub fn decode_rgb(bytes: &[u8]) -> Result<RgbImage> {
    // Pillow's JPEG plugin accepts exactly this prefix (SOI and the next marker's 0xFF).
    if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
        return decode_jpeg(bytes);
    }
    let img = crate::formats::images::from_memory(bytes).map_err(|e| anyhow::anyhow!(crate::formats::images::why(&e)))?;
    Ok(img.to_rgb8())
}

/// Pillow's decompression-bomb limit: `Image.open` raises above twice
/// `Image.MAX_IMAGE_PIXELS` (89,478,485). Checked from the header, before allocating.
pub const MAX_PIXELS: u64 = 2 * 89_478_485;

/// libjpeg's text for JWRN_JPEG_EOF: the data ended before the EOI marker.
const PREMATURE_END: &str = "Premature end of JPEG file";

/// JPEG through libjpeg-turbo's default decompression (ISLOW integer IDCT, fancy
/// upsampling), as Pillow's decoder leaves them. Pillow ignores libjpeg's warnings
/// (corrupt data is decoded as libjpeg recovers it) but refuses a file that ends before
/// its EOI marker ("image file is truncated"); so do we.
pub fn decode_jpeg(bytes: &[u8]) -> Result<RgbImage> {
    let mut d = Decompressor::new()?;
    // First pass stops at the first warning, so that its message is the one reported
    // (libjpeg prints only the first warning, and TurboJPEG calls a failure after a
    // warning a warning too).
    d.set(tj::TJPARAM_TJPARAM_STOPONWARNING, 1)?;
    let first = match d.decode(bytes, None) {
        Ok(img) => return Ok(img),
        Err(Failure::Fatal(why)) => bail!("JPEG: {why}"),
        Err(Failure::Warning(w)) if w == PREMATURE_END => bail!("JPEG: truncated ({w})"),
        Err(Failure::Warning(w)) => w,
    };
    // Second pass runs through the warnings. Only the first warning's text reaches the
    // error string; a fatal error later overwrites it, so an unchanged text means the
    // whole image was decoded. (A truncation after an earlier warning is therefore not
    // seen: decoded with libjpeg's grey fill, where Pillow refuses the file.)
    // A fresh handle: one stopped inside the header keeps libjpeg mid-header (TurboJPEG
    // does not reset it there), and reading again would meet "two SOI markers".
    let mut d = Decompressor::new()?;
    d.set(tj::TJPARAM_TJPARAM_STOPONWARNING, 0)?;
    d.decode(bytes, Some(&first)).map_err(|(Failure::Warning(w) | Failure::Fatal(w))| anyhow::anyhow!("JPEG: {w}"))
}

enum Failure {
    /// A libjpeg warning (and, with stop-on-warning off, possibly a later error).
    Warning(String),
    Fatal(String),
}

/// One TurboJPEG decompression handle.
struct Decompressor {
    handle: tj::tjhandle,
}

impl Decompressor {
    fn new() -> Result<Self> {
        // SAFETY: tj3Init has no preconditions; a null handle is checked.
        let handle = unsafe { tj::tj3Init(tj::TJINIT_TJINIT_DECOMPRESS as i32) };
        if handle.is_null() {
            bail!("JPEG: cannot create a libjpeg-turbo decompressor");
        }
        Ok(Self { handle })
    }

    fn set(&mut self, param: tj::TJPARAM, value: i32) -> Result<()> {
        // SAFETY: valid handle (owned, not yet destroyed).
        if unsafe { tj::tj3Set(self.handle, param as i32, value) } != 0 {
            bail!("JPEG: {}", self.error_text());
        }
        Ok(())
    }

    fn get(&self, param: tj::TJPARAM) -> i32 {
        // SAFETY: valid handle.
        unsafe { tj::tj3Get(self.handle, param as i32) }
    }

    fn error_text(&self) -> String {
        // SAFETY: valid handle; TurboJPEG returns a NUL-terminated string it owns, copied
        // here before any other call on this thread can change it.
        unsafe { CStr::from_ptr(tj::tj3GetErrorStr(self.handle)) }.to_string_lossy().trim_end().to_string()
    }

    fn failure(&self) -> Failure {
        // SAFETY: valid handle.
        let warning = unsafe { tj::tj3GetErrorCode(self.handle) } == tj::TJERR_TJERR_WARNING as i32;
        let text = self.error_text();
        if warning {
            Failure::Warning(text)
        } else {
            Failure::Fatal(text)
        }
    }

    /// The outcome of the last call, with `tolerated` (a warning's text, when the call
    /// did not stop at warnings) counted as success.
    fn check(&self, rc: i32, tolerated: Option<&str>) -> std::result::Result<(), Failure> {
        match rc {
            0 => Ok(()),
            _ => match self.failure() {
                Failure::Warning(w) if Some(w.as_str()) == tolerated => Ok(()),
                f => Err(f),
            },
        }
    }

    /// Header, then pixels; the warning `tolerated` may come up in either (libjpeg
    /// reads the header again for the pixels and repeats it).
    fn decode(&mut self, bytes: &[u8], tolerated: Option<&str>) -> std::result::Result<RgbImage, Failure> {
        // SAFETY: valid handle; the pointer and length describe `bytes`, which outlives
        // the call (TurboJPEG keeps no reference after returning).
        let rc = unsafe { tj::tj3DecompressHeader(self.handle, bytes.as_ptr(), bytes.len() as tj::size_t) };
        self.check(rc, tolerated)?;
        let (w, h) = (self.get(tj::TJPARAM_TJPARAM_JPEGWIDTH), self.get(tj::TJPARAM_TJPARAM_JPEGHEIGHT));
        let colorspace = self.get(tj::TJPARAM_TJPARAM_COLORSPACE);
        if w <= 0 || h <= 0 || colorspace < 0 {
            return Err(Failure::Fatal(format!("bad header ({w}x{h}, colour space {colorspace})")));
        }
        if w as u64 * h as u64 > MAX_PIXELS {
            return Err(Failure::Fatal(format!("{w}x{h} pixels, more than Pillow's limit of {MAX_PIXELS}")));
        }
        // Pillow's mode follows the component count: 4 components are CMYK (its
        // "CMYK;I", Adobe's inverted convention) converted by its own formula; 1 and 3
        // go through libjpeg's grey and RGB output, which is what Pillow asks libjpeg for.
        let cmyk = colorspace == tj::TJCS_TJCS_CMYK as i32 || colorspace == tj::TJCS_TJCS_YCCK as i32;
        let (format, channels) = if cmyk { (tj::TJPF_TJPF_CMYK, 4) } else { (tj::TJPF_TJPF_RGB, 3) };
        let (w, h) = (w as usize, h as usize);
        let mut buf = vec![0u8; w * h * channels];
        // SAFETY: valid handle; `buf` holds exactly h rows of `w * channels` bytes (pitch
        // 0 = packed), the output size of an unscaled decode in this pixel format.
        let rc = unsafe { tj::tj3Decompress8(self.handle, bytes.as_ptr(), bytes.len() as tj::size_t, buf.as_mut_ptr(), 0, format) };
        self.check(rc, tolerated)?;
        let rgb = if cmyk { cmyk_inverted_to_rgb(&buf) } else { buf };
        Ok(RgbImage::from_raw(w as u32, h as u32, rgb).expect("w * h * 3 bytes"))
    }
}

impl Drop for Decompressor {
    fn drop(&mut self) {
        // SAFETY: the handle came from tj3Init and is destroyed once.
        unsafe { tj::tj3Destroy(self.handle) }
    }
}

/// Pillow's CMYK JPEG path: the "CMYK;I" unpacker inverts every byte (Adobe writes
/// CMYK inverted), then `convert('RGB')` takes `R = (255 - K) - C (255 - K) / 255`,
/// rounded as its integer arithmetic rounds (exact rounding of the quotient).
fn cmyk_inverted_to_rgb(cmyk: &[u8]) -> Vec<u8> {
    let mul_div_255 = |a: u32, b: u32| {
        let t = a * b + 128;
        ((t >> 8) + t) >> 8
    };
    let mut out = Vec::with_capacity(cmyk.len() / 4 * 3);
    for px in cmyk.chunks_exact(4) {
        let nk = u32::from(px[3]); // 255 - (255 - K)
        out.extend(px[..3].iter().map(|&c| (nk - mul_div_255(255 - u32::from(c), nk)) as u8));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn png_is_found_by_content() {
        let img = RgbImage::from_fn(3, 2, |x, y| image::Rgb([x as u8 * 80, y as u8 * 200, 7]));
        let mut png = Vec::new();
        img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png).unwrap();
        assert_eq!(decode_rgb(&png).unwrap(), img);
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(decode_rgb(b"not an image").is_err());
        assert!(decode_rgb(&[0xFF, 0xD8, 0xFF, 0xE0, 0, 2]).is_err());
    }

    #[test]
    fn cmyk_conversion_is_exact_division() {
        // Pillow's MULDIV255 is round(a * b / 255) for all 8-bit a, b.
        for c in 0..=255u32 {
            for k in 0..=255u32 {
                let got = u32::from(cmyk_inverted_to_rgb(&[c as u8, 0, 0, k as u8])[0]);
                let want = k - ((255 - c) * k + 127) / 255;
                assert_eq!(got, want, "C {c} K {k}");
            }
        }
    }
}
