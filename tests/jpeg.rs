//! `prepare`'s image decoding against Pillow's on JPEGs from four encoders (regenerate:
//! tools/golden/jpeg.py): the same pixels, bit for bit, and the same files refused.

use reg::formats::npy::NpzArray;
use reg::formats::pillow_decode::decode_rgb;
use std::path::PathBuf;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/jpeg")
}

#[test]
fn jpegs_decode_to_pillows_pixels_exactly() {
    let cases: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir().join("cases.json")).unwrap()).unwrap();
    let cases = cases["cases"].as_object().unwrap();
    assert!(cases.len() >= 21, "corpus: {} files", cases.len());
    let (mut compared, mut refused) = (0, 0);
    for (name, case) in cases {
        let bytes = std::fs::read(dir().join(format!("{name}.jpg"))).unwrap();
        let got = decode_rgb(&bytes);
        let pillow = case["pillow"].as_str().unwrap();
        if pillow != "ok" {
            // Pillow refused the file (truncated, or a decompression bomb): so must we.
            let err = got.err().unwrap_or_else(|| panic!("{name}: decoded, but Pillow says {pillow}"));
            println!("{name}: refused ({err:#}); Pillow: {pillow}");
            refused += 1;
            continue;
        }
        let got = got.unwrap_or_else(|e| panic!("{name}: {e:#} (Pillow decodes it)"));
        let want = NpzArray::open(&dir().join("pillow_rgb.npz"), name).unwrap().unwrap_or_else(|| panic!("{name}: no reference"));
        // Pillow's array is [H, W, 3]; no EXIF rotation on either side.
        assert_eq!(want.shape, [got.height() as i64, got.width() as i64, 3], "{name}: size");
        let want: Vec<u8> = Vec::try_from(want.load().flatten(0, -1)).unwrap();
        let differing = got.as_raw().iter().zip(&want).filter(|(a, b)| a != b).count();
        let max = got.as_raw().iter().zip(&want).map(|(a, b)| a.abs_diff(*b)).max().unwrap();
        println!("{name}: {}x{}, {differing} of {} values differ (max {max})", got.width(), got.height(), want.len());
        // Same library, same settings, same CMYK formula: tolerance 0.
        assert_eq!(differing, 0, "{name}: {differing} values differ from Pillow's, by up to {max}");
        compared += 1;
    }
    assert!(compared >= 19 && refused >= 2, "compared {compared}, refused {refused}");
}
