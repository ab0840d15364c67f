//! Decoding JPEG and PNG files from outside under explicit limits, so that a header claiming 100,000 x 100,000 pixels is refused before anything is allocated.

use image::{DynamicImage, ImageError, ImageReader, ImageResult, Limits};
use std::io::Cursor;
use std::path::Path;

/// The longest side accepted, in pixels: above any photograph in ImageNet or LAION, and far below what a
/// forged header can claim.
pub const MAX_SIDE: u32 = 16384;

/// The most memory one decoded image may take: 512 MiB, about 179 megapixels of RGB, the size at which
/// Pillow raises `DecompressionBombError`. Decoding runs on every core at once, so this is per thread.
pub const MAX_ALLOC: u64 = 512 << 20;

/// The limits every decode here runs under.
pub fn limits() -> Limits {
    let mut l = Limits::default();
    l.max_image_width = Some(MAX_SIDE);
    l.max_image_height = Some(MAX_SIDE);
    l.max_alloc = Some(MAX_ALLOC);
    l
}

/// Decodes the image file at `path` (format from its contents).
pub fn open(path: &Path) -> ImageResult<DynamicImage> {
    let mut r = ImageReader::open(path).map_err(ImageError::IoError)?.with_guessed_format().map_err(ImageError::IoError)?;
    r.limits(limits());
    r.decode()
}

/// Decodes an image held in memory (an entry of a zip archive).
pub fn from_memory(bytes: &[u8]) -> ImageResult<DynamicImage> {
    let mut r = ImageReader::new(Cursor::new(bytes)).with_guessed_format().map_err(ImageError::IoError)?;
    r.limits(limits());
    r.decode()
}

/// Why a decode failed, in one line; a refusal by the limits says what they are.
pub fn why(e: &ImageError) -> String {
    match e {
        ImageError::Limits(_) => format!("{e} (at most {MAX_SIDE} pixels a side and {} MiB decoded)", MAX_ALLOC >> 20),
        _ => crate::error::first_line(e),
    }
}
