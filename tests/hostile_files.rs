//! Every reader of outside files (torch.save zip and legacy, npy, npz, safetensors, a dataset's index.json, images in prepare) meets valid files cut short, bit-flipped and with forged header fields: each is read or refused with one input-error line, never a panic, never with more memory than its size justifies.

// Property-based (proptest) with a fixed seed and a bounded number of cases, so CI runs the same cases in
// seconds; PROPTEST_RNG_SEED / PROPTEST_CASES explore others. A few refused files of each reader also go
// through the binary, under a limited address space, to prove the one-line exit 2 end to end.

mod common;
#[path = "common/hostile.rs"]
mod hostile;

use common::{assert_bad_input, repo, torch_saves};
use hostile::{limited_bin, memory_bound, peak_of};
use proptest::prelude::*;
use proptest::sample::select;
use proptest::test_runner::{Config as ProptestConfig, RngSeed, TestCaseError};
use reg::data::loader::assemble;
use reg::data::prepare::load_image;
use reg::data::reg_layout::Blob;
use reg::data::shards::{write_index, write_shard, Dataset, EncoderInfo, Index};
use reg::formats::npy::{NpzArray, NpzWriter};
use reg::formats::{images, npy, torchfile, weights};
use serde_json::{json, Value as Json};
use std::io::Write;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use tch::{Device, Kind, Tensor};

// ---------------------------------------------------------------------------------------------------------------
// Mutations of a valid file.

/// One change to a file. Positions are free numbers reduced modulo the length; `hot` ones land in the
/// regions a reader parses (header, pickle, directory), where most damage is interesting.
#[derive(Debug, Clone)]
enum Mutation {
    Truncate(u64),
    Flip {
        at: u64,
        hot: bool,
        bit: u8,
    },
    /// Overwrites `width` bytes with a little-endian value: the way a forged size, count or offset looks.
    Int {
        at: u64,
        hot: bool,
        width: usize,
        value: u64,
    },
}

/// Values that break size arithmetic: zero, one, sign and width boundaries, 2^40, the maximum.
fn interesting() -> impl Strategy<Value = u64> {
    prop_oneof![
        3 => select(vec![
            0,
            1,
            2,
            7,
            0x7f,
            0x80,
            0xff,
            0x100,
            0xffff,
            0x7fff_ffff,
            0x8000_0000,
            0xffff_ffff,
            1 << 32,
            1 << 40,
            1 << 53,
            i64::MAX as u64,
            1 << 63,
            u64::MAX
        ]),
        1 => any::<u64>(),
    ]
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        1 => any::<u64>().prop_map(Mutation::Truncate),
        4 => (any::<u64>(), any::<bool>(), 0u8..8).prop_map(|(at, hot, bit)| Mutation::Flip { at, hot, bit }),
        3 => (any::<u64>(), any::<bool>(), select(vec![1usize, 2, 4, 8]), interesting())
            .prop_map(|(at, hot, width, value)| Mutation::Int { at, hot, width, value }),
    ]
}

fn mutations() -> impl Strategy<Value = Vec<Mutation>> {
    prop::collection::vec(mutation(), 1..4)
}

fn position(at: u64, hot: bool, hot_ranges: &[Range<usize>], len: usize) -> usize {
    let ranges: Vec<&Range<usize>> = hot_ranges.iter().filter(|r| r.end <= len && !r.is_empty()).collect();
    if hot && !ranges.is_empty() {
        let r = ranges[(at % ranges.len() as u64) as usize];
        r.start + ((at / ranges.len() as u64) % r.len() as u64) as usize
    } else {
        (at % len as u64) as usize
    }
}

fn mutate(bytes: &[u8], muts: &[Mutation], hot: &[Range<usize>]) -> Vec<u8> {
    let mut b = bytes.to_vec();
    for m in muts {
        if b.is_empty() {
            break;
        }
        match *m {
            Mutation::Truncate(at) => b.truncate((at % b.len() as u64) as usize),
            Mutation::Flip { at, hot: h, bit } => {
                let p = position(at, h, hot, b.len());
                b[p] ^= 1 << bit;
            }
            Mutation::Int { at, hot: h, width, value } => {
                let p = position(at, h, hot, b.len());
                let end = (p + width).min(b.len());
                b[p..end].copy_from_slice(&value.to_le_bytes()[..end - p]);
            }
        }
    }
    b
}

/// A change to a JSON document. Most keep a value's type (a number for a number, a string for a string), so
/// the edit reaches the reader's checks rather than the parser's; the rest replace any node, remove one or add
/// an unknown key. Nodes are numbered in document order, the number reduced modulo their count.
#[derive(Debug, Clone)]
enum JsonEdit {
    Number(usize, Json),
    Text(usize, &'static str),
    Any(usize, Json),
    Remove(usize),
    AddUnknown(usize),
}

fn json_number() -> impl Strategy<Value = Json> {
    prop_oneof![
        6 => interesting().prop_map(|n| json!(n)),
        2 => select(vec![-1i64, -2, i32::MIN as i64, i64::MIN]).prop_map(|n| json!(n)),
        1 => select(vec![0.5f64, -0.5, 1e300, 3.0]).prop_map(|f| json!(f)),
    ]
}

fn json_text() -> impl Strategy<Value = &'static str> {
    select(vec![
        "",
        "F32",
        "BF16",
        "F16",
        "I64",
        "U8",
        "BOOL",
        "F8_E4M3",
        "C64",
        "f32",
        "bf16",
        "u8",
        "i64",
        "x",
        "../shard-00000.safetensors",
        "/dev/zero",
        "sub/shard-00000.safetensors",
        ".",
        "shard-00000.safetensors",
        "shard-00001.safetensors",
        "\u{0}",
    ])
}

fn json_value() -> impl Strategy<Value = Json> {
    prop_oneof![
        3 => json_number(),
        2 => json_text().prop_map(|s| json!(s)),
        1 => Just(Json::Null),
        1 => any::<bool>().prop_map(|b| json!(b)),
        1 => Just(json!([])),
        1 => Just(json!({})),
        2 => prop::collection::vec(interesting(), 0..5).prop_map(|v| json!(v)),
    ]
}

fn json_edit() -> impl Strategy<Value = JsonEdit> {
    prop_oneof![
        6 => (any::<usize>(), json_number()).prop_map(|(i, v)| JsonEdit::Number(i, v)),
        3 => (any::<usize>(), json_text()).prop_map(|(i, v)| JsonEdit::Text(i, v)),
        2 => (any::<usize>(), json_value()).prop_map(|(i, v)| JsonEdit::Any(i, v)),
        1 => any::<usize>().prop_map(JsonEdit::Remove),
        1 => any::<usize>().prop_map(JsonEdit::AddUnknown),
    ]
}

/// JSON pointers of every node but the root, in document order.
fn pointers(v: &Json, at: String, out: &mut Vec<String>) {
    match v {
        Json::Object(m) => {
            for (k, c) in m {
                let p = format!("{at}/{}", k.replace('~', "~0").replace('/', "~1"));
                out.push(p.clone());
                pointers(c, p, out);
            }
        }
        Json::Array(a) => {
            for (i, c) in a.iter().enumerate() {
                let p = format!("{at}/{i}");
                out.push(p.clone());
                pointers(c, p, out);
            }
        }
        _ => {}
    }
}

fn edit_json(doc: &mut Json, edits: &[JsonEdit]) {
    for e in edits {
        let mut all = Vec::new();
        pointers(doc, String::new(), &mut all);
        let of_kind =
            |want: fn(&Json) -> bool| -> Vec<String> { all.iter().filter(|p| want(doc.pointer(p).expect("listed"))).cloned().collect() };
        let pick = |from: &[String], i: usize| (!from.is_empty()).then(|| from[i % from.len()].clone());
        match e {
            JsonEdit::Number(i, v) => {
                if let Some(p) = pick(&of_kind(Json::is_number), *i) {
                    *doc.pointer_mut(&p).expect("listed") = v.clone();
                }
            }
            JsonEdit::Text(i, v) => {
                if let Some(p) = pick(&of_kind(Json::is_string), *i) {
                    *doc.pointer_mut(&p).expect("listed") = json!(v);
                }
            }
            JsonEdit::Any(i, v) => {
                if let Some(p) = pick(&all, *i) {
                    *doc.pointer_mut(&p).expect("listed") = v.clone();
                }
            }
            JsonEdit::Remove(i) => {
                let Some(p) = pick(&all, *i) else { continue };
                let (parent, last) = p.rsplit_once('/').expect("non-root");
                match doc.pointer_mut(parent).expect("listed") {
                    Json::Object(m) => {
                        m.remove(&last.replace("~1", "/").replace("~0", "~"));
                    }
                    Json::Array(a) => {
                        a.remove(last.parse::<usize>().expect("index"));
                    }
                    _ => unreachable!("a parent is a container"),
                }
            }
            JsonEdit::AddUnknown(i) => {
                if let Some(p) = pick(&of_kind(Json::is_object), *i) {
                    doc.pointer_mut(&p).expect("listed").as_object_mut().expect("an object").insert("unexpected".into(), json!(1));
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Checks shared by every reader.

fn config(cases: u32) -> ProptestConfig {
    let base = ProptestConfig::default();
    ProptestConfig {
        cases: if std::env::var_os("PROPTEST_CASES").is_some() { base.cases } else { cases },
        rng_seed: if std::env::var_os("PROPTEST_RNG_SEED").is_some() { base.rng_seed } else { RngSeed::Fixed(0x0005_eed0_f14e) },
        failure_persistence: None,
        max_shrink_iters: 512,
        ..base
    }
}

/// An input error (exit 2 in the binary) on one line naming the file.
fn refused_cleanly(e: &anyhow::Error, file: &str) -> Result<(), TestCaseError> {
    let msg = format!("{e:#}");
    prop_assert!(reg::error::is_input_error(e), "not an input error: {msg}");
    prop_assert!(!msg.contains('\n'), "more than one line: {msg}");
    prop_assert!(msg.contains(file), "{file} missing from: {msg}");
    Ok(())
}

/// The first few refused cases of each reader also run through the binary.
const BINARY_CASES: usize = 2;

fn through_binary(counter: &AtomicUsize) -> bool {
    counter.fetch_add(1, Ordering::Relaxed) < BINARY_CASES
}

fn run(c: &mut Command) -> Output {
    c.output().expect("run reg-ddp")
}

// ---------------------------------------------------------------------------------------------------------------
// torch.save files: tests/data/hostile/tiny.pt and tiny-legacy.pt (tools/golden/hostile_seeds.py).

/// The pickle and the zip directory of a torch.save zip archive.
fn zip_hot_ranges(bytes: &[u8]) -> Vec<Range<usize>> {
    let mut z = zip::ZipArchive::new(std::io::Cursor::new(bytes)).expect("seed is a zip");
    let names: Vec<String> = z.file_names().map(str::to_string).collect();
    let mut hot = Vec::new();
    for name in names {
        let e = z.by_name(&name).expect("listed");
        let start = e.data_start() as usize;
        if name.ends_with("data.pkl") {
            hot.push(start..start + e.size() as usize);
        }
        // Each entry's local header (30 bytes and its name): sizes and offsets.
        let header = e.header_start() as usize;
        hot.push(header..start);
    }
    let cd = bytes.windows(4).position(|w| w == b"PK\x01\x02").expect("central directory");
    hot.push(cd..bytes.len());
    hot
}

/// Reads a state dict of `path` as `import --key` would; the key whose reading failed, with the error.
fn read_torch(path: &Path) -> Result<(), (&'static str, anyhow::Error)> {
    let v = torchfile::read(path).map_err(|e| ("model", e))?;
    for key in ["model", "ema"] {
        torchfile::state_dict(path, &v, Some(key)).map_err(|e| (key, e))?;
    }
    Ok(())
}

/// One damaged copy of `seed`, read in process (and through `import` for the first refusals): whether it was read.
fn torch_case(dir: &Path, seed: &[u8], hot: &[Range<usize>], muts: &[Mutation], counter: &AtomicUsize) -> Result<bool, TestCaseError> {
    let bytes = mutate(seed, muts, hot);
    let path = dir.join("mutated.pt");
    std::fs::write(&path, &bytes).unwrap();
    let (result, peak) = peak_of(|| read_torch(&path));
    prop_assert!(peak <= memory_bound(bytes.len()), "{peak} bytes held reading {} bytes", bytes.len());
    let Err((key, e)) = result else { return Ok(true) };
    refused_cleanly(&e, "mutated.pt")?;
    if through_binary(counter) {
        let out = dir.join("out.safetensors");
        let o = run(limited_bin().arg("import").arg(&path).arg("--out").arg(&out).args(["--key", key]));
        assert_bad_input(&o, &["mutated.pt"]);
        prop_assert!(!out.exists());
    }
    Ok(false)
}

fn seed(name: &str) -> Vec<u8> {
    std::fs::read(repo().join("tests/data/hostile").join(name)).unwrap()
}

#[test]
fn torch_zip_archives_damaged_anywhere_are_read_or_refused() {
    let dir = tempfile::tempdir().unwrap();
    let seed = seed("tiny.pt");
    assert!(read_torch(&repo().join("tests/data/hostile/tiny.pt")).is_ok(), "the seed itself reads");
    let hot = zip_hot_ranges(&seed);
    let counter = AtomicUsize::new(0);
    proptest!(config(256), |(muts in mutations())| {
        torch_case(dir.path(), &seed, &hot, &muts, &counter)?;
    });
}

#[test]
fn torch_legacy_streams_damaged_anywhere_are_read_or_refused() {
    let dir = tempfile::tempdir().unwrap();
    let seed = seed("tiny-legacy.pt");
    assert!(read_torch(&repo().join("tests/data/hostile/tiny-legacy.pt")).is_ok(), "the seed itself reads");
    // The pickles (magic, version, system info, the object, the storage keys) come first, the storages after;
    // the first storage is `w`'s, which starts with its element count, 6. Half the hot mutations go to each.
    let storages = seed.windows(8).position(|w| w == 6u64.to_le_bytes()).expect("w's storage");
    let hot = vec![0..storages, storages..seed.len()];
    let counter = AtomicUsize::new(0);
    proptest!(config(256), |(muts in mutations())| {
        torch_case(dir.path(), &seed, &hot, &muts, &counter)?;
    });
}

/// torch.save files as PyTorch writes them beyond the small seeds (tests/common/torch_saves.rs, made by the
/// project's Python: every dtype, views with offsets, `module.` prefixes, a memoized dict, a real AdamW state,
/// an argparse.Namespace), zip and legacy, damaged anywhere. Both outcomes must occur often: a damaged
/// tensor payload still reads, a damaged structure is refused.
#[test]
fn torch_saves_of_every_kind_damaged_anywhere_are_read_or_refused() {
    let (src, _) = torch_saves::fixtures();
    let dir = tempfile::tempdir().unwrap();
    for file in ["reg.pt", "reg-legacy.pt"] {
        let seed = std::fs::read(src.join(file)).unwrap();
        assert!(read_torch(&src.join(file)).is_ok(), "{file}: the seed itself reads");
        // The zip's pickle, local headers and directory; the legacy stream's first 4 KiB, its pickles.
        let hot = if file == "reg.pt" { zip_hot_ranges(&seed) } else { std::iter::once(0..seed.len().min(4096)).collect() };
        let (read, refused, counter) = (AtomicUsize::new(0), AtomicUsize::new(0), AtomicUsize::new(0));
        let cases = 3000;
        proptest!(config(cases), |(muts in mutations())| {
            let outcome = if torch_case(dir.path(), &seed, &hot, &muts, &counter)? { &read } else { &refused };
            outcome.fetch_add(1, Ordering::Relaxed);
        });
        let (read, refused) = (read.into_inner(), refused.into_inner());
        println!("{file}: read {read}, refused {refused}");
        assert!(read * 20 > refused + read && refused * 20 > refused + read, "{file}: read {read}, refused {refused}");
    }
}

// ---------------------------------------------------------------------------------------------------------------
// npy: a moments file written by numpy through REG's own preprocessing (tests/data/reg_preprocessed).

const NPY_SEED: &str = "tests/data/reg_preprocessed/folder/vae-sd/00000/img-mean-std-00000000.npy";

/// The seed's data bytes (after its header).
fn npy_data(bytes: &[u8]) -> &[u8] {
    let hlen = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    &bytes[10 + hlen..]
}

/// A header written the way a hand or another tool might: either quote, any spacing, each field chosen.
#[derive(Debug, Clone)]
struct NpyHeader {
    version: u8,
    descr: &'static str,
    fortran: &'static str,
    shape: Vec<u128>,
    double_quotes: bool,
    tight: bool,
    extra_key: bool,
}

fn npy_header() -> impl Strategy<Value = NpyHeader> {
    let dim = prop_oneof![
        4 => select(vec![0u128, 1, 2, 4, 8, 16, 32, 64, 128]),
        1 => select(vec![1u128 << 32, 1 << 40, 1 << 62, 1 << 63, u64::MAX as u128, 1 << 64]),
    ];
    // Each field is right most of the time, so that most cases reach the size check.
    (
        prop_oneof![8 => Just(1u8), 1 => Just(2), 1 => Just(3), 1 => select(vec![0u8, 4, 255])],
        prop_oneof![
            8 => select(vec!["<f4", "<f8", "<i8", "|u1", "<u1"]),
            1 => select(vec![">f4", "<f2", "|b1", "<c8", "O", "<U4", "f4", ""]),
        ],
        prop_oneof![8 => Just("False"), 1 => select(vec!["True", "0", "1", "false", "None"])],
        // Random sizes, or a factorisation of the seed's 512 bytes for one of the element sizes.
        prop_oneof![
            prop::collection::vec(dim, 0..4),
            select(vec![vec![8u128, 4, 4], vec![128], vec![16, 8], vec![64], vec![8, 8], vec![512], vec![2, 16, 16]]),
        ],
        any::<bool>(),
        any::<bool>(),
        prop::bool::weighted(0.1),
    )
        .prop_map(|(version, descr, fortran, shape, double_quotes, tight, extra_key)| NpyHeader {
            version,
            descr,
            fortran,
            shape,
            double_quotes,
            tight,
            extra_key,
        })
}

impl NpyHeader {
    fn bytes(&self, data: &[u8]) -> Vec<u8> {
        let q = if self.double_quotes { '"' } else { '\'' };
        let sep = if self.tight { "" } else { " " };
        let dims: Vec<String> = self.shape.iter().map(u128::to_string).collect();
        let shape = match dims.len() {
            1 => format!("({},)", dims[0]),
            _ => format!("({})", dims.join(&format!(",{sep}"))),
        };
        let extra = if self.extra_key { format!("{q}x{q}:{sep}1,{sep}") } else { String::new() };
        let mut h = format!(
            "{{{q}descr{q}:{sep}{q}{d}{q},{sep}{q}fortran_order{q}:{sep}{f},{sep}{extra}{q}shape{q}:{sep}{shape},{sep}}}",
            d = self.descr,
            f = self.fortran
        );
        h.push('\n');
        let mut out = b"\x93NUMPY".to_vec();
        out.extend([self.version, 0]);
        if self.version == 1 {
            out.extend((h.len() as u16).to_le_bytes());
        } else {
            out.extend((h.len() as u32).to_le_bytes());
        }
        out.extend(h.as_bytes());
        out.extend(data);
        out
    }

    /// Whether numpy's format, read strictly, describes exactly `data`, and as what.
    fn expected(&self, data: &[u8]) -> Option<(Kind, Vec<i64>)> {
        let (kind, elt) = match self.descr {
            "<f4" => (Kind::Float, 4u128),
            "<f8" => (Kind::Double, 8),
            "<i8" => (Kind::Int64, 8),
            "|u1" | "<u1" => (Kind::Uint8, 1),
            _ => return None,
        };
        let ok_header = matches!(self.version, 1..=3) && self.fortran == "False" && !self.extra_key;
        let size = self.shape.iter().try_fold(elt, |acc, &d| acc.checked_mul(d))?;
        let fits = self.shape.iter().all(|&d| d <= i64::MAX as u128) && size <= i64::MAX as u128;
        (ok_header && fits && size == data.len() as u128).then(|| (kind, self.shape.iter().map(|&d| d as i64).collect()))
    }
}

/// The REG layout with its first moments file replaced, for `prepare --from-reg`.
fn reg_tree_with_first_moments(dir: &Path, moments: &[u8]) -> PathBuf {
    let root = dir.join("reg");
    if !root.exists() {
        copy_tree(&repo().join("tests/data/reg_preprocessed/folder"), &root);
    }
    std::fs::write(root.join("vae-sd/00000/img-mean-std-00000000.npy"), moments).unwrap();
    root
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            copy_tree(&e.path(), &to.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

fn npy_refused_by_prepare(dir: &Path, bytes: &[u8]) {
    let root = reg_tree_with_first_moments(dir, bytes);
    let out = dir.join("prepared");
    let o = run(limited_bin().args(["prepare", "--from-reg"]).arg(&root).arg("--out").arg(&out).args([
        "--no-features",
        "--store-images",
        "--device",
        "cpu",
        "--threads",
        "1",
    ]));
    assert_bad_input(&o, &["img-mean-std-00000000.npy"]);
}

#[test]
fn npy_headers_are_parsed_exactly_or_refused() {
    let dir = tempfile::tempdir().unwrap();
    let seed = std::fs::read(repo().join(NPY_SEED)).unwrap();
    let data = npy_data(&seed).to_vec();
    let counter = AtomicUsize::new(0);
    proptest!(config(256), |(h in npy_header())| {
        let bytes = h.bytes(&data);
        let (result, peak) = peak_of(|| npy::parse(&bytes, "edited.npy"));
        prop_assert!(peak <= memory_bound(bytes.len()), "{peak} bytes held reading {} bytes", bytes.len());
        match (result, h.expected(&data)) {
            (Ok(t), Some((kind, shape))) => {
                prop_assert_eq!(t.kind(), kind);
                prop_assert_eq!(t.size(), shape);
                let mut back = vec![0u8; data.len()];
                t.contiguous().copy_data_u8(&mut back, t.numel());
                prop_assert!(back == data, "the data changed");
            }
            (Ok(t), None) => prop_assert!(false, "read as {:?} {:?}, but the header is wrong", t.kind(), t.size()),
            (Err(e), Some(_)) => prop_assert!(false, "a valid header was refused: {e:#}"),
            (Err(e), None) => {
                refused_cleanly(&e, "edited.npy")?;
                if through_binary(&counter) {
                    npy_refused_by_prepare(dir.path(), &bytes);
                }
            }
        }
    });
}

#[test]
fn npy_files_damaged_anywhere_are_read_or_refused() {
    let seed = std::fs::read(repo().join(NPY_SEED)).unwrap();
    let header = 0..10 + u16::from_le_bytes([seed[8], seed[9]]) as usize;
    proptest!(config(128), |(muts in mutations())| {
        let bytes = mutate(&seed, &muts, std::slice::from_ref(&header));
        let (result, peak) = peak_of(|| npy::parse(&bytes, "mutated.npy"));
        prop_assert!(peak <= memory_bound(bytes.len()), "{peak} bytes held reading {} bytes", bytes.len());
        match result {
            Ok(t) => {
                let size = t.numel() * t.kind().elt_size_in_bytes();
                prop_assert!(size < bytes.len(), "{size} bytes of data from a file of {}", bytes.len());
            }
            Err(e) => refused_cleanly(&e, "mutated.npy")?,
        }
    });
}

// ---------------------------------------------------------------------------------------------------------------
// npz: an ADM-style sample batch written by our own writer (stored), and the same array deflated as
// np.savez_compressed writes it.

fn npz_seeds(dir: &Path) -> (Vec<u8>, Vec<u8>) {
    let stored = dir.join("stored.npz");
    let mut w = NpzWriter::create(&stored, &[2, 4, 4, 3]).unwrap();
    w.write(&(0..96u8).collect::<Vec<_>>()).unwrap();
    w.finish().unwrap();
    let stored = std::fs::read(stored).unwrap();
    // The array's .npy bytes, deflated into a fresh archive.
    let mut z = zip::ZipArchive::new(std::io::Cursor::new(&stored)).unwrap();
    let mut npy_bytes = Vec::new();
    std::io::Read::read_to_end(&mut z.by_name("arr_0.npy").unwrap(), &mut npy_bytes).unwrap();
    let mut out = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let opts = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Deflated);
    out.start_file("arr_0.npy", opts).unwrap();
    out.write_all(&npy_bytes).unwrap();
    (stored, out.finish().unwrap().into_inner())
}

#[test]
fn npz_archives_damaged_anywhere_are_read_or_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (stored, deflated) = npz_seeds(d);
    let hot = [zip_hot_ranges(&stored), zip_hot_ranges(&deflated)];
    let counter = AtomicUsize::new(0);
    proptest!(config(192), |(which in 0usize..2, muts in mutations())| {
        let seed = if which == 0 { &stored } else { &deflated };
        let bytes = mutate(seed, &muts, &hot[which]);
        let path = d.join("mutated.npz");
        std::fs::write(&path, &bytes).unwrap();
        let (result, peak) = peak_of(|| NpzArray::open(&path, "arr_0").map(|a| a.map(|a| a.load())));
        prop_assert!(peak <= memory_bound(bytes.len()), "{peak} bytes held reading {} bytes", bytes.len());
        if let Err(e) = result {
            refused_cleanly(&e, "mutated.npz")?;
            if through_binary(&counter) {
                // eval reads its samples before it loads the network, so no weights are needed to see them refused.
                let o = run(limited_bin()
                    .args(["eval", "--samples"])
                    .arg(&path)
                    .arg("--ref")
                    .arg(&path)
                    .arg("--inception")
                    .arg(d.join("never-read.safetensors"))
                    .args(["--device", "cpu", "--threads", "1"]));
                assert_bad_input(&o, &["mutated.npz"]);
            }
        }
    });
}

// ---------------------------------------------------------------------------------------------------------------
// safetensors: a file from our own writer, its header JSON edited field by field or its bytes damaged.

fn safetensors_seed() -> Vec<u8> {
    let cpu = Device::Cpu;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("seed.safetensors");
    weights::write(
        &path,
        &[
            ("w".to_string(), Tensor::arange(6, (Kind::Float, cpu)).view([2, 3])),
            ("h".to_string(), Tensor::arange(4, (Kind::BFloat16, cpu))),
            ("i".to_string(), Tensor::from_slice(&[1i64, -2])),
            ("empty".to_string(), Tensor::zeros([0, 5], (Kind::Uint8, cpu))),
        ],
        Some([("format".to_string(), "pt".to_string())].into()),
    )
    .unwrap();
    std::fs::read(path).unwrap()
}

/// The header JSON, edited, written back with its true length (so the edit, not the framing, is tested).
fn edit_safetensors_header(seed: &[u8], edits: &[JsonEdit]) -> Vec<u8> {
    let n = u64::from_le_bytes(seed[..8].try_into().unwrap()) as usize;
    let mut header: Json = serde_json::from_slice(&seed[8..8 + n]).unwrap();
    edit_json(&mut header, edits);
    let text = serde_json::to_vec(&header).unwrap();
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend(text);
    out.extend(&seed[8 + n..]);
    out
}

#[test]
fn safetensors_headers_forged_or_damaged_are_read_or_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let seed = safetensors_seed();
    let n = u64::from_le_bytes(seed[..8].try_into().unwrap()) as usize;
    let header = 0..8 + n;
    let samples = d.join("samples.npz");
    std::fs::write(&samples, npz_seeds(d).0).unwrap();
    let counter = AtomicUsize::new(0);
    // Mostly field edits; a quarter of the cases also damage the bytes.
    let cases = (prop::collection::vec(json_edit(), 0..3), prop::option::weighted(0.25, mutation()));
    proptest!(config(256), |((edits, muts) in cases)| {
        let bytes = mutate(&edit_safetensors_header(&seed, &edits), muts.as_slice(), std::slice::from_ref(&header));
        let path = d.join("mutated.safetensors");
        std::fs::write(&path, &bytes).unwrap();
        let (result, peak) = peak_of(|| weights::read(&path));
        prop_assert!(peak <= memory_bound(bytes.len()), "{peak} bytes held reading {} bytes", bytes.len());
        match result {
            Ok(tensors) => {
                let total: usize = tensors.iter().map(|(_, t)| t.numel() * t.kind().elt_size_in_bytes()).sum();
                prop_assert!(total <= bytes.len(), "{total} bytes of tensors from a file of {}", bytes.len());
            }
            Err(e) => {
                refused_cleanly(&e, "mutated.safetensors")?;
                if through_binary(&counter) {
                    // eval loads the Inception weights right after checking its samples.
                    let o = run(limited_bin()
                        .args(["eval", "--samples"])
                        .arg(&samples)
                        .arg("--ref")
                        .arg(&samples)
                        .arg("--inception")
                        .arg(&path)
                        .args(["--device", "cpu", "--threads", "1"]));
                    assert_bad_input(&o, &["mutated.safetensors"]);
                }
            }
        }
    });
}

// ---------------------------------------------------------------------------------------------------------------
// A dataset folder: index.json edited field by field (or damaged), sometimes a shard's header too. Whatever
// opens and reads must give back exactly the records that were written.

/// Two shards of three records with features and images; returns the latents of each shard.
fn make_dataset(dir: &Path) -> Vec<Tensor> {
    std::fs::create_dir_all(dir).unwrap();
    let cpu = Device::Cpu;
    let mut shards = Vec::new();
    let mut all = Vec::new();
    for i in 0..2 {
        let latents = Tensor::randn([3, 4, 2, 2], (Kind::Float, cpu));
        let labels = Tensor::from_slice(&[0i64, 1, 2]);
        let features = Tensor::randn([3, 5, 4], (Kind::Float, cpu)).to_kind(Kind::BFloat16);
        let images = Tensor::randint(256, [3, 3, 8, 8], (Kind::Uint8, cpu));
        all.push(latents.shallow_clone());
        let t = [("latents".into(), latents), ("labels".into(), labels), ("features".into(), features), ("images".into(), images)];
        shards.push(write_shard(dir, i, &t).unwrap());
    }
    let index = Index {
        format_version: 1,
        resolution: 8,
        latent_shape: vec![4, 2, 2],
        latent_dtype: "f32".into(),
        vae: "test".into(),
        encoder: Some(EncoderInfo { name: "test".into(), tokens: 5, z_dim: 4 }),
        features: true,
        images: true,
        class_names: (0..3).map(|c| format!("class{c}")).collect(),
        shards,
        bad_images: 0,
        bad_images_report: None,
        text: None,
    };
    write_index(dir, &index).unwrap();
    all
}

/// Opens the dataset and reads every record of every field, as training does.
fn read_dataset(dir: &Path) -> anyhow::Result<Tensor> {
    let ds = Dataset::open(dir, true)?;
    let perm: Vec<i64> = (0..ds.len()).collect();
    let b = assemble(&ds, &perm, 0, 0, ds.len(), false, reg::data::loader::Key { seed: 0, step: 0 })?;
    Ok(b.moments)
}

#[test]
fn dataset_indexes_forged_or_damaged_are_read_exactly_or_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let good = d.join("good");
    let latents = make_dataset(&good);
    assert!(read_dataset(&good).unwrap().equal(&Tensor::cat(&latents, 0)), "the seed itself reads");
    // What a dataset may hold after an edit: the records of the shard files its index lists, in that order
    // (dropping or repeating a whole shard is a dataset too). Anything else is other data.
    let expected = |ix: &Json| -> Option<Tensor> {
        let files = ix["shards"].as_array()?.iter().map(|s| s["file"].as_str()).collect::<Option<Vec<_>>>()?;
        let parts: Option<Vec<Tensor>> = files
            .iter()
            .map(|f| ["shard-00000.safetensors", "shard-00001.safetensors"].iter().position(|n| n == f).map(|i| latents[i].shallow_clone()))
            .collect();
        let parts = parts?;
        Some(if parts.is_empty() { Tensor::zeros([0, 4, 2, 2], (Kind::Float, Device::Cpu)) } else { Tensor::cat(&parts, 0) })
    };
    let index: Json = serde_json::from_slice(&std::fs::read(good.join("index.json")).unwrap()).unwrap();
    let shard0 = std::fs::read(good.join("shard-00000.safetensors")).unwrap();
    let shard_header = 0..8 + u64::from_le_bytes(shard0[..8].try_into().unwrap()) as usize;
    // bench-data's own flags divide the batch: zero is refused, not divided by in the loader thread.
    assert_bad_input(&run(limited_bin().args(["bench-data", "--data"]).arg(&good).args(["--batch", "0"])), &["--batch 0"]);
    let counter = AtomicUsize::new(0);
    let cases = (prop::collection::vec(json_edit(), 0..3), prop::collection::vec(mutation(), 0..2), prop::bool::weighted(0.2));
    proptest!(config(128), |((edits, muts, in_shard) in cases)| {
        let case = d.join("mutated-ds");
        let _ = std::fs::remove_dir_all(&case);
        copy_tree(&good, &case);
        let mut ix = index.clone();
        edit_json(&mut ix, &edits);
        let text = serde_json::to_vec_pretty(&ix).unwrap();
        if in_shard {
            std::fs::write(case.join("index.json"), &text).unwrap();
            std::fs::write(case.join("shard-00000.safetensors"), mutate(&shard0, &muts, std::slice::from_ref(&shard_header))).unwrap();
        } else {
            std::fs::write(case.join("index.json"), mutate(&text, &muts, &[])).unwrap();
        }
        let (result, peak) = peak_of(|| read_dataset(&case));
        // The shards are mapped, not read into memory: the bound is that of index.json and the headers.
        prop_assert!(peak <= memory_bound(text.len() + shard0.len()), "{peak} bytes held");
        match result {
            Ok(read) => {
                let written: Option<Json> = serde_json::from_slice(&std::fs::read(case.join("index.json")).unwrap()).ok();
                let want = written.as_ref().and_then(expected);
                prop_assert!(want.is_some_and(|w| read.equal(&w)), "a damaged dataset read as other records");
            }
            Err(e) => {
                refused_cleanly(&e, "mutated-ds")?;
                if through_binary(&counter) {
                    let o = run(limited_bin().args(["bench-data", "--data"]).arg(&case).args(["--batch", "2", "--steps", "2"]));
                    assert_bad_input(&o, &["mutated-ds"]);
                }
            }
        }
    });
}

// ---------------------------------------------------------------------------------------------------------------
// Images in prepare: a PNG and a JPEG with their sizes forged (checksums made right, so the decoder believes
// them) or their bytes damaged. Each decodes to a 64 x 64 crop or is a bad image, within the decode limits.

/// CRC-32 as PNG chunks carry it (ISO 3309, reflected polynomial 0xEDB88320), bit by bit: a few hundred bytes
/// per case.
fn crc32(bytes: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in bytes {
        c ^= b as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 { (c >> 1) ^ 0xEDB8_8320 } else { c >> 1 };
        }
    }
    !c
}

/// A PNG whose IHDR says `width` x `height` (bit depth 8, colour type 2: RGB) with a correct CRC, followed
/// by the seed's own image data: a header any decoder believes.
fn png_with_size(seed: &[u8], width: u32, height: u32, depth: u8, colour: u8) -> Vec<u8> {
    // Signature (8), IHDR length (4), "IHDR" (4), then width, height, depth, colour type.
    let mut b = seed.to_vec();
    b[16..20].copy_from_slice(&width.to_be_bytes());
    b[20..24].copy_from_slice(&height.to_be_bytes());
    b[24] = depth;
    b[25] = colour;
    let crc = crc32(&b[12..29]);
    b[29..33].copy_from_slice(&crc.to_be_bytes());
    b
}

/// The first baseline or progressive frame header of a JPEG (SOF0..SOF2): where its height and width sit.
fn jpeg_sof(bytes: &[u8]) -> usize {
    bytes.windows(2).position(|w| w[0] == 0xFF && (0xC0..=0xC2).contains(&w[1])).expect("a JPEG frame header")
}

#[derive(Debug, Clone)]
enum ImageEdit {
    PngSize { width: u32, height: u32, depth: u8, colour: u8 },
    JpegSize { width: u16, height: u16 },
    Bytes { jpeg: bool, muts: Vec<Mutation> },
}

fn image_edit() -> impl Strategy<Value = ImageEdit> {
    let side = || select(vec![0u32, 1, 63, 64, 65, 300, 16384, 16385, 100_000, 1 << 24, i32::MAX as u32, u32::MAX]);
    prop_oneof![
        (side(), side(), select(vec![8u8, 8, 16, 1, 3]), select(vec![2u8, 2, 6, 0, 3, 7]))
            .prop_map(|(width, height, depth, colour)| ImageEdit::PngSize { width, height, depth, colour }),
        (select(vec![0u16, 1, 64, 300, 16384, 16385, 65535]), select(vec![0u16, 1, 64, 300, 16384, 16385, 65535]))
            .prop_map(|(width, height)| ImageEdit::JpegSize { width, height }),
        (any::<bool>(), mutations()).prop_map(|(jpeg, muts)| ImageEdit::Bytes { jpeg, muts }),
    ]
}

fn seed_png_and_jpeg() -> (Vec<u8>, Vec<u8>) {
    let png = std::fs::read(repo().join("tests/data/crop/small_260x255.expected64.png")).unwrap();
    assert_eq!(crc32(&png[12..29]).to_be_bytes(), png[29..33], "crc32 agrees with the PNG's own IHDR checksum");
    let rgb = image::load_from_memory(&png).unwrap().to_rgb8();
    let mut jpeg = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 90).encode_image(&rgb).unwrap();
    (png, jpeg)
}

#[test]
fn images_forged_or_damaged_decode_within_limits_or_count_as_bad() {
    let dir = tempfile::tempdir().unwrap();
    let (png, jpeg) = seed_png_and_jpeg();
    let (png_hot, jpeg_hot) = (0..64, 0..jpeg_sof(&jpeg) + 32);
    proptest!(config(160), |(edit in image_edit())| {
        let (bytes, name) = match &edit {
            ImageEdit::PngSize { width, height, depth, colour } => (png_with_size(&png, *width, *height, *depth, *colour), "edited.png"),
            ImageEdit::JpegSize { width, height } => {
                let mut b = jpeg.clone();
                let at = jpeg_sof(&b);
                b[at + 5..at + 7].copy_from_slice(&height.to_be_bytes());
                b[at + 7..at + 9].copy_from_slice(&width.to_be_bytes());
                (b, "edited.jpg")
            }
            ImageEdit::Bytes { jpeg: false, muts } => (mutate(&png, muts, std::slice::from_ref(&png_hot)), "mutated.png"),
            ImageEdit::Bytes { jpeg: true, muts } => (mutate(&jpeg, muts, std::slice::from_ref(&jpeg_hot)), "mutated.jpg"),
        };
        let path = dir.path().join(name);
        std::fs::write(&path, &bytes).unwrap();
        let (result, peak) = peak_of(|| load_image(&Blob::File(path.clone()), 64, true));
        // The decoder may reserve up to its limit before it finds the data short.
        let bound = images::MAX_ALLOC as usize + memory_bound(bytes.len());
        prop_assert!(peak <= bound, "{peak} bytes held decoding {} bytes", bytes.len());
        if let Ok(t) = result {
            prop_assert_eq!(t.size(), vec![3, 64, 64]);
        }
    });
}

/// A real PNG whose IHDR says 100,000 x 100,000 (checksum right, so a decoder believes it), and a valid
/// 20,000 x 1 PNG, among good images: `prepare` lists both as bad images, refused by the decode limits rather
/// than allocated, and finishes the dataset with the others.
#[test]
fn an_image_claiming_100000_pixels_a_side_is_a_bad_image_not_an_allocation() {
    let tmp = tempfile::tempdir().unwrap();
    let (images, out) = (tmp.path().join("images"), tmp.path().join("out"));
    let o = limited_bin().args(["demo-images", "--classes", "2", "--per-class", "3", "--out"]).arg(&images).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (png, _) = seed_png_and_jpeg();
    let bomb = png_with_size(&png, 100_000, 100_000, 8, 2);
    assert_eq!(u32::from_be_bytes(bomb[16..20].try_into().unwrap()), 100_000);
    std::fs::write(images.join("class00/bomb.png"), &bomb).unwrap();
    let mut wide = Vec::new();
    image::RgbImage::from_pixel(images::MAX_SIDE + 3616, 1, image::Rgb([90, 120, 200]))
        .write_to(&mut std::io::Cursor::new(&mut wide), image::ImageFormat::Png)
        .unwrap();
    std::fs::write(images.join("class01/wide.png"), &wide).unwrap();
    let r = repo();
    let o = limited_bin()
        .args(["prepare", "--images"])
        .arg(&images)
        .arg("--out")
        .arg(&out)
        .arg("--vae")
        .arg(r.join("tests/data/vae_tiny"))
        .arg("--encoder")
        .arg(r.join("tests/data/dinov2_tiny"))
        .args(["--resolution", "64", "--batch", "4", "--threads", "1", "--device", "cpu", "--max-bad-fraction", "0.5"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    let index: Json = serde_json::from_slice(&std::fs::read(out.join("index.json")).unwrap()).unwrap();
    assert_eq!(index["bad_images"], 2, "{index}");
    let records: i64 = index["shards"].as_array().unwrap().iter().map(|s| s["records"].as_i64().unwrap()).sum();
    assert_eq!(records, 6);
    let report = std::fs::read_to_string(out.join("bad_images.txt")).unwrap();
    for name in ["bomb.png", "wide.png"] {
        let line = report.lines().find(|l| l.contains(name)).unwrap_or_else(|| panic!("{name} not listed: {report}"));
        assert!(line.contains("exceeds limit (at most 16384 pixels a side"), "{name} not refused by the limits: {line}");
    }
}
