//! Restricted reader of PyTorch `torch.save` checkpoints: walks the zip and interprets the pickle, never executing it.
//! Here: reading a file and extracting a state dict; `archive`: the container and its tensors; `pickle`: the machine.

// A pickle is a program for a stack machine whose GLOBAL opcodes name arbitrary Python callables, which is why
// loading one from elsewhere can run code. This reader implements only the opcodes torch.save emits and maps an
// allow-list of names (tensor rebuilders, storage types, OrderedDict, argparse.Namespace, ...) to fixed behaviour
// here; any other name is refused before anything is built. Tensor bytes are read lazily, so importing one state
// dict of a checkpoint does not also load its optimizer state.

use anyhow::Result;
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use tch::Tensor;

mod archive;
mod pickle;

use archive::Archive;
pub use archive::TensorRef;
pub use pickle::Value;
use pickle::{convert, convert_budget, Obj, Vm};

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_are_stripped_repeatedly() {
        assert_eq!(strip_prefixes("module._orig_mod.blocks.0.attn.qkv.weight"), "blocks.0.attn.qkv.weight");
        assert_eq!(strip_prefixes("x_embedder.proj.weight"), "x_embedder.proj.weight");
        assert_eq!(strip_prefixes("modules.x"), "modules.x");
    }
}
