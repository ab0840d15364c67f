//! Restricted reader of PyTorch `torch.save` checkpoints: walks the zip and interprets the pickle, never executing it.

// A pickle is a program for a stack machine whose GLOBAL opcodes name arbitrary Python callables, which is why
// loading one from elsewhere can run code. This reader implements only the opcodes torch.save emits and maps an
// allow-list of names (tensor rebuilders, storage types, OrderedDict, argparse.Namespace, ...) to fixed behaviour
// here; any other name is refused before anything is built. Tensor bytes are read lazily, so importing one state
// dict of a checkpoint does not also load its optimizer state.

use crate::error::{bad_input, first_line};
use anyhow::Result;
use std::cell::RefCell;
use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;
use tch::{Kind, Tensor};

/// A value read from the pickle. Dicts keep their pairs in file order.
#[derive(Debug, Clone)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    List(Vec<Value>),
    Tuple(Vec<Value>),
    Dict(Vec<(Value, Value)>),
    /// A tensor whose bytes are still in the file; `TensorRef::load` reads them.
    Tensor(TensorRef),
    /// An instance of an allowed class (`argparse.Namespace`, `torch.device`) kept as data: its pickled state.
    Record {
        class: String,
        state: Box<Value>,
    },
    /// An allowed name referenced as a value rather than called (e.g. the dtype `torch.float16`).
    Global(String),
}

impl Value {
    /// Python's name for the kind of value, for error messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::None => "None",
            Value::Bool(_) => "bool",
            Value::Int(_) => "int",
            Value::Float(_) => "float",
            Value::Str(_) => "str",
            Value::Bytes(_) => "bytes",
            Value::List(_) => "list",
            Value::Tuple(_) => "tuple",
            Value::Dict(_) => "dict",
            Value::Tensor(_) => "tensor",
            Value::Record { .. } => "object",
            Value::Global(_) => "global",
        }
    }

    /// The entry named `key` of a dict, or the attribute of a record (its state dict). Python keeps the last of
    /// repeated keys, so do we.
    pub fn get(&self, key: &str) -> Option<&Value> {
        match self {
            Value::Dict(pairs) => pairs.iter().rev().find(|(k, _)| matches!(k, Value::Str(s) if s == key)).map(|(_, v)| v),
            Value::Record { state, .. } => state.get(key),
            _ => None,
        }
    }

    /// The pairs of a non-empty name -> tensor dict, in file order.
    pub fn as_tensor_map(&self) -> Option<Vec<(&str, &TensorRef)>> {
        let Value::Dict(pairs) = self else { return None };
        let out: Option<Vec<_>> = pairs
            .iter()
            .map(|(k, v)| match (k, v) {
                (Value::Str(k), Value::Tensor(t)) => Some((k.as_str(), t)),
                _ => None,
            })
            .collect();
        out.filter(|v| !v.is_empty())
    }
}

/// A tensor stored in the archive: a strided view of one storage entry.
#[derive(Clone)]
pub struct TensorRef {
    storage: Arc<Storage>,
    offset: i64,
    size: Vec<i64>,
    stride: Vec<i64>,
}

#[derive(Debug)]
struct Storage {
    archive: Arc<Archive>,
    /// The zip entry (`<top>/data/<key>`), for messages.
    entry: String,
    /// Absolute file offset of the entry's first byte.
    start: u64,
    kind: Kind,
    numel: i64,
}

impl std::fmt::Debug for TensorRef {
    // The archive's whole entry table is not worth printing with every tensor.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tensor({:?} {:?} in {})", self.storage.kind, self.size, self.storage.entry)
    }
}

impl TensorRef {
    pub fn kind(&self) -> Kind {
        self.storage.kind
    }

    pub fn size(&self) -> &[i64] {
        &self.size
    }

    /// Reads the tensor onto the CPU as a contiguous tensor. Only the bytes the view covers are read, so many
    /// views of one large storage do not read it many times.
    pub fn load(&self) -> Result<Tensor> {
        let s = &self.storage;
        let kind = s.kind;
        let Some(extent) = extent(&self.size, &self.stride) else {
            return Tensor::f_zeros(self.size.as_slice(), (kind, tch::Device::Cpu))
                .map_err(|e| s.archive.err(format!("{}: cannot build empty tensor: {}", s.entry, first_line(e))));
        };
        let elt = kind.elt_size_in_bytes() as u64;
        // Bounds were checked against the storage when the tensor was unpickled.
        let bytes = s.archive.read_at(s.start + self.offset as u64 * elt, (extent as u64 * elt) as usize, &s.entry)?;
        let flat = Tensor::f_from_data_size(&bytes, &[extent], kind)
            .map_err(|e| s.archive.err(format!("{}: cannot build tensor: {}", s.entry, first_line(e))))?;
        let view = flat
            .f_as_strided(self.size.as_slice(), self.stride.as_slice(), 0)
            .map_err(|e| s.archive.err(format!("{}: bad view: {}", s.entry, first_line(e))))?;
        Ok(view.contiguous())
    }
}

/// Elements spanned by a strided view from its first element, or `None` for an empty view. Sizes and strides
/// are known non-negative and the result known to fit (see `Vm::rebuild_tensor`).
fn extent(size: &[i64], stride: &[i64]) -> Option<i64> {
    if size.contains(&0) {
        return None;
    }
    Some(1 + size.iter().zip(stride).map(|(&n, &s)| (n - 1) * s).sum::<i64>())
}

/// Reads a `torch.save` file (the zip format of torch >= 1.6, or the legacy pickle stream)
/// without running any of it. Every problem with the file is an input error naming it.
pub fn read(path: &Path) -> Result<Value> {
    let archive = Arc::new(Archive::open(path)?);
    let (root, pickle_len) = if archive.legacy {
        read_legacy(&archive)?
    } else {
        let pkl = archive.entry_bytes(&format!("{}data.pkl", archive.prefix))?;
        let mut vm = Vm::new(&archive, &pkl, 0);
        (vm.run()?, pkl.len())
    };
    let mut budget = convert_budget(pickle_len);
    convert(&root, 0, &mut budget).map_err(|msg| archive.err(format!("{}: {msg}", archive.pickle_name())))
}

/// What the legacy format starts with: a pickle (protocol 2) of torch's magic number 0x1950a86a20f9469cfc6c.
const LEGACY_MAGIC: &[u8] = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19.";

/// torch.save before 1.6 (and with `_use_new_zipfile_serialization=False`): pickles of the magic number, the
/// protocol version (1001) and system information, then the object itself, then the list of storage keys, and
/// then each storage in that order as an element count (u64) followed by its bytes. Where a storage lies is
/// known only after the object's pickle, so the object is read twice: first for the storages' types and
/// sizes, then with their offsets. Returns the object and the length of its pickle.
fn read_legacy(archive: &Arc<Archive>) -> Result<(Obj, usize)> {
    // SAFETY: a read-only map of a file we do not write, dropped before returning (tensors read it by offset).
    let map = unsafe { memmap2::Mmap::map(&archive.file) }.map_err(|e| archive.err(format!("cannot map: {e}")))?;
    let data = &map[..];
    if !data.starts_with(LEGACY_MAGIC) {
        return Err(archive.err("not a torch.save checkpoint (neither a zip archive nor torch's legacy pickle stream)"));
    }
    let mut vm = Vm::new(archive, data, LEGACY_MAGIC.len());
    match vm.run()? {
        Obj::Int(1001) => {}
        _ => return Err(vm.fail("unsupported legacy protocol version (expected 1001)")),
    }
    if let Obj::Dict(info) = &vm.run()? {
        if info.borrow().iter().any(|(k, v)| matches!((k, v), (Obj::Str(k), Obj::Bool(false)) if &**k == "little_endian")) {
            return Err(vm.fail("a big-endian checkpoint; only little-endian ones are read"));
        }
    }
    let object_at = vm.pos;
    vm.declared = Some(HashMap::new());
    vm.run()?;
    let declared = vm.declared.take().expect("set above");
    let keys = vm.run()?;
    let Obj::List(keys) = &keys else {
        return Err(vm.fail("expected the list of storage keys"));
    };
    let mut at = vm.pos as u64;
    let mut starts = HashMap::new();
    for key in keys.borrow().iter() {
        let Obj::Str(key) = key else { return Err(vm.fail("a storage key is not a string")) };
        let entry = format!("data/{key}");
        let Some(&(kind, numel)) = declared.get(&entry) else {
            return Err(archive.err(format!("storage {} is not used by any tensor", key.escape_debug())));
        };
        let count = u64::from_le_bytes(archive.read_at(at, 8, &entry)?.try_into().expect("8 bytes"));
        if count != numel as u64 {
            return Err(archive.err(format!("{}: {count} elements stored, {numel} declared", entry.escape_debug())));
        }
        // Counts come from the file: the arithmetic is checked, never wrapped.
        let size = count.checked_mul(kind.elt_size_in_bytes() as u64);
        let end = size.and_then(|n| at.checked_add(8)?.checked_add(n)).filter(|&end| end <= archive.len);
        let (Some(size), Some(end)) = (size, end) else {
            return Err(archive.err(format!("{}: truncated file (storage of {count} {kind:?} elements)", entry.escape_debug())));
        };
        starts.insert(entry, (at + 8, size));
        at = end;
    }
    let mut vm = Vm::new(archive, data, object_at);
    vm.starts = starts;
    let root = vm.run()?;
    Ok((root, vm.pos - object_at))
}

/// The tensors of one state dict in the checkpoint `v` read from `file`, in file order, with the `module.` (DDP)
/// and `_orig_mod.` (torch.compile) prefixes removed from their names.
///
/// `key` picks a top-level entry (`model`, `ema`); without one, a file that is itself a state dict gives that,
/// and a training checkpoint gives its `model`.
pub fn state_dict(file: &Path, v: &Value, key: Option<&str>) -> Result<Vec<(String, Tensor)>> {
    let f = file.display();
    let (label, sd) = match key {
        None if v.as_tensor_map().is_some() => ("the top level".to_string(), v),
        _ => {
            let k = key.unwrap_or("model");
            let Some(sd) = v.get(k) else {
                let keys = top_keys(v);
                crate::bail_input!("{f}: no key '{k}' at the top level (it has: {keys})");
            };
            (format!("key '{k}'"), sd)
        }
    };
    let Some(map) = sd.as_tensor_map() else {
        let why = match sd {
            Value::Dict(pairs) if pairs.is_empty() => "it is empty".to_string(),
            Value::Dict(pairs) => match pairs.iter().find(|(k, v)| !matches!((k, v), (Value::Str(_), Value::Tensor(_)))) {
                Some((Value::Str(k), v)) => format!("entry '{k}' is a {}", v.type_name()),
                Some((k, _)) => format!("it has a {} key", k.type_name()),
                None => unreachable!("a dict of names to tensors is a tensor map"),
            },
            other => format!("it is a {}", other.type_name()),
        };
        crate::bail_input!("{f}: {label} is not a name -> tensor mapping ({why})");
    };
    let mut seen: HashMap<String, &str> = HashMap::new();
    let mut out = Vec::with_capacity(map.len());
    for (name, t) in map {
        let short = strip_prefixes(name);
        if let Some(first) = seen.insert(short.to_string(), name) {
            crate::bail_input!("{f}: {label}: tensors '{first}' and '{name}' are both '{short}' without their module./_orig_mod. prefix");
        }
        out.push((short.to_string(), t.load()?));
    }
    Ok(out)
}

fn strip_prefixes(mut name: &str) -> &str {
    while let Some(rest) = name.strip_prefix("module.").or_else(|| name.strip_prefix("_orig_mod.")) {
        name = rest;
    }
    name
}

fn top_keys(v: &Value) -> String {
    let Value::Dict(pairs) = v else { return format!("no keys, it is a {}", v.type_name()) };
    let mut names: Vec<String> = pairs
        .iter()
        .map(|(k, _)| match k {
            Value::Str(s) => s.escape_debug().to_string(),
            other => other.type_name().to_string(),
        })
        .take(12)
        .collect();
    if pairs.len() > names.len() {
        names.push("...".into());
    }
    if names.is_empty() {
        "no keys".into()
    } else {
        names.join(", ")
    }
}

// ---------------------------------------------------------------------------------------------------------------
// The zip container. torch.save writes every entry STORED (uncompressed, 64-byte aligned) so tensors can be mapped;
// we need only the central directory and the local headers, not a general zip library.

const LOCAL_SIG: &[u8; 4] = b"PK\x03\x04";
const CENTRAL_SIG: &[u8; 4] = b"PK\x01\x02";
const EOCD_SIG: &[u8; 4] = b"PK\x05\x06";
const ZIP64_LOCATOR_SIG: &[u8; 4] = b"PK\x06\x07";
const ZIP64_EOCD_SIG: &[u8; 4] = b"PK\x06\x06";

#[derive(Debug)]
struct Archive {
    path: PathBuf,
    file: File,
    len: u64,
    entries: HashMap<String, Entry>,
    /// The archive's single top folder with its slash (`archive/`, or the file's stem).
    prefix: String,
    /// Not a zip: the pickle stream torch.save wrote before 1.6 (see `read_legacy`).
    legacy: bool,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    local_header: u64,
    size: u64,
    compressed_size: u64,
    method: u16,
    flags: u16,
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

impl Archive {
    /// The pickle's name in messages.
    fn pickle_name(&self) -> &'static str {
        if self.legacy {
            "pickle"
        } else {
            "data.pkl"
        }
    }

    fn err(&self, msg: impl std::fmt::Display) -> anyhow::Error {
        bad_input(format!("{}: {msg}", self.path.display()))
    }

    /// `len` bytes at `offset`; running past the end of the file is an input error (a truncated file).
    fn read_at(&self, offset: u64, len: usize, what: &str) -> Result<Vec<u8>> {
        if offset.checked_add(len as u64).is_none_or(|end| end > self.len) {
            return Err(self.err(format!("{what}: truncated file (needs bytes {offset}..+{len}, the file has {})", self.len)));
        }
        let mut buf = vec![0u8; len];
        self.file.read_exact_at(&mut buf, offset).map_err(|e| self.err(format!("{what}: cannot read: {e}")))?;
        Ok(buf)
    }

    fn open(path: &Path) -> Result<Archive> {
        let shown = path.display();
        let file = File::open(path).map_err(|e| bad_input(format!("{shown}: cannot open: {e}")))?;
        let len = file.metadata().map_err(|e| bad_input(format!("{shown}: cannot stat: {e}")))?.len();
        let mut a = Archive { path: path.to_path_buf(), file, len, entries: HashMap::new(), prefix: String::new(), legacy: false };
        let head = a.read_at(0, len.min(4) as usize, "header")?;
        if head.as_slice() != LOCAL_SIG {
            // Before 1.6 torch.save wrote a bare pickle stream (it starts with the PROTO opcode).
            if head.first() == Some(&0x80) {
                a.legacy = true;
                return Ok(a);
            }
            return Err(a.err("not a torch.save checkpoint (expected a zip archive)"));
        }
        a.read_directory()?;
        a.prefix = a.find_prefix()?;
        let byteorder = format!("{}byteorder", a.prefix);
        if a.entries.contains_key(&byteorder) {
            let bytes = a.entry_bytes(&byteorder)?;
            let order = String::from_utf8_lossy(&bytes).trim().to_string();
            if order != "little" {
                return Err(a.err(format!("byteorder is '{}'; only little-endian checkpoints are read", order.escape_debug())));
            }
        }
        Ok(a)
    }

    fn read_directory(&mut self) -> Result<()> {
        let truncated = "not a complete zip archive (no end-of-central-directory record; truncated?)";
        // The EOCD record is 22 bytes plus a comment of at most 64 KiB, and the zip64 locator sits right before it.
        let tail_len = self.len.min(22 + 0xFFFF + 20) as usize;
        let tail_start = self.len - tail_len as u64;
        let tail = self.read_at(tail_start, tail_len, "zip directory")?;
        let Some(p) = (0..tail.len().saturating_sub(21)).rev().find(|&p| &tail[p..p + 4] == EOCD_SIG) else {
            return Err(self.err(truncated));
        };
        let eocd = &tail[p..p + 22];
        let (mut count, mut cd_size, mut cd_offset) = (u16_at(eocd, 10) as u64, u32_at(eocd, 12) as u64, u32_at(eocd, 16) as u64);
        if p >= 20 && &tail[p - 20..p - 16] == ZIP64_LOCATOR_SIG {
            let at = u64_at(&tail, p - 20 + 8);
            let rec = self.read_at(at, 56, "zip64 directory record")?;
            if &rec[..4] != ZIP64_EOCD_SIG {
                return Err(self.err("corrupt zip archive (bad zip64 directory record)"));
            }
            (count, cd_size, cd_offset) = (u64_at(&rec, 32), u64_at(&rec, 40), u64_at(&rec, 48));
        } else if count == 0xFFFF || cd_size == 0xFFFF_FFFF || cd_offset == 0xFFFF_FFFF {
            return Err(self.err("corrupt zip archive (zip64 sizes without a zip64 record)"));
        }
        // Each central header is at least 46 bytes: a count beyond that is corrupt, and it bounds our allocation.
        if cd_size > self.len || count > cd_size / 46 {
            return Err(self.err("corrupt zip archive (central directory larger than the file)"));
        }
        let cd = self.read_at(cd_offset, cd_size as usize, "zip central directory")?;
        let corrupt = |what: &str| self.err(format!("corrupt zip archive ({what})"));
        let mut pos = 0usize;
        let mut entries = HashMap::with_capacity(count as usize);
        for _ in 0..count {
            if pos + 46 > cd.len() || &cd[pos..pos + 4] != CENTRAL_SIG {
                return Err(corrupt("bad central directory header"));
            }
            let h = &cd[pos..pos + 46];
            let (name_len, extra_len, comment_len) = (u16_at(h, 28) as usize, u16_at(h, 30) as usize, u16_at(h, 32) as usize);
            let end = pos + 46 + name_len + extra_len + comment_len;
            if end > cd.len() {
                return Err(corrupt("central directory entry runs past its end"));
            }
            let name = String::from_utf8_lossy(&cd[pos + 46..pos + 46 + name_len]).into_owned();
            let extra = &cd[pos + 46 + name_len..pos + 46 + name_len + extra_len];
            let mut e = Entry {
                flags: u16_at(h, 8),
                method: u16_at(h, 10),
                compressed_size: u32_at(h, 20) as u64,
                size: u32_at(h, 24) as u64,
                local_header: u32_at(h, 42) as u64,
            };
            // Entries past 4 GiB keep their real sizes and offset in the zip64 extra field, in this order,
            // each present only when the 32-bit field is saturated.
            if e.size == 0xFFFF_FFFF || e.compressed_size == 0xFFFF_FFFF || e.local_header == 0xFFFF_FFFF {
                let mut z = zip64_extra(extra).ok_or_else(|| corrupt(&format!("entry {} lacks its zip64 sizes", name.escape_debug())))?;
                for field in [&mut e.size, &mut e.compressed_size, &mut e.local_header] {
                    if *field == 0xFFFF_FFFF {
                        if z.len() < 8 {
                            return Err(corrupt(&format!("entry {} has a short zip64 field", name.escape_debug())));
                        }
                        *field = u64_at(z, 0);
                        z = &z[8..];
                    }
                }
            }
            entries.insert(name, e);
            pos = end;
        }
        self.entries = entries;
        Ok(())
    }

    /// The archive's top folder: torch.save puts everything under one folder whose name is free.
    fn find_prefix(&self) -> Result<String> {
        let mut tops: Vec<&str> = self
            .entries
            .keys()
            .filter_map(|n| n.strip_suffix("data.pkl").filter(|p| p.ends_with('/') && p.matches('/').count() == 1))
            .collect();
        tops.sort();
        match tops.as_slice() {
            [one] => Ok(one.to_string()),
            [] => Err(self.err("not a torch.save checkpoint (no <folder>/data.pkl in the zip archive)")),
            _ => Err(self.err(format!("several data.pkl in the zip archive ({})", tops.join(", ").escape_debug()))),
        }
    }

    /// File offset and size of an entry's bytes.
    fn entry_span(&self, name: &str) -> Result<(u64, u64)> {
        let shown = name.escape_debug();
        let e = *self.entries.get(name).ok_or_else(|| self.err(format!("zip archive has no entry {shown}")))?;
        if e.method != 0 {
            return Err(self.err(format!(
                "entry {shown} is compressed (zip method {}); torch.save stores entries uncompressed, re-save it with torch.save",
                e.method
            )));
        }
        if e.flags & 1 != 0 {
            return Err(self.err(format!("entry {shown} is encrypted")));
        }
        if e.compressed_size != e.size {
            return Err(self.err(format!("corrupt zip archive (stored entry {shown} has two sizes)")));
        }
        let h = self.read_at(e.local_header, 30, &format!("entry {shown}"))?;
        if &h[..4] != LOCAL_SIG {
            return Err(self.err(format!("corrupt zip archive (bad local header of {shown})")));
        }
        let start = e.local_header + 30 + u16_at(&h, 26) as u64 + u16_at(&h, 28) as u64;
        if start.checked_add(e.size).is_none_or(|end| end > self.len) {
            return Err(self.err(format!("entry {shown}: truncated file (its {} bytes run past the end)", e.size)));
        }
        Ok((start, e.size))
    }

    fn entry_bytes(&self, name: &str) -> Result<Vec<u8>> {
        let (start, size) = self.entry_span(name)?;
        self.read_at(start, size as usize, name)
    }
}

/// The body of the zip64 extended-information extra field (header id 1), if present.
fn zip64_extra(mut extra: &[u8]) -> Option<&[u8]> {
    while extra.len() >= 4 {
        let (id, len) = (u16_at(extra, 0), u16_at(extra, 2) as usize);
        let body = extra.get(4..4 + len)?;
        if id == 1 {
            return Some(body);
        }
        extra = &extra[4 + len..];
    }
    None
}

// ---------------------------------------------------------------------------------------------------------------
// The pickle machine.

/// Names a pickle may use, each with a fixed meaning here. Anything else is refused.
const ALLOWED: &[&str] = &[
    "collections.OrderedDict",
    "torch._utils._rebuild_tensor_v2",
    "torch._utils._rebuild_parameter",
    "torch._utils._rebuild_parameter_with_state",
    "torch.FloatStorage",
    "torch.DoubleStorage",
    "torch.HalfStorage",
    "torch.BFloat16Storage",
    "torch.LongStorage",
    "torch.IntStorage",
    "torch.ShortStorage",
    "torch.CharStorage",
    "torch.ByteStorage",
    "torch.BoolStorage",
    "torch.float32",
    "torch.float64",
    "torch.float16",
    "torch.bfloat16",
    "torch.int64",
    "torch.int32",
    "torch.int16",
    "torch.int8",
    "torch.uint8",
    "torch.bool",
    "torch.device",
    "argparse.Namespace",
    "_codecs.encode",
];

fn storage_kind(name: &str) -> Option<Kind> {
    Some(match name {
        "torch.FloatStorage" => Kind::Float,
        "torch.DoubleStorage" => Kind::Double,
        "torch.HalfStorage" => Kind::Half,
        "torch.BFloat16Storage" => Kind::BFloat16,
        "torch.LongStorage" => Kind::Int64,
        "torch.IntStorage" => Kind::Int,
        "torch.ShortStorage" => Kind::Int16,
        "torch.CharStorage" => Kind::Int8,
        "torch.ByteStorage" => Kind::Uint8,
        "torch.BoolStorage" => Kind::Bool,
        _ => return None,
    })
}

/// Values on the machine's stack. Python objects are shared and mutated after being memoized (a dict is memoized
/// empty, then filled), so containers are shared cells here and become plain `Value`s once the pickle has run.
#[derive(Clone, Default)]
enum Obj {
    #[default]
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(Rc<str>),
    Bytes(Rc<[u8]>),
    Tuple(Rc<Vec<Obj>>),
    List(Rc<RefCell<Vec<Obj>>>),
    Dict(Rc<RefCell<Pairs>>),
    Record(Rc<(String, RefCell<Obj>)>),
    Global(Rc<str>),
    Storage(Arc<Storage>),
    Tensor(TensorRef),
}

type Pairs = Vec<(Obj, Obj)>;

impl Obj {
    fn type_name(&self) -> &'static str {
        match self {
            Obj::None => "None",
            Obj::Bool(_) => "bool",
            Obj::Int(_) => "int",
            Obj::Float(_) => "float",
            Obj::Str(_) => "str",
            Obj::Bytes(_) => "bytes",
            Obj::Tuple(_) => "tuple",
            Obj::List(_) => "list",
            Obj::Dict(_) => "dict",
            Obj::Record(_) => "object",
            Obj::Global(_) => "global",
            Obj::Storage(_) => "storage",
            Obj::Tensor(_) => "tensor",
        }
    }
}

/// Frees a graph of `Obj`s without recursion: a hostile pickle can nest containers deeper than the Rust stack,
/// and any `Obj` may be the last owner of such a chain (a REDUCE's refused arguments, a popped value), so every
/// drop moves the children it solely owns onto a work list instead of dropping them inside itself.
impl Drop for Obj {
    fn drop(&mut self) {
        let mut work = Vec::new();
        take_children(self, &mut work);
        while let Some(mut o) = work.pop() {
            take_children(&mut o, &mut work);
            // `o` now owns no children: its own drop ends at once.
        }
    }
}

/// Moves the children `o` is the only owner of into `work` (shared ones are freed by their last owner).
fn take_children(o: &mut Obj, work: &mut Vec<Obj>) {
    match o {
        Obj::Tuple(rc) => {
            if let Some(v) = Rc::get_mut(rc) {
                work.append(v);
            }
        }
        Obj::List(rc) => {
            if let Some(v) = Rc::get_mut(rc) {
                work.append(v.get_mut());
            }
        }
        Obj::Dict(rc) => {
            if let Some(v) = Rc::get_mut(rc) {
                for (k, v) in v.get_mut().drain(..) {
                    work.push(k);
                    work.push(v);
                }
            }
        }
        Obj::Record(rc) => {
            if let Some(r) = Rc::get_mut(rc) {
                work.push(std::mem::take(r.1.get_mut()));
            }
        }
        _ => {}
    }
}

/// Limits on the plain `Value` built from the machine's graph: shared objects are copied, so a small pickle
/// could otherwise describe an exponentially large (or cyclic) value: 40 memoized pairs of the previous pair
/// are 2^40 values. Without sharing, each value costs at least one opcode byte, so a budget proportional to
/// the pickle (in bytes of `Value`s and text) reads every honest file and refuses such a bomb after a few MiB.
const MAX_DEPTH: usize = 256;

fn convert_budget(pickle_len: usize) -> usize {
    (16 << 20) + pickle_len.saturating_mul(2 * std::mem::size_of::<Value>())
}

fn convert(o: &Obj, depth: usize, budget: &mut usize) -> std::result::Result<Value, String> {
    if depth > MAX_DEPTH {
        return Err(format!("containers nested more than {MAX_DEPTH} deep (or recursive)"));
    }
    let cost = std::mem::size_of::<Value>()
        + match o {
            Obj::Str(s) => s.len(),
            Obj::Bytes(b) => b.len(),
            Obj::Record(r) => r.0.len(),
            _ => 0,
        };
    *budget = budget.checked_sub(cost).ok_or("the pickled value is too large")?;
    let all =
        |items: &[Obj], budget: &mut usize| items.iter().map(|i| convert(i, depth + 1, budget)).collect::<std::result::Result<Vec<_>, _>>();
    Ok(match o {
        Obj::None => Value::None,
        Obj::Bool(b) => Value::Bool(*b),
        Obj::Int(i) => Value::Int(*i),
        Obj::Float(f) => Value::Float(*f),
        Obj::Str(s) => Value::Str(s.to_string()),
        Obj::Bytes(b) => Value::Bytes(b.to_vec()),
        Obj::Tuple(t) => Value::Tuple(all(t, budget)?),
        Obj::List(l) => Value::List(all(&l.borrow(), budget)?),
        Obj::Dict(d) => Value::Dict(
            d.borrow()
                .iter()
                .map(|(k, v)| Ok((convert(k, depth + 1, budget)?, convert(v, depth + 1, budget)?)))
                .collect::<std::result::Result<_, String>>()?,
        ),
        Obj::Record(r) => Value::Record { class: r.0.clone(), state: Box::new(convert(&r.1.borrow(), depth + 1, budget)?) },
        Obj::Global(g) => Value::Global(g.to_string()),
        Obj::Storage(_) => return Err("a storage outside a tensor is not supported".into()),
        Obj::Tensor(t) => Value::Tensor(t.clone()),
    })
}

struct Vm<'a> {
    archive: Arc<Archive>,
    data: &'a [u8],
    pos: usize,
    stack: Vec<Obj>,
    /// Stack heights at each open MARK; ops may not pop below the innermost one (as in CPython).
    marks: Vec<usize>,
    memo: HashMap<u32, Obj>,
    /// Storage entry -> (file offset, size in bytes), looked up once per storage shared by several views.
    starts: HashMap<String, (u64, u64)>,
    /// First pass over a legacy file: storage entry -> (type, elements) as declared, offsets not yet known.
    declared: Option<HashMap<String, (Kind, i64)>>,
}

impl<'a> Vm<'a> {
    fn new(archive: &Arc<Archive>, data: &'a [u8], pos: usize) -> Vm<'a> {
        let (stack, marks, memo, starts) = (Vec::new(), Vec::new(), HashMap::new(), HashMap::new());
        Vm { archive: archive.clone(), data, pos, stack, marks, memo, starts, declared: None }
    }

    /// An input error at the current position of the pickle.
    fn fail(&self, msg: impl std::fmt::Display) -> anyhow::Error {
        self.archive.err(format!("{} byte {}: {msg}", self.archive.pickle_name(), self.pos))
    }

    fn take(&mut self, n: u64) -> Result<&[u8]> {
        let start = self.pos;
        let avail = (self.data.len() - start) as u64;
        if n > avail {
            return Err(self.fail(format!("truncated pickle (needs {n} more bytes, {avail} left)")));
        }
        self.pos += n as usize;
        Ok(&self.data[start..self.pos])
    }

    fn byte(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }

    fn le<const N: usize>(&mut self) -> Result<[u8; N]> {
        Ok(self.take(N as u64)?.try_into().expect("N bytes"))
    }

    fn text(&mut self, n: u64) -> Result<Obj> {
        let at = self.pos;
        let bytes = self.take(n)?;
        match std::str::from_utf8(bytes) {
            Ok(s) => Ok(Obj::Str(s.into())),
            Err(_) => Err(self.archive.err(format!("{} byte {at}: string is not UTF-8", self.archive.pickle_name()))),
        }
    }

    fn bytes(&mut self, n: u64) -> Result<Obj> {
        Ok(Obj::Bytes(self.take(n)?.into()))
    }

    /// One newline-terminated name of a GLOBAL opcode.
    fn line(&mut self) -> Result<String> {
        let rest = &self.data[self.pos..];
        let Some(n) = rest.iter().take(256).position(|&b| b == b'\n') else {
            return Err(self.fail("GLOBAL name without an end of line within 256 bytes"));
        };
        let s = String::from_utf8_lossy(&rest[..n]).into_owned();
        self.pos += n + 1;
        Ok(s)
    }

    fn floor(&self) -> usize {
        self.marks.last().copied().unwrap_or(0)
    }

    fn pop(&mut self) -> Result<Obj> {
        if self.stack.len() <= self.floor() {
            return Err(self.fail("stack underflow"));
        }
        Ok(self.stack.pop().expect("checked above"))
    }

    fn top(&self) -> Result<&Obj> {
        if self.stack.len() <= self.floor() {
            return Err(self.fail("stack underflow"));
        }
        Ok(self.stack.last().expect("checked above"))
    }

    fn pop_mark(&mut self) -> Result<Vec<Obj>> {
        let m = self.marks.pop().ok_or_else(|| self.fail("no MARK to close"))?;
        Ok(self.stack.split_off(m))
    }

    fn memo_put(&mut self, i: u32) -> Result<()> {
        let v = self.top()?.clone();
        self.memo.insert(i, v);
        Ok(())
    }

    fn memo_get(&mut self, i: u32) -> Result<()> {
        let v = self.memo.get(&i).cloned().ok_or_else(|| self.fail(format!("memo slot {i} is empty")))?;
        self.stack.push(v);
        Ok(())
    }

    fn list_top(&self) -> Result<Rc<RefCell<Vec<Obj>>>> {
        match self.top()? {
            Obj::List(l) => Ok(l.clone()),
            other => Err(self.fail(format!("cannot append to a {}", other.type_name()))),
        }
    }

    fn dict_top(&self) -> Result<Rc<RefCell<Pairs>>> {
        match self.top()? {
            Obj::Dict(d) => Ok(d.clone()),
            other => Err(self.fail(format!("cannot set items of a {}", other.type_name()))),
        }
    }

    fn pairs(&self, items: Vec<Obj>) -> Result<Pairs> {
        if !items.len().is_multiple_of(2) {
            return Err(self.fail("odd number of items for a dict"));
        }
        let mut it = items.into_iter();
        Ok(std::iter::from_fn(|| Some((it.next()?, it.next()?))).collect())
    }

    /// An allowed name, split exactly as torch.save writes it: the module, then one attribute. Python's
    /// protocol 4 would also resolve a dotted attribute (`torch` + `_utils._rebuild_tensor_v2`, or
    /// `torch._utils` + `os.system` through a module's imports), so a name with a dot is refused whatever it
    /// spells: the allow-list then means exactly the objects it lists.
    fn global(&self, module: &str, name: &str) -> Result<Obj> {
        let full = format!("{module}.{name}");
        if !name.contains('.') && ALLOWED.contains(&full.as_str()) {
            return Ok(Obj::Global(full.into()));
        }
        let path = if name.contains('.') {
            format!(", attribute path {} of module {}", name.escape_debug(), module.escape_debug())
        } else {
            String::new()
        };
        Err(self.fail(format!("refuses to load global {}{path} (only tensors and plain containers are read)", full.escape_debug())))
    }

    fn run(&mut self) -> Result<Obj> {
        loop {
            let op = self.byte()?;
            match op {
                0x80 => {
                    let proto = self.byte()?;
                    if proto > 5 {
                        return Err(self.fail(format!("unsupported pickle protocol {proto}")));
                    }
                }
                // FRAME only announces how many bytes follow; they are read inline anyway.
                0x95 => {
                    self.take(8)?;
                }
                b'}' => self.stack.push(Obj::Dict(Default::default())),
                b']' => self.stack.push(Obj::List(Default::default())),
                b')' => self.stack.push(Obj::Tuple(Default::default())),
                b'(' => self.marks.push(self.stack.len()),
                b'0' => {
                    self.pop()?;
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'2' => {
                    let v = self.top()?.clone();
                    self.stack.push(v);
                }
                b'q' => {
                    let i = self.byte()?;
                    self.memo_put(i as u32)?
                }
                b'r' => {
                    let i = u32::from_le_bytes(self.le()?);
                    self.memo_put(i)?
                }
                0x94 => self.memo_put(self.memo.len() as u32)?,
                b'h' => {
                    let i = self.byte()?;
                    self.memo_get(i as u32)?
                }
                b'j' => {
                    let i = u32::from_le_bytes(self.le()?);
                    self.memo_get(i)?
                }
                b'X' => {
                    let n = u32::from_le_bytes(self.le()?);
                    let v = self.text(n as u64)?;
                    self.stack.push(v)
                }
                0x8c => {
                    let n = self.byte()?;
                    let v = self.text(n as u64)?;
                    self.stack.push(v)
                }
                0x8d => {
                    let n = u64::from_le_bytes(self.le()?);
                    let v = self.text(n)?;
                    self.stack.push(v)
                }
                b'B' => {
                    let n = u32::from_le_bytes(self.le()?);
                    let v = self.bytes(n as u64)?;
                    self.stack.push(v)
                }
                b'C' => {
                    let n = self.byte()?;
                    let v = self.bytes(n as u64)?;
                    self.stack.push(v)
                }
                0x8e => {
                    let n = u64::from_le_bytes(self.le()?);
                    let v = self.bytes(n)?;
                    self.stack.push(v)
                }
                b'J' => {
                    let v = i32::from_le_bytes(self.le()?);
                    self.stack.push(Obj::Int(v as i64))
                }
                b'K' => {
                    let v = self.byte()?;
                    self.stack.push(Obj::Int(v as i64))
                }
                b'M' => {
                    let v = u16::from_le_bytes(self.le()?);
                    self.stack.push(Obj::Int(v as i64))
                }
                0x8a => {
                    let n = self.byte()?;
                    self.long(n as u64)?
                }
                0x8b => {
                    let n = u32::from_le_bytes(self.le()?);
                    self.long(n as u64)?
                }
                b'G' => {
                    let v = f64::from_be_bytes(self.le()?);
                    self.stack.push(Obj::Float(v))
                }
                0x88 => self.stack.push(Obj::Bool(true)),
                0x89 => self.stack.push(Obj::Bool(false)),
                b'N' => self.stack.push(Obj::None),
                b't' => {
                    let items = self.pop_mark()?;
                    self.stack.push(Obj::Tuple(Rc::new(items)))
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    if self.stack.len() < self.floor() + n {
                        return Err(self.fail("stack underflow"));
                    }
                    let items = self.stack.split_off(self.stack.len() - n);
                    self.stack.push(Obj::Tuple(Rc::new(items)))
                }
                b'l' => {
                    let items = self.pop_mark()?;
                    self.stack.push(Obj::List(Rc::new(RefCell::new(items))))
                }
                b'a' => {
                    let v = self.pop()?;
                    self.list_top()?.borrow_mut().push(v)
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    self.list_top()?.borrow_mut().extend(items)
                }
                b'd' => {
                    let items = self.pop_mark()?;
                    let pairs = self.pairs(items)?;
                    self.stack.push(Obj::Dict(Rc::new(RefCell::new(pairs))))
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    self.dict_top()?.borrow_mut().push((k, v))
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    let pairs = self.pairs(items)?;
                    self.dict_top()?.borrow_mut().extend(pairs)
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    let g = self.global(&module, &name)?;
                    self.stack.push(g)
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    let (Obj::Str(module), Obj::Str(name)) = (&module, &name) else {
                        return Err(self.fail("STACK_GLOBAL needs two strings"));
                    };
                    let g = self.global(module, name)?;
                    self.stack.push(g)
                }
                b'R' => {
                    let args = self.pop()?;
                    let f = self.pop()?;
                    let v = self.reduce(&f, &args)?;
                    self.stack.push(v)
                }
                0x81 => {
                    let args = self.pop()?;
                    let cls = self.pop()?;
                    let v = self.newobj(&cls, &args)?;
                    self.stack.push(v)
                }
                b'b' => {
                    let state = self.pop()?;
                    self.build(state)?
                }
                b'Q' => {
                    let pid = self.pop()?;
                    let v = self.persistent(&pid)?;
                    self.stack.push(v)
                }
                b'.' => return self.pop(),
                other => {
                    self.pos -= 1;
                    return Err(self.fail(format!("unsupported pickle opcode {}", opcode_name(other))));
                }
            }
        }
    }

    /// LONG1/LONG4: a little-endian two's complement integer of `n` bytes; ours must fit in an i64.
    fn long(&mut self, n: u64) -> Result<()> {
        if n > 8 {
            return Err(self.fail(format!("integer of {n} bytes is too large")));
        }
        let b = self.take(n)?;
        let fill = if b.last().is_some_and(|&x| x & 0x80 != 0) { 0xFF } else { 0 };
        let mut buf = [fill; 8];
        buf[..b.len()].copy_from_slice(b);
        self.stack.push(Obj::Int(i64::from_le_bytes(buf)));
        Ok(())
    }

    fn callee<'o>(&self, f: &'o Obj, what: &str) -> Result<&'o str> {
        match f {
            Obj::Global(g) => Ok(g),
            other => Err(self.fail(format!("{what} of a {}, not a global", describe(other)))),
        }
    }

    fn args<'o>(&self, args: &'o Obj, name: &str) -> Result<&'o [Obj]> {
        match args {
            Obj::Tuple(t) => Ok(t),
            other => Err(self.fail(format!("arguments of {name} are a {}, not a tuple", other.type_name()))),
        }
    }

    /// REDUCE: a call, but only of allowed names, each interpreted here.
    fn reduce(&self, f: &Obj, args: &Obj) -> Result<Obj> {
        let name = self.callee(f, "call")?;
        let args = self.args(args, name)?;
        match (name, args) {
            ("torch._utils._rebuild_tensor_v2", _) => self.rebuild_tensor(args),
            ("torch._utils._rebuild_parameter" | "torch._utils._rebuild_parameter_with_state", [t @ Obj::Tensor(_), ..]) => Ok(t.clone()),
            ("collections.OrderedDict", []) => Ok(Obj::Dict(Default::default())),
            ("_codecs.encode", [Obj::Str(s), Obj::Str(enc)]) if matches!(&**enc, "latin1" | "latin-1") => {
                // Protocol 2 pickles bytes as the latin-1 text of their values.
                let bytes: Option<Vec<u8>> = s.chars().map(|c| u8::try_from(c).ok()).collect();
                bytes.map(|b| Obj::Bytes(b.into())).ok_or_else(|| self.fail("_codecs.encode of text outside latin-1"))
            }
            ("torch.device", [Obj::Str(_), ..]) => {
                Ok(Obj::Record(Rc::new((name.to_string(), RefCell::new(Obj::Tuple(Rc::new(args.to_vec())))))))
            }
            _ => Err(self.fail(format!("call of {name} with these {} arguments is not supported", args.len()))),
        }
    }

    /// NEWOBJ: `cls.__new__(cls, *args)`, for the classes whose instances are plain data.
    fn newobj(&self, cls: &Obj, args: &Obj) -> Result<Obj> {
        let name = self.callee(cls, "instance")?;
        self.args(args, name)?;
        match name {
            "argparse.Namespace" => Ok(Obj::Record(Rc::new((name.to_string(), RefCell::new(Obj::None))))),
            "collections.OrderedDict" => Ok(Obj::Dict(Default::default())),
            _ => Err(self.fail(format!("cannot make an instance of {name}"))),
        }
    }

    /// BUILD: what Python does for an object without `__setstate__` (none of ours has one): the state is a
    /// dict of attributes, or a pair (attributes, slot attributes) either of which may be None, and each
    /// BUILD adds to the attributes already set. Anything else would need code to interpret.
    fn build(&mut self, state: Obj) -> Result<()> {
        let parts: Vec<Rc<RefCell<Pairs>>> = match &state {
            Obj::Dict(d) => vec![d.clone()],
            Obj::Tuple(t) if t.len() == 2 && t.iter().all(|o| matches!(o, Obj::Dict(_) | Obj::None)) => {
                t.iter().filter_map(|o| if let Obj::Dict(d) = o { Some(d.clone()) } else { None }).collect()
            }
            other => return Err(self.fail(format!("BUILD with a {} state (only attribute dicts are read)", other.type_name()))),
        };
        match self.top()? {
            Obj::Record(r) if r.0 == "argparse.Namespace" => {
                let mut attrs = r.1.borrow_mut();
                if !matches!(*attrs, Obj::Dict(_)) {
                    *attrs = Obj::Dict(Default::default());
                }
                let Obj::Dict(d) = &*attrs else { unreachable!("set above") };
                // The record's dict is its own, never one the pickle can reach, so borrowing both is safe.
                for part in parts {
                    d.borrow_mut().extend(part.borrow().iter().cloned());
                }
                Ok(())
            }
            // A module's state_dict() is an OrderedDict carrying a `_metadata` attribute (module versions):
            // nothing we need.
            Obj::Dict(_) => Ok(()),
            other => Err(self.fail(format!("cannot set the state of a {}", describe(other)))),
        }
    }

    /// BINPERSID: torch.save's reference `('storage', storage_type, key, location, numel)` to `data/<key>`
    /// (the legacy format adds a sixth field, a view of another storage, which must be None).
    fn persistent(&mut self, pid: &Obj) -> Result<Obj> {
        let Obj::Tuple(t) = pid else {
            return Err(self.fail(format!("persistent id is a {}, not a tuple", pid.type_name())));
        };
        let fields = match t.as_slice() {
            [head @ .., Obj::None] if head.len() == 5 => head,
            all => all,
        };
        let [Obj::Str(tag), Obj::Global(ty), Obj::Str(key), Obj::Str(_location), Obj::Int(numel)] = fields else {
            return Err(self.fail("unsupported persistent id (expected ('storage', type, key, location, numel))"));
        };
        if &**tag != "storage" {
            return Err(self.fail(format!("unsupported persistent id '{}'", tag.escape_debug())));
        }
        let kind = storage_kind(ty).ok_or_else(|| self.fail(format!("{ty} is not a storage type")))?;
        let entry = format!("{}data/{key}", self.archive.prefix);
        if let Some(declared) = self.declared.as_mut() {
            // Legacy first pass: where the bytes lie is not known yet.
            if declared.insert(entry.clone(), (kind, *numel)).is_some_and(|d| d != (kind, *numel)) {
                return Err(self.fail(format!("storage {} declared twice with different types or sizes", key.escape_debug())));
            }
            return Ok(Obj::Storage(Arc::new(Storage { archive: self.archive.clone(), entry, start: 0, kind, numel: *numel })));
        }
        let (start, size) = match self.starts.get(&entry) {
            Some(&span) => span,
            None if self.archive.legacy => {
                return Err(self.fail(format!("storage {} is not in the file's list of storages", key.escape_debug())));
            }
            None => {
                let span = self.archive.entry_span(&entry)?;
                self.starts.insert(entry.clone(), span);
                span
            }
        };
        let numel = *numel;
        let need = u64::try_from(numel).ok().and_then(|n| n.checked_mul(kind.elt_size_in_bytes() as u64));
        if need.is_none_or(|need| need > size) {
            return Err(self
                .archive
                .err(format!("{}: storage of {numel} {kind:?} elements does not fit its {size} bytes", entry.escape_debug())));
        }
        Ok(Obj::Storage(Arc::new(Storage { archive: self.archive.clone(), entry, start, kind, numel })))
    }

    /// `_rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, backward_hooks[, metadata])`.
    /// Gradient flags, hooks and metadata do not change the values, so they are ignored.
    fn rebuild_tensor(&self, args: &[Obj]) -> Result<Obj> {
        let [Obj::Storage(storage), Obj::Int(offset), Obj::Tuple(size), Obj::Tuple(stride), ..] = args else {
            return Err(self.fail("_rebuild_tensor_v2 needs (storage, offset, size, stride, ...)"));
        };
        if !(6..=7).contains(&args.len()) {
            return Err(self.fail(format!("_rebuild_tensor_v2 with {} arguments", args.len())));
        }
        let ints = |t: &[Obj]| -> Option<Vec<i64>> {
            t.iter()
                .map(|o| match o {
                    Obj::Int(i) if *i >= 0 => Some(*i),
                    _ => None,
                })
                .collect()
        };
        let (Some(size), Some(stride)) = (ints(size), ints(stride)) else {
            return Err(self.fail("tensor size and stride must be non-negative integers"));
        };
        let entry = storage.entry.escape_debug();
        if size.len() != stride.len() || size.len() > 64 || *offset < 0 {
            return Err(self.archive.err(format!("{entry}: bad tensor view (size {size:?}, stride {stride:?}, offset {offset})")));
        }
        // libtorch refuses sizes whose product overflows even when one of them is 0 (it multiplies in order),
        // and `load` builds such an empty tensor: the product of the non-zero sizes must fit too.
        if size.iter().try_fold(1i64, |acc, &n| acc.checked_mul(n.max(1))).is_none() {
            return Err(self.archive.err(format!("{entry}: tensor size {size:?} overflows")));
        }
        // The view's last element, computed without overflow, must lie inside the storage.
        if !size.contains(&0) {
            let last = size.iter().zip(&stride).try_fold(*offset, |acc, (&n, &s)| (n - 1).checked_mul(s).and_then(|d| acc.checked_add(d)));
            if last.is_none_or(|last| last >= storage.numel) {
                return Err(self.archive.err(format!(
                    "{entry}: tensor view (size {size:?}, stride {stride:?}, offset {offset}) runs past its storage of {} elements",
                    storage.numel
                )));
            }
        }
        Ok(Obj::Tensor(TensorRef { storage: storage.clone(), offset: *offset, size, stride }))
    }
}

/// A value's kind for messages; an instance says its class.
fn describe(o: &Obj) -> String {
    match o {
        Obj::Record(r) => format!("{} object", r.0),
        Obj::Global(g) => format!("global {g}"),
        other => other.type_name().to_string(),
    }
}

/// The name pickletools gives an opcode, so a refusal says which one.
fn opcode_name(op: u8) -> String {
    let name = match op {
        b'I' => "INT",
        b'L' => "LONG",
        b'F' => "FLOAT",
        b'S' => "STRING",
        b'T' => "BINSTRING",
        b'U' => "SHORT_BINSTRING",
        b'V' => "UNICODE",
        b'P' => "PERSID",
        b'p' => "PUT",
        b'g' => "GET",
        b'i' => "INST",
        b'o' => "OBJ",
        0x82 => "EXT1",
        0x83 => "EXT2",
        0x84 => "EXT4",
        0x8f => "EMPTY_SET",
        0x90 => "ADDITEMS",
        0x91 => "FROZENSET",
        0x92 => "NEWOBJ_EX",
        0x96 => "BYTEARRAY8",
        0x97 => "NEXT_BUFFER",
        0x98 => "READONLY_BUFFER",
        _ => return format!("0x{op:02x}"),
    };
    format!("{name} (0x{op:02x})")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_are_stripped_repeatedly() {
        assert_eq!(strip_prefixes("module._orig_mod.blocks.0.attn.qkv.weight"), "blocks.0.attn.qkv.weight");
        assert_eq!(strip_prefixes("x_embedder.proj.weight"), "x_embedder.proj.weight");
        assert_eq!(strip_prefixes("modules.x"), "modules.x");
    }

    #[test]
    fn extent_of_views() {
        assert_eq!(extent(&[2, 4], &[4, 1]), Some(8));
        assert_eq!(extent(&[4, 6], &[1, 4]), Some(24));
        assert_eq!(extent(&[], &[]), Some(1));
        assert_eq!(extent(&[3, 0], &[1, 1]), None);
    }

    #[test]
    fn deep_nesting_is_freed_without_recursion() {
        let mut o = Obj::None;
        for _ in 0..1_000_000 {
            o = Obj::List(Rc::new(RefCell::new(vec![o])));
        }
        let mut budget = convert_budget(1 << 20);
        assert!(convert(&o, 0, &mut budget).is_err());
        drop(o);
    }
}
