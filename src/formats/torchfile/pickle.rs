//! The pickle machine of the restricted `torch.save` reader: only the opcodes torch.save
//! emits, an allow-list of global names with fixed meanings, values built without
//! recursion and under a budget.

use super::archive::{Archive, Storage, TensorRef};
use anyhow::Result;
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;
use tch::Kind;

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
pub(super) enum Obj {
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

pub(super) fn convert_budget(pickle_len: usize) -> usize {
    (16 << 20) + pickle_len.saturating_mul(2 * std::mem::size_of::<Value>())
}

pub(super) fn convert(o: &Obj, depth: usize, budget: &mut usize) -> std::result::Result<Value, String> {
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

pub(super) struct Vm<'a> {
    archive: Arc<Archive>,
    data: &'a [u8],
    pub(super) pos: usize,
    stack: Vec<Obj>,
    /// Stack heights at each open MARK; ops may not pop below the innermost one (as in CPython).
    marks: Vec<usize>,
    memo: HashMap<u32, Obj>,
    /// Storage entry -> (file offset, size in bytes), looked up once per storage shared by several views.
    pub(super) starts: HashMap<String, (u64, u64)>,
    /// First pass over a legacy file: storage entry -> (type, elements) as declared, offsets not yet known.
    pub(super) declared: Option<HashMap<String, (Kind, i64)>>,
}

impl<'a> Vm<'a> {
    pub(super) fn new(archive: &Arc<Archive>, data: &'a [u8], pos: usize) -> Vm<'a> {
        let (stack, marks, memo, starts) = (Vec::new(), Vec::new(), HashMap::new(), HashMap::new());
        Vm { archive: archive.clone(), data, pos, stack, marks, memo, starts, declared: None }
    }

    /// An input error at the current position of the pickle.
    pub(super) fn fail(&self, msg: impl std::fmt::Display) -> anyhow::Error {
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

    pub(super) fn run(&mut self) -> Result<Obj> {
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
