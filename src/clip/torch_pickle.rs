//! State dicts saved by `torch.save` (`pytorch_model.bin`, `open_clip_pytorch_model.bin`): a zip
//! archive holding `*/data.pkl`, a pickle whose tensors point at raw storages `*/data/<key>`.
//!
//! libtorch's C++ API reads TorchScript archives, not these pickles, so this is a small pickle
//! machine for exactly what `torch.save(state_dict)` writes: dicts (plain or OrderedDict),
//! tuples, strings, ints, bools and `torch._utils._rebuild_tensor_v2` over persistent storage
//! ids. Anything else is an error naming the opcode or global, never a guess.
use anyhow::{bail, Context, Result};
use std::collections::HashMap;
use std::io::Read;
use std::path::Path;
use tch::{Kind, Tensor};

// Every variant's payload is read, if only by `Debug` in error messages.
#[allow(dead_code)]
#[derive(Debug, Clone)]
enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Tuple(Vec<Value>),
    List(Vec<Value>),
    Dict(Vec<(Value, Value)>),
    Global(String),
    /// ('storage', kind, key, location, numel)
    Storage {
        kind: Kind,
        key: String,
    },
    Tensor(TensorRef),
    Mark,
}

#[derive(Debug, Clone)]
struct TensorRef {
    kind: Kind,
    key: String,
    offset: i64,
    size: Vec<i64>,
    stride: Vec<i64>,
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
        other => bail!("unsupported storage type {other}"),
    })
}

fn ints(v: &Value) -> Result<Vec<i64>> {
    match v {
        Value::Tuple(items) | Value::List(items) => items
            .iter()
            .map(|i| match i {
                Value::Int(n) => Ok(*n),
                other => bail!("expected an int, found {other:?}"),
            })
            .collect(),
        other => bail!("expected a tuple of ints, found {other:?}"),
    }
}

/// Runs the pickle and returns its top-level object.
fn unpickle(data: &[u8]) -> Result<Value> {
    let mut stack: Vec<Value> = Vec::new();
    let mut memo: HashMap<u32, Value> = HashMap::new();
    let mut pos = 0usize;
    let take = |pos: &mut usize, n: usize| -> Result<&[u8]> {
        let s = data.get(*pos..*pos + n).context("pickle ends early")?;
        *pos += n;
        Ok(s)
    };
    let pop = |stack: &mut Vec<Value>| stack.pop().context("pickle stack underflow");
    let pop_mark = |stack: &mut Vec<Value>| -> Result<Vec<Value>> {
        let at = stack.iter().rposition(|v| matches!(v, Value::Mark)).context("pickle MARK missing")?;
        let items = stack.split_off(at + 1);
        stack.pop();
        Ok(items)
    };
    loop {
        let op = *take(&mut pos, 1)?.first().context("pickle ends early")?;
        match op {
            0x80 => {
                take(&mut pos, 1)?; // PROTO
            }
            0x95 => {
                take(&mut pos, 8)?; // FRAME
            }
            b'.' => return pop(&mut stack), // STOP
            b'(' => stack.push(Value::Mark),
            b'N' => stack.push(Value::None),
            0x88 => stack.push(Value::Bool(true)),
            0x89 => stack.push(Value::Bool(false)),
            b'J' => stack.push(Value::Int(i32::from_le_bytes(take(&mut pos, 4)?.try_into()?) as i64)),
            b'K' => stack.push(Value::Int(take(&mut pos, 1)?[0] as i64)),
            b'M' => stack.push(Value::Int(u16::from_le_bytes(take(&mut pos, 2)?.try_into()?) as i64)),
            0x8a => {
                // LONG1: little-endian two's complement of n bytes
                let n = take(&mut pos, 1)?[0] as usize;
                let b = take(&mut pos, n)?;
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
                stack.push(Value::Int(v));
            }
            b'G' => stack.push(Value::Float(f64::from_be_bytes(take(&mut pos, 8)?.try_into()?))),
            b'X' => {
                let n = u32::from_le_bytes(take(&mut pos, 4)?.try_into()?) as usize;
                stack.push(Value::Str(String::from_utf8(take(&mut pos, n)?.to_vec())?));
            }
            0x8c => {
                let n = take(&mut pos, 1)?[0] as usize;
                stack.push(Value::Str(String::from_utf8(take(&mut pos, n)?.to_vec())?));
            }
            b'c' => {
                // GLOBAL "module\nname\n"
                let rest = &data[pos..];
                let a = rest.iter().position(|&c| c == b'\n').context("bad GLOBAL")?;
                let b = rest[a + 1..].iter().position(|&c| c == b'\n').context("bad GLOBAL")?;
                let module = String::from_utf8(rest[..a].to_vec())?;
                let name = String::from_utf8(rest[a + 1..a + 1 + b].to_vec())?;
                pos += a + b + 2;
                stack.push(Value::Global(format!("{module}.{name}")));
            }
            0x93 => {
                // STACK_GLOBAL
                let name = pop(&mut stack)?;
                let module = pop(&mut stack)?;
                match (module, name) {
                    (Value::Str(m), Value::Str(n)) => stack.push(Value::Global(format!("{m}.{n}"))),
                    other => bail!("bad STACK_GLOBAL {other:?}"),
                }
            }
            b')' => stack.push(Value::Tuple(vec![])),
            b']' => stack.push(Value::List(vec![])),
            b'}' => stack.push(Value::Dict(vec![])),
            b't' => {
                let items = pop_mark(&mut stack)?;
                stack.push(Value::Tuple(items));
            }
            0x85..=0x87 => {
                let n = (op - 0x84) as usize;
                if stack.len() < n {
                    bail!("pickle stack underflow");
                }
                let items = stack.split_off(stack.len() - n);
                stack.push(Value::Tuple(items));
            }
            b'q' => {
                let k = take(&mut pos, 1)?[0] as u32;
                memo.insert(k, stack.last().context("empty stack")?.clone());
            }
            b'r' => {
                let k = u32::from_le_bytes(take(&mut pos, 4)?.try_into()?);
                memo.insert(k, stack.last().context("empty stack")?.clone());
            }
            0x94 => {
                let k = memo.len() as u32;
                memo.insert(k, stack.last().context("empty stack")?.clone());
            }
            b'h' => {
                let k = take(&mut pos, 1)?[0] as u32;
                stack.push(memo.get(&k).context("bad memo")?.clone());
            }
            b'j' => {
                let k = u32::from_le_bytes(take(&mut pos, 4)?.try_into()?);
                stack.push(memo.get(&k).context("bad memo")?.clone());
            }
            b'Q' => {
                // BINPERSID: ('storage', StorageType, key, location, numel)
                let pid = pop(&mut stack)?;
                let Value::Tuple(t) = pid else { bail!("unexpected persistent id {pid:?}") };
                match (t.get(1), t.get(2)) {
                    (Some(Value::Global(g)), Some(Value::Str(key))) => {
                        stack.push(Value::Storage { kind: storage_kind(g)?, key: key.clone() })
                    }
                    _ => bail!("unexpected persistent id {t:?}"),
                }
            }
            b'R' => {
                // REDUCE
                let args = pop(&mut stack)?;
                let f = pop(&mut stack)?;
                let Value::Global(g) = f else { bail!("REDUCE of a non-global {f:?}") };
                let Value::Tuple(a) = args else { bail!("REDUCE with non-tuple arguments") };
                let v = match g.as_str() {
                    "collections.OrderedDict" => Value::Dict(vec![]),
                    "torch._utils._rebuild_tensor_v2" | "torch._utils._rebuild_tensor" => {
                        let Some(Value::Storage { kind, key }) = a.first() else { bail!("tensor without storage") };
                        let offset = match a.get(1) {
                            Some(Value::Int(o)) => *o,
                            _ => bail!("tensor without offset"),
                        };
                        let size = ints(a.get(2).context("tensor without size")?)?;
                        let stride = ints(a.get(3).context("tensor without stride")?)?;
                        Value::Tensor(TensorRef { kind: *kind, key: key.clone(), offset, size, stride })
                    }
                    "torch._utils._rebuild_parameter" => a.into_iter().next().context("empty parameter")?,
                    other => bail!("unsupported object {other} in the pickle"),
                };
                stack.push(v);
            }
            b'b' => {
                // BUILD: state for OrderedDict / tensors (metadata) is ignored.
                pop(&mut stack)?;
            }
            b's' => {
                let v = pop(&mut stack)?;
                let k = pop(&mut stack)?;
                match stack.last_mut() {
                    Some(Value::Dict(d)) => d.push((k, v)),
                    _ => bail!("SETITEM outside a dict"),
                }
            }
            b'u' => {
                let items = pop_mark(&mut stack)?;
                let Some(Value::Dict(d)) = stack.last_mut() else { bail!("SETITEMS outside a dict") };
                for kv in items.chunks(2) {
                    if let [k, v] = kv {
                        d.push((k.clone(), v.clone()));
                    }
                }
            }
            b'a' => {
                let v = pop(&mut stack)?;
                match stack.last_mut() {
                    Some(Value::List(l)) => l.push(v),
                    _ => bail!("APPEND outside a list"),
                }
            }
            b'e' => {
                let items = pop_mark(&mut stack)?;
                match stack.last_mut() {
                    Some(Value::List(l)) => l.extend(items),
                    _ => bail!("APPENDS outside a list"),
                }
            }
            other => bail!("unsupported pickle opcode 0x{other:02x} at byte {}", pos - 1),
        }
    }
}

/// Reads every tensor of a `torch.save`d state dict onto the CPU, in its stored precision.
pub fn read_state_dict(path: &Path) -> Result<Vec<(String, Tensor)>> {
    let file = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut zip = zip::ZipArchive::new(std::io::BufReader::new(file)).with_context(|| {
        format!(
            "model {} is not a torch.save zip archive: expected a CLIP ViT checkpoint (OpenAI .pt, a state \
                 dict .bin or .safetensors)",
            path.display()
        )
    })?;
    let pkl_name = (0..zip.len())
        .filter_map(|i| zip.by_index(i).ok().map(|f| f.name().to_string()))
        .find(|n| n.ends_with("/data.pkl") || n == "data.pkl")
        .with_context(|| format!("{}: no data.pkl in the archive", path.display()))?;
    let prefix = pkl_name.trim_end_matches("data.pkl").to_string();
    let mut pkl = Vec::new();
    zip.by_name(&pkl_name)?.read_to_end(&mut pkl)?;
    let top = unpickle(&pkl).with_context(|| format!("{}: cannot read the pickle", path.display()))?;
    // A full checkpoint may nest the weights under "state_dict" (OpenCLIP training checkpoints).
    let dict = match top {
        Value::Dict(d) => match d.iter().find(|(k, _)| matches!(k, Value::Str(s) if s == "state_dict")) {
            Some((_, Value::Dict(inner))) => inner.clone(),
            _ => d,
        },
        other => bail!("{}: the pickle holds {other:?}, not a state dict", path.display()),
    };
    let mut storages: HashMap<String, Vec<u8>> = HashMap::new();
    let mut out = Vec::new();
    for (k, v) in dict {
        let (Value::Str(name), Value::Tensor(t)) = (k, v) else { continue };
        if !storages.contains_key(&t.key) {
            let mut buf = Vec::new();
            zip.by_name(&format!("{prefix}data/{}", t.key))
                .with_context(|| format!("{}: storage {} missing", path.display(), t.key))?
                .read_to_end(&mut buf)?;
            storages.insert(t.key.clone(), buf);
        }
        let raw = &storages[&t.key];
        let elt = t.kind.elt_size_in_bytes();
        let numel = (raw.len() / elt) as i64;
        let storage = Tensor::f_from_data_size(raw, &[numel], t.kind)?;
        // The furthest element the view reaches must lie inside the storage.
        let reach: i64 = t.offset + t.size.iter().zip(&t.stride).map(|(s, st)| (s - 1).max(0) * st).sum::<i64>();
        if t.size.iter().all(|&s| s > 0) && reach >= numel {
            bail!("{}: tensor {name} reaches past its storage", path.display());
        }
        let tensor = storage.as_strided(&t.size, &t.stride, Some(t.offset)).contiguous();
        out.push((name, tensor));
    }
    Ok(out)
}
