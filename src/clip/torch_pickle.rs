//! State dicts saved by `torch.save` (`pytorch_model.bin`, `open_clip_pytorch_model.bin`): a zip
//! archive holding `*/data.pkl`, a pickle whose tensors point at raw storages `*/data/<key>`.
//!
//! libtorch's C++ API reads TorchScript archives, not these pickles, so this is a small pickle
//! machine for exactly what `torch.save(state_dict)` writes: dicts (plain or OrderedDict),
//! tuples, strings, ints, bools and `torch._utils._rebuild_tensor_v2` over persistent storage
//! ids. Anything else is an error naming the opcode or global, never a guess.
//!
//! The file may come from anyone (`--model org/name`), so the machine is bounded: a few hundred
//! bytes of MEMOIZE / GET / APPEND can describe a value of 2^100 nodes. Every value it creates,
//! each copy that MEMOIZE and GET make included, is charged at its size against a budget
//! proportional to the length of data.pkl; containers nest at most `MAX_DEPTH` deep (the values
//! are dropped and copied recursively); data.pkl may not be much larger than the archive (a
//! deflated data.pkl could otherwise be 1000 times its file). Each opcode consumes at least one
//! byte and does work proportional to what it creates or consumes, so time is bounded too.
//! Tensor views are checked against their storage and their total size against the storages
//! read, so no view makes libtorch allocate more than the file holds.
use anyhow::{anyhow, bail, Context, Result};
use std::collections::HashMap;
use std::io::Read;
use std::mem::size_of;
use std::path::Path;
use tch::{Kind, Tensor};

/// Bytes of values the machine may create per byte of data.pkl. `torch.save` pickles create 22
/// to 36 (a 32-byte value for a 2-byte int, and most objects copied once into the memo).
const BUDGET_PER_BYTE: usize = 128;
/// A fixed allowance on top, for tiny pickles.
const BUDGET_SLACK: usize = 1 << 20;
/// State dicts nest about 4 deep (dict, tensor arguments, size tuple); OpenCLIP training
/// checkpoints with optimizer state a few more.
const MAX_DEPTH: usize = 32;
/// data.pkl at most this many times the archive (torch.save stores it uncompressed), plus 64 KiB.
const PICKLE_PER_ARCHIVE_BYTE: u64 = 4;
/// Tensors have at most this many dimensions.
const MAX_DIMS: usize = 64;
/// The tensors of a state dict may total at most this many times the bytes of their storages
/// (tied weights share a storage), plus 1 MiB: views with zero strides cannot blow up.
const VIEWS_PER_STORAGE_BYTE: usize = 4;

#[derive(Clone)]
enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Tuple(Seq<Value>),
    List(Seq<Value>),
    Dict(Seq<(Value, Value)>),
    Global(String),
    /// ('storage', kind, key, location, numel)
    Storage {
        kind: Kind,
        key: String,
    },
    // Boxed: keeps `Value` at 32 bytes.
    Tensor(Box<TensorRef>),
    Mark,
}

#[derive(Clone)]
struct TensorRef {
    kind: Kind,
    key: String,
    offset: i64,
    size: Vec<i64>,
    stride: Vec<i64>,
}

/// Size in bytes (what the value holds in memory) and nesting depth, known without walking.
trait Measured {
    fn cost(&self) -> usize;
    fn depth(&self) -> usize;
}

impl Measured for Value {
    fn cost(&self) -> usize {
        size_of::<Value>()
            + match self {
                Value::Str(s) | Value::Global(s) | Value::Storage { key: s, .. } => s.len(),
                Value::Tuple(s) | Value::List(s) => s.cost,
                Value::Dict(d) => d.cost,
                Value::Tensor(t) => size_of::<TensorRef>() + t.key.len() + 8 * (t.size.len() + t.stride.len()),
                _ => 0,
            }
    }
    fn depth(&self) -> usize {
        match self {
            Value::Tuple(s) | Value::List(s) => s.depth,
            Value::Dict(d) => d.depth,
            _ => 0,
        }
    }
}

impl Measured for (Value, Value) {
    fn cost(&self) -> usize {
        self.0.cost() + self.1.cost()
    }
    fn depth(&self) -> usize {
        self.0.depth().max(self.1.depth())
    }
}

/// A tuple, list or dict with the total cost of its items and its depth kept up to date, so
/// that a copy is charged without walking it.
#[derive(Clone)]
struct Seq<T> {
    items: Vec<T>,
    cost: usize,
    depth: usize,
}

impl<T: Measured> Seq<T> {
    fn empty() -> Self {
        Seq { items: Vec::new(), cost: 0, depth: 1 }
    }

    fn new(items: Vec<T>) -> Result<Self> {
        let mut s = Seq { items: Vec::with_capacity(items.len()), ..Seq::empty() };
        for x in items {
            s.push(x)?;
        }
        Ok(s)
    }

    fn push(&mut self, x: T) -> Result<()> {
        self.depth = self.depth.max(x.depth() + 1);
        if self.depth > MAX_DEPTH {
            bail!("containers nest more than {MAX_DEPTH} deep (a malformed or malicious pickle)");
        }
        self.cost += x.cost();
        self.items.push(x);
        Ok(())
    }
}

/// A short description for error messages (a value may be large: never printed whole).
fn describe(v: &Value) -> String {
    fn short(s: &str) -> String {
        match s.char_indices().nth(60) {
            Some((i, _)) => format!("{:?}...", &s[..i]),
            None => format!("{s:?}"),
        }
    }
    match v {
        Value::None => "None".into(),
        Value::Bool(b) => format!("{b}"),
        Value::Int(n) => format!("the int {n}"),
        Value::Float(f) => format!("the float {f}"),
        Value::Str(s) => format!("the string {}", short(s)),
        Value::Tuple(s) => format!("a tuple of {} items", s.items.len()),
        Value::List(s) => format!("a list of {} items", s.items.len()),
        Value::Dict(d) => format!("a dict of {} items", d.items.len()),
        Value::Global(g) => format!("the global {}", short(g)),
        Value::Storage { key, .. } => format!("the storage {}", short(key)),
        Value::Tensor(t) => format!("a tensor over the storage {}", short(&t.key)),
        Value::Mark => "a MARK".into(),
    }
}

fn storage_kind(name: &str) -> Result<Kind> {
    Ok(match name {
        "torch.FloatStorage" => Kind::Float,
        "torch.HalfStorage" => Kind::Half,
        "torch.BFloat16Storage" => Kind::BFloat16,
        "torch.DoubleStorage" => Kind::Double,
        "torch.LongStorage" => Kind::Int64,
        "torch.IntStorage" => Kind::Int,
        "torch.BoolStorage" => Kind::Bool,
        "torch.ByteStorage" => Kind::Uint8,
        other => bail!("unsupported storage type {other:.80}"),
    })
}

fn ints(v: &Value) -> Result<Vec<i64>> {
    match v {
        Value::Tuple(s) | Value::List(s) => s
            .items
            .iter()
            .map(|i| match i {
                Value::Int(n) => Ok(*n),
                other => bail!("expected an int, found {}", describe(other)),
            })
            .collect(),
        other => bail!("expected a tuple of ints, found {}", describe(other)),
    }
}

/// The pickle machine: the input, the stack, the memo and what is left of the budget.
struct Machine<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    memo: HashMap<u32, Value>,
    budget: usize,
    left: usize,
}

impl<'a> Machine<'a> {
    fn new(data: &'a [u8]) -> Self {
        let budget = data.len().saturating_mul(BUDGET_PER_BYTE).saturating_add(BUDGET_SLACK);
        Machine { data, pos: 0, stack: Vec::new(), memo: HashMap::new(), budget, left: budget }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let s = self.pos.checked_add(n).and_then(|end| self.data.get(self.pos..end)).context("pickle ends early")?;
        self.pos += n;
        Ok(s)
    }

    fn byte(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into()?))
    }

    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into()?))
    }

    fn string(&mut self, n: usize) -> Result<String> {
        let bytes = self.take(n)?;
        self.charge(n)?;
        Ok(String::from_utf8(bytes.to_vec())?)
    }

    fn charge(&mut self, n: usize) -> Result<()> {
        self.left = self.left.checked_sub(n).ok_or_else(|| {
            anyhow!(
                "data.pkl exceeds its work budget ({} bytes of values for a {}-byte pickle): a malformed or \
                 malicious pickle",
                self.budget,
                self.data.len()
            )
        })?;
        Ok(())
    }

    /// Pushes a value created from the input (a scalar, a string, a copy): charged whole.
    fn push_new(&mut self, v: Value) -> Result<()> {
        self.charge(v.cost())?;
        self.stack.push(v);
        Ok(())
    }

    /// Pushes a container of items moved off the stack: only its own slot is new.
    fn push_moved(&mut self, v: Value) -> Result<()> {
        self.charge(size_of::<Value>())?;
        self.stack.push(v);
        Ok(())
    }

    fn pop(&mut self) -> Result<Value> {
        self.stack.pop().context("pickle stack underflow")
    }

    /// The items above the topmost MARK, and the MARK removed. The scan is paid for by the
    /// items it moves (or ends the machine with an error).
    fn pop_mark(&mut self) -> Result<Vec<Value>> {
        let at = self.stack.iter().rposition(|v| matches!(v, Value::Mark)).context("pickle MARK missing")?;
        let items = self.stack.split_off(at + 1);
        self.stack.pop();
        Ok(items)
    }

    /// A copy of the top of the stack for the memo, charged at its size (plus the entry's
    /// overhead in the map) before it is made.
    fn memoize(&mut self, key: u32) -> Result<()> {
        let cost = self.stack.last().context("MEMOIZE on an empty stack")?.cost();
        self.charge(cost + 16)?;
        let copy = self.stack.last().cloned().context("MEMOIZE on an empty stack")?;
        self.memo.insert(key, copy);
        Ok(())
    }

    /// A copy of a memo entry onto the stack, charged at its size before it is made.
    fn get(&mut self, key: u32) -> Result<()> {
        let missing = || format!("pickle GET of a missing memo entry {key}");
        let cost = self.memo.get(&key).with_context(missing)?.cost();
        self.charge(cost)?;
        let copy = self.memo.get(&key).cloned().with_context(missing)?;
        self.stack.push(copy);
        Ok(())
    }

    /// Runs the pickle and returns its top-level object.
    fn run(mut self) -> Result<Value> {
        loop {
            let at = self.pos;
            let op = self.byte()?;
            match op {
                0x80 => {
                    self.take(1)?; // PROTO
                }
                0x95 => {
                    self.take(8)?; // FRAME
                }
                b'.' => return self.pop(), // STOP
                b'(' => self.push_new(Value::Mark)?,
                b'N' => self.push_new(Value::None)?,
                0x88 => self.push_new(Value::Bool(true))?,
                0x89 => self.push_new(Value::Bool(false))?,
                b'J' => {
                    let v = self.u32()? as i32 as i64;
                    self.push_new(Value::Int(v))?
                }
                b'K' => {
                    let v = self.byte()? as i64;
                    self.push_new(Value::Int(v))?
                }
                b'M' => {
                    let v = self.u16()? as i64;
                    self.push_new(Value::Int(v))?
                }
                0x8a => {
                    // LONG1: little-endian two's complement of n bytes
                    let n = self.byte()? as usize;
                    let b = self.take(n)?;
                    if n > 8 {
                        bail!("integer too large in pickle");
                    }
                    let mut v: i64 = 0;
                    for (i, &x) in b.iter().enumerate() {
                        v |= (x as i64) << (8 * i);
                    }
                    if n > 0 && n < 8 && b[n - 1] & 0x80 != 0 {
                        v -= 1i64 << (8 * n);
                    }
                    self.push_new(Value::Int(v))?;
                }
                b'G' => {
                    let v = f64::from_be_bytes(self.take(8)?.try_into()?);
                    self.push_new(Value::Float(v))?
                }
                b'X' => {
                    let n = self.u32()? as usize;
                    let s = self.string(n)?;
                    self.push_moved(Value::Str(s))?;
                }
                0x8c => {
                    let n = self.byte()? as usize;
                    let s = self.string(n)?;
                    self.push_moved(Value::Str(s))?;
                }
                b'c' => {
                    // GLOBAL "module\nname\n"
                    let rest = &self.data[self.pos..];
                    let a = rest.iter().position(|&c| c == b'\n').context("bad GLOBAL")?;
                    let b = rest[a + 1..].iter().position(|&c| c == b'\n').context("bad GLOBAL")?;
                    let module = std::str::from_utf8(&rest[..a])?;
                    let name = std::str::from_utf8(&rest[a + 1..a + 1 + b])?;
                    let g = format!("{module}.{name}");
                    self.pos += a + b + 2;
                    self.push_new(Value::Global(g))?;
                }
                0x93 => {
                    // STACK_GLOBAL
                    let name = self.pop()?;
                    let module = self.pop()?;
                    match (&module, &name) {
                        (Value::Str(m), Value::Str(n)) => {
                            let g = format!("{m}.{n}");
                            self.push_new(Value::Global(g))?
                        }
                        _ => bail!("bad STACK_GLOBAL of {} and {}", describe(&module), describe(&name)),
                    }
                }
                b')' => self.push_new(Value::Tuple(Seq::empty()))?,
                b']' => self.push_new(Value::List(Seq::empty()))?,
                b'}' => self.push_new(Value::Dict(Seq::empty()))?,
                b't' => {
                    let items = self.pop_mark()?;
                    self.push_moved(Value::Tuple(Seq::new(items)?))?;
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    if self.stack.len() < n {
                        bail!("pickle stack underflow");
                    }
                    let items = self.stack.split_off(self.stack.len() - n);
                    self.push_moved(Value::Tuple(Seq::new(items)?))?;
                }
                b'q' => {
                    let k = self.byte()? as u32;
                    self.memoize(k)?;
                }
                b'r' => {
                    let k = self.u32()?;
                    self.memoize(k)?;
                }
                0x94 => {
                    let k = u32::try_from(self.memo.len())?;
                    self.memoize(k)?;
                }
                b'h' => {
                    let k = self.byte()? as u32;
                    self.get(k)?;
                }
                b'j' => {
                    let k = self.u32()?;
                    self.get(k)?;
                }
                b'Q' => {
                    // BINPERSID: ('storage', StorageType, key, location, numel)
                    let pid = self.pop()?;
                    let Value::Tuple(t) = &pid else { bail!("unexpected persistent id {}", describe(&pid)) };
                    match (t.items.get(1), t.items.get(2)) {
                        (Some(Value::Global(g)), Some(Value::Str(key))) => {
                            let v = Value::Storage { kind: storage_kind(g)?, key: key.clone() };
                            self.push_new(v)?
                        }
                        _ => bail!("unexpected persistent id {}", describe(&pid)),
                    }
                }
                b'R' => {
                    // REDUCE
                    let args = self.pop()?;
                    let f = self.pop()?;
                    let Value::Global(g) = f else { bail!("REDUCE of {}, not a global", describe(&f)) };
                    let Value::Tuple(a) = args else { bail!("REDUCE with {} as arguments", describe(&args)) };
                    match g.as_str() {
                        "collections.OrderedDict" => self.push_new(Value::Dict(Seq::empty()))?,
                        "torch._utils._rebuild_tensor_v2" | "torch._utils._rebuild_tensor" => {
                            let Some(Value::Storage { kind, key }) = a.items.first() else {
                                bail!("tensor without storage")
                            };
                            let offset = match a.items.get(1) {
                                Some(Value::Int(o)) => *o,
                                _ => bail!("tensor without offset"),
                            };
                            let size = ints(a.items.get(2).context("tensor without size")?)?;
                            let stride = ints(a.items.get(3).context("tensor without stride")?)?;
                            let t = TensorRef { kind: *kind, key: key.clone(), offset, size, stride };
                            self.push_new(Value::Tensor(Box::new(t)))?
                        }
                        "torch._utils._rebuild_parameter" => {
                            let tensor = a.items.into_iter().next().context("empty parameter")?;
                            self.push_moved(tensor)?
                        }
                        other => bail!("unsupported object {other:.80} in the pickle"),
                    }
                }
                b'b' => {
                    // BUILD: state for OrderedDict / tensors (metadata) is ignored.
                    self.pop()?;
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    match self.stack.last_mut() {
                        Some(Value::Dict(d)) => d.push((k, v))?,
                        _ => bail!("SETITEM outside a dict"),
                    }
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    if items.len() % 2 != 0 {
                        bail!("SETITEMS with an odd number of items");
                    }
                    let Some(Value::Dict(d)) = self.stack.last_mut() else { bail!("SETITEMS outside a dict") };
                    let mut items = items.into_iter();
                    while let (Some(k), Some(v)) = (items.next(), items.next()) {
                        d.push((k, v))?;
                    }
                }
                b'a' => {
                    let v = self.pop()?;
                    match self.stack.last_mut() {
                        Some(Value::List(l)) => l.push(v)?,
                        _ => bail!("APPEND outside a list"),
                    }
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    let Some(Value::List(l)) = self.stack.last_mut() else { bail!("APPENDS outside a list") };
                    for v in items {
                        l.push(v)?;
                    }
                }
                other => bail!("unsupported pickle opcode 0x{other:02x} at byte {at}"),
            }
        }
    }
}

/// Runs the pickle and returns its top-level object.
fn unpickle(data: &[u8]) -> Result<Value> {
    Machine::new(data).run()
}

/// Checks a tensor's view against its storage of `numel` elements; returns the view's elements.
fn view_numel(t: &TensorRef, numel: i64) -> Result<i64> {
    if t.size.len() != t.stride.len() || t.size.len() > MAX_DIMS {
        bail!("{} sizes and {} strides", t.size.len(), t.stride.len());
    }
    if t.offset < 0 || t.size.iter().chain(&t.stride).any(|&x| x < 0) {
        bail!("a negative size, stride or offset");
    }
    let count = t.size.iter().try_fold(1i64, |n, &s| n.checked_mul(s)).context("too many elements")?;
    if count > 0 {
        // The furthest element the view reaches must lie inside the storage.
        let reach =
            t.size.iter().zip(&t.stride).try_fold(t.offset, |r, (&s, &st)| r.checked_add((s - 1).checked_mul(st)?));
        if reach.is_none_or(|r| r >= numel) {
            bail!("it reaches past its storage of {numel} elements");
        }
    }
    Ok(count)
}

/// Reads every tensor of a `torch.save`d state dict onto the CPU, in its stored precision.
pub fn read_state_dict(path: &Path) -> Result<Vec<(String, Tensor)>> {
    let file = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let archive_len = file.metadata().with_context(|| format!("cannot read {}", path.display()))?.len();
    let mut zip = zip::ZipArchive::new(std::io::BufReader::new(file)).with_context(|| {
        format!(
            "model {} is not a torch.save zip archive: expected a CLIP ViT checkpoint (OpenAI .pt, a state \
                 dict .bin or .safetensors)",
            path.display()
        )
    })?;
    let pkl_name = zip
        .file_names()
        .find(|n| n.ends_with("/data.pkl") || *n == "data.pkl")
        .map(str::to_string)
        .with_context(|| format!("{}: no data.pkl in the archive", path.display()))?;
    let prefix = pkl_name.trim_end_matches("data.pkl").to_string();
    // Bounded before anything is read: a deflated entry may claim (or hold) far more than the file.
    let limit = archive_len.saturating_mul(PICKLE_PER_ARCHIVE_BYTE).saturating_add(64 << 10);
    let too_big = || {
        anyhow!(
            "{}: data.pkl is larger than {limit} bytes, {PICKLE_PER_ARCHIVE_BYTE} times the archive (a malformed \
             or malicious archive)",
            path.display()
        )
    };
    let entry = zip.by_name(&pkl_name).with_context(|| format!("{}: cannot read data.pkl", path.display()))?;
    if entry.size() > limit {
        return Err(too_big());
    }
    let mut pkl = Vec::new();
    entry.take(limit + 1).read_to_end(&mut pkl).with_context(|| format!("{}: cannot read data.pkl", path.display()))?;
    if pkl.len() as u64 > limit {
        return Err(too_big());
    }
    let top = unpickle(&pkl).with_context(|| format!("{}: cannot read the pickle", path.display()))?;
    drop(pkl);
    // A full checkpoint may nest the weights under "state_dict" (OpenCLIP training checkpoints).
    let mut items = match top {
        Value::Dict(d) => d.items,
        other => bail!("{}: the pickle holds {}, not a state dict", path.display(), describe(&other)),
    };
    let nested = items.iter().position(|(k, v)| matches!((k, v), (Value::Str(s), Value::Dict(_)) if s == "state_dict"));
    if let Some(i) = nested {
        if let (_, Value::Dict(inner)) = items.swap_remove(i) {
            items = inner.items;
        }
    }
    // One tensor per storage, shared by the views over it (a storage is read and copied once).
    let mut storages: HashMap<String, (Tensor, i64)> = HashMap::new();
    let (mut storage_bytes, mut view_bytes) = (0usize, 0usize);
    let mut out = Vec::new();
    for (k, v) in items {
        let (Value::Str(name), Value::Tensor(t)) = (k, v) else { continue };
        let elt = t.kind.elt_size_in_bytes();
        if !storages.contains_key(&t.key) {
            let mut buf = Vec::new();
            zip.by_name(&format!("{prefix}data/{}", t.key))
                .with_context(|| format!("{}: storage {:.80} missing", path.display(), t.key))?
                .read_to_end(&mut buf)
                .with_context(|| format!("{}: cannot read storage {:.80}", path.display(), t.key))?;
            storage_bytes += buf.len();
            let numel = (buf.len() / elt) as i64;
            let storage = Tensor::f_from_data_size(&buf, &[numel], t.kind)?;
            storages.insert(t.key.clone(), (storage, numel));
        }
        let Some((storage, numel)) = storages.get(&t.key) else { continue };
        let count = view_numel(&t, *numel).with_context(|| format!("{}: tensor {name:.80}", path.display()))?;
        view_bytes = view_bytes.saturating_add((count as usize).saturating_mul(elt));
        if view_bytes > storage_bytes.saturating_mul(VIEWS_PER_STORAGE_BYTE).saturating_add(1 << 20) {
            bail!(
                "{}: tensor {name:.80} brings the tensors to {view_bytes} bytes over {storage_bytes} bytes of \
                 storage (a malformed or malicious state dict)",
                path.display()
            );
        }
        let tensor = storage
            .f_as_strided(&t.size, &t.stride, Some(t.offset))
            .and_then(|v| v.f_contiguous())
            .with_context(|| format!("{}: tensor {name:.80}", path.display()))?;
        out.push((name, tensor));
    }
    Ok(out)
}
