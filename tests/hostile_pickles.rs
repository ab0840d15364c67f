//! The restricted torch.save reader against pickles built to run code or exhaust it: REDUCE of REDUCE results, BUILD on allowed classes, dotted or newline-split GLOBAL names, memo abuse, deep nesting and shared-value bombs, in zip and legacy files. Each is refused with one input-error line, nothing runs, nothing panics.

mod common;
#[path = "common/hostile.rs"]
mod hostile;

use common::{assert_bad_input, repo};
use hostile::{limited_bin, memory_bound, peak_of};
use reg::formats::torchfile::{self, Value};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

// ---------------------------------------------------------------------------------------------------------------
// Pickles written opcode by opcode (the names are pickletools'), for what Python's pickler never emits.

#[derive(Clone)]
struct Pickle(Vec<u8>);

impl Pickle {
    /// PROTO 2.
    fn new() -> Pickle {
        Pickle(vec![0x80, 2])
    }

    fn op(mut self, bytes: &[u8]) -> Pickle {
        self.0.extend_from_slice(bytes);
        self
    }

    /// GLOBAL: module and name, each ended by a newline.
    fn global(self, module: &str, name: &str) -> Pickle {
        self.op(b"c").op(module.as_bytes()).op(b"\n").op(name.as_bytes()).op(b"\n")
    }

    /// BINUNICODE.
    fn text(self, s: &str) -> Pickle {
        self.op(b"X").op(&(s.len() as u32).to_le_bytes()).op(s.as_bytes())
    }

    /// Two BINUNICODE and STACK_GLOBAL.
    fn stack_global(self, module: &str, name: &str) -> Pickle {
        self.text(module).text(name).op(&[0x93])
    }

    /// BININT.
    fn int(self, i: i32) -> Pickle {
        self.op(b"J").op(&i.to_le_bytes())
    }

    /// LONG1 of 8 bytes: an integer past BININT's 32 bits.
    fn long(self, i: i64) -> Pickle {
        self.op(&[0x8a, 8]).op(&i.to_le_bytes())
    }

    /// The persistent id of storage `0` (4 floats) and its BINPERSID, as torch.save writes it.
    fn storage(self) -> Pickle {
        self.op(b"(").text("storage").global("torch", "FloatStorage").text("0").text("cpu").int(4).op(b"tQ")
    }

    /// `_rebuild_tensor_v2(storage 0, 0, (4,), (1,), False, OrderedDict())`: a tensor.
    fn tensor(self) -> Pickle {
        self.global("torch._utils", "_rebuild_tensor_v2")
            .op(b"(")
            .storage()
            .int(0)
            .int(4)
            .op(&[0x85])
            .int(1)
            .op(&[0x85])
            .op(&[0x89])
            .global("collections", "OrderedDict")
            .op(b")R")
            .op(b"tR")
    }

    /// `_rebuild_tensor_v2(storage 0, offset, size, stride, False, OrderedDict())` with sizes and strides of
    /// any width.
    fn view(self, offset: i64, size: &[i64], stride: &[i64]) -> Pickle {
        let tuple = |mut p: Pickle, v: &[i64]| {
            p = p.op(b"(");
            for &x in v {
                p = p.long(x);
            }
            p.op(b"t")
        };
        let p = self.global("torch._utils", "_rebuild_tensor_v2").op(b"(").storage().long(offset);
        let p = tuple(tuple(p, size), stride);
        p.op(&[0x89]).global("collections", "OrderedDict").op(b")R").op(b"tR")
    }

    /// `{'model': <what `value` pushes>}` and STOP.
    fn as_model(value: impl FnOnce(Pickle) -> Pickle) -> Vec<u8> {
        value(Pickle::new().op(b"}").text("model")).op(b"s.").0
    }
}

/// The bytes of storage `0`: 1, 2, 3, 4 as f32.
fn storage_bytes() -> Vec<u8> {
    [1f32, 2., 3., 4.].iter().flat_map(|f| f.to_le_bytes()).collect()
}

/// `pickle` as `archive/data.pkl` of a zip archive the way torch.save lays it out, with storage `0`.
fn zip_file(dir: &Path, name: &str, pickle: &[u8]) -> PathBuf {
    let path = dir.join(format!("{name}.pt"));
    let mut z = zip::ZipWriter::new(std::fs::File::create(&path).unwrap());
    let stored = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    for (entry, bytes) in
        [("archive/data.pkl", pickle.to_vec()), ("archive/byteorder", b"little".to_vec()), ("archive/data/0", storage_bytes())]
    {
        z.start_file(entry, stored).unwrap();
        z.write_all(&bytes).unwrap();
    }
    z.finish().unwrap();
    path
}

/// `pickle` as the object of torch's legacy stream: the magic number, protocol 1001 and system information
/// pickles before it, the storage keys after it, and storage `0` if the pickle refers to it (the reader
/// refuses a storage no tensor uses).
fn legacy_file(dir: &Path, name: &str, pickle: &[u8]) -> PathBuf {
    let path = dir.join(format!("{name}-legacy.pt"));
    let mut b = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19.".to_vec();
    b.extend(b"\x80\x02M\xe9\x03.");
    b.extend(Pickle::new().op(b"}").text("little_endian").op(&[0x88]).op(b"s.").0);
    b.extend(pickle);
    if pickle.windows(12).any(|w| w == b"FloatStorage") {
        b.extend(Pickle::new().op(b"(").text("0").op(b"l.").0);
        b.extend(4u64.to_le_bytes());
        b.extend(storage_bytes());
    } else {
        b.extend(Pickle::new().op(b"].").0);
    }
    std::fs::write(&path, b).unwrap();
    path
}

/// What `reg-ddp import` does with a file: read it, take its model state dict.
fn import(path: &Path) -> anyhow::Result<Value> {
    let v = torchfile::read(path)?;
    torchfile::state_dict(path, &v, None)?;
    Ok(v)
}

/// `pickle` in both containers is refused: an input error on one line naming the file and every needle,
/// with no more memory than the file's size justifies.
#[track_caller]
fn refused(dir: &Path, name: &str, pickle: &[u8], needles: &[&str]) {
    for path in [zip_file(dir, name, pickle), legacy_file(dir, name, pickle)] {
        let len = std::fs::metadata(&path).unwrap().len() as usize;
        let (result, peak) = peak_of(|| import(&path));
        let e = result.err().unwrap_or_else(|| panic!("{}: read", path.display()));
        let msg = format!("{e:#}");
        assert!(reg::error::is_input_error(&e), "{name}: not an input error: {msg}");
        assert!(!msg.contains('\n'), "{name}: more than one line: {msg}");
        let file = path.file_name().unwrap().to_str().unwrap();
        for n in std::iter::once(&file).chain(needles) {
            assert!(msg.contains(n), "{name}: {n:?} missing from: {msg}");
        }
        assert!(peak <= memory_bound(len), "{name}: {peak} bytes held reading {len} bytes");
    }
}

/// The same through the binary (under a limited address space): exit 2, one line, no output file.
fn refused_by_binary(path: &Path, needles: &[&str]) {
    let out = path.with_extension("safetensors");
    let o = limited_bin().arg("import").arg(path).arg("--out").arg(&out).output().unwrap();
    let file = path.file_name().unwrap().to_str().unwrap();
    assert_bad_input(&o, &[&[file][..], needles].concat());
    assert!(!out.exists());
}

/// The builder and both containers are right: a plain tensor state dict and a Namespace whose attributes two
/// BUILDs set are read, so every refusal below is the reader's doing.
#[test]
fn the_builder_makes_files_the_reader_reads() {
    let dir = tempfile::tempdir().unwrap();
    let pickle = Pickle::new()
        .op(b"}")
        .text("model")
        .op(b"}")
        .text("w")
        .tensor()
        .op(b"s")
        .op(b"s")
        .text("args")
        .global("argparse", "Namespace")
        .op(b")")
        .op(&[0x81])
        .op(b"}")
        .text("lr")
        .int(3)
        .op(b"sb")
        .op(b"}")
        .text("name")
        .text("tiny")
        .op(b"sb")
        .op(b"s.")
        .0;
    for path in [zip_file(dir.path(), "plain", &pickle), legacy_file(dir.path(), "plain", &pickle)] {
        let v = import(&path).unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
        let sd = torchfile::state_dict(&path, &v, None).unwrap();
        assert_eq!(sd.len(), 1);
        assert_eq!(Vec::<f32>::try_from(&sd[0].1).unwrap(), [1., 2., 3., 4.]);
        let args = v.get("args").unwrap();
        assert!(matches!(args.get("lr"), Some(Value::Int(3))), "{args:?}");
        assert!(matches!(args.get("name"), Some(Value::Str(s)) if s == "tiny"), "{args:?}");
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Python's own pickler: objects whose __reduce__ would run os.system, directly, through the callable of a
// nested REDUCE, inside a Namespace's state, or under a dotted name that Python resolves through a module's
// attributes (`torch._utils` + `os.system`, `torch` + `_utils._rebuild_tensor_v2`).

const PYTHON_CASES: &str = r#"
import argparse, collections, os, pickle, pickletools, sys, types
d = sys.argv[1]
marker = os.path.join(d, "MARKER")

class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > " + marker,))

class MadeFromAllowedNames:
    # Unpickles as OrderedDict(): a value made by a REDUCE of an allowed name.
    def __call__(self, *a):
        raise SystemExit("never called")
    def __reduce__(self):
        return (collections.OrderedDict, ())

class CallsADict:
    # The callable of this REDUCE is itself the result of a REDUCE (of an allowed name).
    def __reduce__(self):
        return (MadeFromAllowedNames(), ())

class MadeFromSystem:
    def __call__(self, *a):
        raise SystemExit("never called")
    def __reduce__(self):
        return (os.system, ("echo pwned > " + marker,))

class CallsSystem:
    # The callable of this REDUCE is the result of a REDUCE of a refused name.
    def __reduce__(self):
        return (MadeFromSystem(), ("echo pwned > " + marker,))

fakes = {}

def fake(module, qualname):
    """A function pickle names `module` + `qualname`, dots included: modules and attributes are made up here
    (nothing is imported), so that the path resolves the way pickle checks it."""
    if (module, qualname) in fakes:
        return fakes[module, qualname]
    def f(*a):
        raise SystemExit("never called")
    f.__module__, f.__qualname__ = module, qualname
    mod = None
    for i in range(len(module.split("."))):
        name = ".".join(module.split(".")[: i + 1])
        sub = sys.modules.setdefault(name, types.ModuleType(name))
        if mod is not None:
            setattr(mod, name.rsplit(".", 1)[1], sub)
        mod = sub
    obj = mod
    for p in qualname.split(".")[:-1]:
        if not hasattr(obj, p):
            setattr(obj, p, types.SimpleNamespace())
        obj = getattr(obj, p)
    setattr(obj, qualname.split(".")[-1], f)
    fakes[module, qualname] = f
    return f

class Via:
    def __init__(self, f):
        self.f = f
    def __reduce__(self):
        return (self.f, ("echo pwned > " + marker,))

ns = argparse.Namespace(lr=1e-4)
ns.hook = Evil()
cases = {
    "reduce-system-p2": ({"model": Evil()}, 2),
    "reduce-system-p4": ({"model": Evil()}, 4),
    "reduce-of-reduce-dict": ({"model": CallsADict()}, 2),
    "reduce-of-reduce-system": ({"model": CallsSystem()}, 4),
    "namespace-state-system": ({"model": {}, "args": ns}, 2),
    "dotted-torch-utils-os-system-p2": ({"model": Via(fake("torch._utils", "os.system"))}, 2),
    "dotted-torch-utils-os-system-p4": ({"model": Via(fake("torch._utils", "os.system"))}, 4),
    "dotted-torch-split-rebuild-p4": ({"model": Via(fake("torch", "_utils._rebuild_tensor_v2"))}, 4),
}
for name, (obj, proto) in cases.items():
    data = pickle.dumps(obj, protocol=proto)
    assert list(pickletools.genops(data))[-1][0].name == "STOP"  # well formed
    with open(os.path.join(d, name + ".pkl"), "wb") as f:
        f.write(data)
"#;

#[test]
fn code_in_python_made_pickles_is_refused_not_run() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let py = repo().join(".venv/bin/python");
    let o = Command::new(&py).arg("-c").arg(PYTHON_CASES).arg(d).output().expect("run .venv python (./launch/setup.sh installs it)");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // On Linux os.system is posix.system.
    let cases: [(&str, &[&str]); 8] = [
        ("reduce-system-p2", &["refuses to load global posix.system"]),
        ("reduce-system-p4", &["refuses to load global posix.system"]),
        ("reduce-of-reduce-dict", &["call of a dict, not a global"]),
        ("reduce-of-reduce-system", &["refuses to load global posix.system"]),
        ("namespace-state-system", &["refuses to load global posix.system"]),
        // Protocol 2 has no dotted names: Python writes getattr(parent, "system") instead.
        ("dotted-torch-utils-os-system-p2", &["refuses to load global __builtin__.getattr"]),
        ("dotted-torch-utils-os-system-p4", &["refuses to load global torch._utils.os.system", "attribute path os.system"]),
        ("dotted-torch-split-rebuild-p4", &["attribute path _utils._rebuild_tensor_v2 of module torch"]),
    ];
    for (name, needles) in cases {
        let pickle = std::fs::read(d.join(format!("{name}.pkl"))).unwrap();
        refused(d, name, &pickle, needles);
        assert!(!d.join("MARKER").exists(), "{name} ran code");
    }
    for name in ["reduce-system-p4", "dotted-torch-utils-os-system-p4"] {
        refused_by_binary(&d.join(format!("{name}.pt")), &["refuses to load global"]);
        refused_by_binary(&d.join(format!("{name}-legacy.pt")), &["refuses to load global"]);
    }
    assert!(!d.join("MARKER").exists());
}

// ---------------------------------------------------------------------------------------------------------------
// Hand-built pickles.

#[test]
fn nested_reduce_calls_only_allowed_names() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let od = |p: Pickle| p.global("collections", "OrderedDict").op(b")R");
    let cases: Vec<(&str, Vec<u8>, &[&str])> = vec![
        // OrderedDict()(): the callable is a REDUCE result of an allowed name.
        ("reduce-of-dict", Pickle::as_model(|p| od(p).op(b")R")), &["call of a dict, not a global"]),
        // torch.device('cpu')('x').
        (
            "reduce-of-device",
            Pickle::as_model(|p| p.global("torch", "device").text("cpu").op(&[0x85]).op(b"R").text("x").op(&[0x85]).op(b"R")),
            &["call of a torch.device object, not a global"],
        ),
        // A tensor called.
        ("reduce-of-tensor", Pickle::as_model(|p| p.tensor().op(b")R")), &["call of a tensor, not a global"]),
        // _codecs.encode('abc', 'latin1')().
        (
            "reduce-of-bytes",
            Pickle::as_model(|p| p.global("_codecs", "encode").text("abc").text("latin1").op(&[0x86]).op(b"R").op(b")R")),
            &["call of a bytes, not a global"],
        ),
        // A dtype is an allowed value, not a callable.
        (
            "reduce-of-dtype",
            Pickle::as_model(|p| p.global("torch", "float32").text("x").op(&[0x85]).op(b"R")),
            &["call of torch.float32 with these 1 arguments is not supported"],
        ),
        // The arguments are themselves a REDUCE result, not a tuple.
        (
            "reduce-args-from-reduce",
            Pickle::as_model(|p| od(p.global("torch._utils", "_rebuild_tensor_v2")).op(b"R")),
            &["arguments of torch._utils._rebuild_tensor_v2 are a dict, not a tuple"],
        ),
        // NEWOBJ of a REDUCE result.
        ("newobj-of-dict", Pickle::as_model(|p| od(p).op(b")").op(&[0x81])), &["instance of a dict, not a global"]),
        // REDUCE of a refused name inside the arguments of an allowed one.
        (
            "reduce-args-of-refused",
            Pickle::as_model(|p| {
                p.global("collections", "OrderedDict").global("os", "system").text("id").op(&[0x85]).op(b"R").op(&[0x85]).op(b"R")
            }),
            &["refuses to load global os.system"],
        ),
    ];
    for (name, pickle, needles) in cases {
        refused(d, name, &pickle, needles);
    }
}

#[test]
fn build_sets_attributes_of_a_namespace_only() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let namespace = |p: Pickle| p.global("argparse", "Namespace").op(b")").op(&[0x81]);
    let cases: Vec<(&str, Vec<u8>, &[&str])> = vec![
        ("build-namespace-list", Pickle::as_model(|p| namespace(p).op(b"]b")), &["BUILD with a list state"]),
        ("build-namespace-str", Pickle::as_model(|p| namespace(p).text("os.system").op(b"b")), &["BUILD with a str state"]),
        ("build-namespace-triple", Pickle::as_model(|p| namespace(p).op(b"}}}").op(&[0x87]).op(b"b")), &["BUILD with a tuple state"]),
        (
            "build-device",
            Pickle::as_model(|p| p.global("torch", "device").text("cpu").op(&[0x85]).op(b"R}b")),
            &["cannot set the state of a torch.device object"],
        ),
        ("build-tensor", Pickle::as_model(|p| p.tensor().op(b"}b")), &["cannot set the state of a tensor"]),
        ("build-global", Pickle::as_model(|p| p.global("torch", "float32").op(b"}b")), &["cannot set the state of a global torch.float32"]),
        (
            "build-ordereddict-str",
            Pickle::as_model(|p| p.global("collections", "OrderedDict").op(b")R").text("x").op(b"b")),
            &["BUILD with a str state"],
        ),
        // A refused global as an attribute's value.
        (
            "build-namespace-refused-value",
            Pickle::as_model(|p| namespace(p).op(b"}").text("hook").global("os", "system").op(b"sb")),
            &["refuses to load global os.system"],
        ),
        // A Namespace whose attribute is the Namespace itself: the value is recursive.
        (
            "build-namespace-itself",
            Pickle::as_model(|p| namespace(p).op(b"q\x00}").text("self").op(b"h\x00sb")),
            &["nested more than 256 deep (or recursive)"],
        ),
    ];
    for (name, pickle, needles) in cases {
        refused(d, name, &pickle, needles);
    }
}

#[test]
fn global_names_are_exact_module_attribute_pairs() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let called = |g: fn(Pickle) -> Pickle| Pickle::as_model(move |p| g(p).text("id").op(&[0x85]).op(b"R"));
    let cases: Vec<(&str, Vec<u8>, &[&str])> = vec![
        ("global-os-system", called(|p| p.global("os", "system")), &["refuses to load global os.system"]),
        ("global-builtins-eval", called(|p| p.global("builtins", "eval")), &["refuses to load global builtins.eval"]),
        ("global-torch-load", called(|p| p.global("torch", "load")), &["refuses to load global torch.load"]),
        // os.system reached through torch._utils' own import of os.
        ("global-torch-utils-os", called(|p| p.global("torch._utils.os", "system")), &["refuses to load global torch._utils.os.system"]),
        (
            "global-dotted-name",
            called(|p| p.global("torch._utils", "os.system")),
            &["refuses to load global torch._utils.os.system, attribute path os.system of module torch._utils"],
        ),
        (
            "global-dotted-allowed-name",
            called(|p| p.global("collections", "OrderedDict.fromkeys")),
            &["attribute path OrderedDict.fromkeys of module collections"],
        ),
        (
            "stack-global-split-rebuild",
            called(|p| p.stack_global("torch", "_utils._rebuild_tensor_v2")),
            &["attribute path _utils._rebuild_tensor_v2 of module torch"],
        ),
        (
            "stack-global-dotted-system",
            called(|p| p.stack_global("torch._utils", "os.system")),
            &["refuses to load global torch._utils.os.system"],
        ),
        // Newlines, carriage returns and NULs inside names: refused, and escaped so the message stays on one line.
        (
            "stack-global-newline-module",
            called(|p| p.stack_global("torch._utils\n", "_rebuild_tensor_v2")),
            &[r"refuses to load global torch._utils\n._rebuild_tensor_v2"],
        ),
        (
            "stack-global-newline-name",
            called(|p| p.stack_global("torch._utils", "_rebuild_tensor_v2\n")),
            &[r"refuses to load global torch._utils._rebuild_tensor_v2\n"],
        ),
        (
            "stack-global-newline-joined",
            called(|p| p.stack_global("torch._utils\n_rebuild_tensor_v2", "")),
            &[r"refuses to load global torch._utils\n_rebuild_tensor_v2."],
        ),
        (
            "global-crlf",
            called(|p| p.op(b"ctorch._utils\r\n_rebuild_tensor_v2\r\n")),
            &[r"refuses to load global torch._utils\r._rebuild_tensor_v2\r"],
        ),
        (
            "stack-global-nul",
            called(|p| p.stack_global("torch._utils\0", "_rebuild_tensor_v2")),
            &[r"refuses to load global torch._utils\0._rebuild_tensor_v2"],
        ),
        (
            "global-no-end-of-line",
            Pickle::as_model(|p| p.op(b"ctorch._utils\n").op(&[b'x'; 300])),
            &["GLOBAL name without an end of line within 256 bytes"],
        ),
        ("stack-global-not-strings", called(|p| p.int(1).int(2).op(&[0x93])), &["STACK_GLOBAL needs two strings"]),
    ];
    for (name, pickle, needles) in cases {
        refused(d, name, &pickle, needles);
    }
    refused_by_binary(&zip_file(d, "global-dotted-name", &called(|p| p.global("torch._utils", "os.system"))), &["os.system"]);
}

#[test]
fn memo_abuse_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let cases: Vec<(&str, Vec<u8>, &[&str])> = vec![
        ("binget-empty", Pickle::as_model(|p| p.op(b"h\x05")), &["memo slot 5 is empty"]),
        ("long-binget-huge", Pickle::as_model(|p| p.op(b"j\xff\xff\xff\xff")), &["memo slot 4294967295 is empty"]),
        // A huge index is a key, not an array size; the value it holds is a string, not a tensor.
        (
            "long-binput-huge",
            Pickle::as_model(|p| p.op(b"}").text("w").text("x").op(b"r\xff\xff\xff\xff0j\xff\xff\xff\xffs")),
            &["entry 'w' is a str"],
        ),
        ("memoize-empty-stack", Pickle::new().op(&[0x94]).0, &["stack underflow"]),
        ("binput-after-mark", Pickle::as_model(|p| p.op(b"(q\x00")), &["stack underflow"]),
        ("binget-int-as-callable", Pickle::as_model(|p| p.int(7).op(b"q\x000h\x00)R")), &["call of a int, not a global"]),
        ("binget-str-as-persistent-id", Pickle::as_model(|p| p.text("storage").op(b"q\x000h\x00Q")), &["persistent id is a str"]),
        ("binget-dict-as-list", Pickle::as_model(|p| p.op(b"}q\x000h\x00Na")), &["cannot append to a dict"]),
        ("binget-list-as-dict", Pickle::as_model(|p| p.op(b"]q\x000h\x00NNs")), &["cannot set items of a list"]),
        (
            "binget-storage-as-value",
            Pickle::as_model(|p| p.op(b"}").text("w").storage().op(b"q\x000h\x00s")),
            &["a storage outside a tensor is not supported"],
        ),
        ("list-containing-itself", Pickle::as_model(|p| p.op(b"]q\x00h\x00a")), &["nested more than 256 deep (or recursive)"]),
    ];
    for (name, pickle, needles) in cases {
        refused(d, name, &pickle, needles);
    }
}

/// x = (x, x) forty times over is 2^40 values once copied out of the machine's shared graph: the copy stops at
/// a budget proportional to the pickle, within the memory bound `refused` checks.
#[test]
fn shared_value_bombs_are_refused_within_a_budget() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut bomb = Pickle::new().op(b"N");
    for _ in 0..40 {
        bomb = bomb.op(b"q\x00h\x00\x86");
    }
    let bomb = bomb.op(b".").0;
    refused(d, "pair-bomb", &bomb, &["the pickled value is too large"]);
    refused_by_binary(&d.join("pair-bomb.pt"), &["too large"]);
}

/// A million nested tuples in every place a value is taken apart or dropped on a refusal: no stack overflow.
#[test]
fn deep_nesting_is_refused_without_exhausting_the_stack() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let deep = |p: Pickle| p.op(b"N").op(&vec![0x85; 1_000_000]);
    let cases: Vec<(&str, Vec<u8>, &[&str])> = vec![
        (
            "deep-reduce-args",
            Pickle::as_model(|p| deep(p.global("torch", "float32")).op(b"R")),
            &["call of torch.float32 with these 1 arguments is not supported"],
        ),
        ("deep-build-state", Pickle::as_model(|p| deep(p.tensor()).op(b"b")), &["BUILD with a tuple state"]),
        ("deep-stack-global", Pickle::as_model(|p| deep(p.text("torch")).op(&[0x93])), &["STACK_GLOBAL needs two strings"]),
        ("deep-persistent-id", Pickle::as_model(|p| deep(p).op(b"Q")), &["unsupported persistent id"]),
        ("deep-append-to-int", Pickle::as_model(|p| deep(p.int(1)).op(b"a")), &["cannot append to a int"]),
        ("deep-value", Pickle::as_model(deep), &["nested more than 256 deep"]),
    ];
    for (name, pickle, needles) in cases {
        refused(d, name, &pickle, needles);
    }
    refused_by_binary(&d.join("deep-reduce-args.pt"), &["torch.float32"]);
    refused_by_binary(&d.join("deep-reduce-args-legacy.pt"), &["torch.float32"]);
}

/// Tensor views whose sizes, strides or offset reach outside storage `0` (4 floats) or past what libtorch can
/// index are refused when the pickle is read, before any tensor is built.
#[test]
fn tensor_views_stay_inside_their_storage() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let in_model = |offset: i64, size: &'static [i64], stride: &'static [i64]| {
        Pickle::as_model(move |p| p.op(b"}").text("w").view(offset, size, stride).op(b"s"))
    };
    let cases: Vec<(&str, Vec<u8>, &[&str])> = vec![
        ("view-past-end", in_model(0, &[5], &[1]), &["runs past its storage of 4 elements"]),
        ("view-offset-past-end", in_model(4, &[1], &[1]), &["runs past its storage of 4 elements"]),
        ("view-huge-stride", in_model(0, &[2], &[i64::MAX]), &["runs past its storage of 4 elements"]),
        ("view-negative-size", in_model(0, &[-1], &[1]), &["size and stride must be non-negative"]),
        ("view-negative-offset", in_model(-1, &[1], &[1]), &["bad tensor view"]),
        // Empty (a size is 0), yet the other sizes multiply past i64: libtorch would throw building it.
        (
            "view-empty-overflowing",
            in_model(0, &[0, 1 << 62, 1 << 62], &[1, 1, 1]),
            &["tensor size [0, 4611686018427387904, 4611686018427387904] overflows"],
        ),
        ("view-rank-mismatch", in_model(0, &[2, 2], &[1]), &["bad tensor view"]),
    ];
    for (name, pickle, needles) in cases {
        refused(d, name, &pickle, needles);
    }
}
