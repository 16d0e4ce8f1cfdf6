//! The `.npz` map archives of `generate --save-cams` (`OUT/cams/<id>.npz`): written as numpy
//! writes them, read without trusting them, stored at full or reduced size (see
//! [`super::cam_storage`]) and always handed to callers at full size in float32.
use super::cam_storage::{self, CamDtype, CamStorage};
use crate::files::write_atomic;
use anyhow::{bail, Context, Result};
use ndarray::{Array1, Array3};
use std::path::Path;

/// The maps `generate --save-cams` writes for one image (`OUT/cams/<id>.npz`).
pub struct CamArchive {
    /// 0-based class indices of the image's labels, in label order.
    pub keys: Vec<i64>,
    /// Refined (CAA) maps, K x H x W, at original resolution.
    pub cams: Array3<f32>,
    /// GradCAM maps resized the same way, K x H x W.
    pub raw_cams: Array3<f32>,
}

/// A `.npy` header (version 1.0) for `descr` and `shape`, padded to a multiple of 64 bytes as
/// numpy pads it.
fn npy_header(descr: &str, shape: &[usize]) -> Vec<u8> {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let shape = if dims.len() == 1 { format!("({},)", dims[0]) } else { format!("({})", dims.join(", ")) };
    let mut header = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
    let unpadded = 10 + header.len() + 1;
    header.push_str(&" ".repeat(unpadded.next_multiple_of(64) - unpadded));
    header.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend((header.len() as u16).to_le_bytes());
    out.extend(header.as_bytes());
    out
}

/// A `.npy` file of strings, as numpy writes `np.array(names)`: dtype `<U{longest}` (UTF-32LE,
/// zero-padded), shape (K,).
fn npy_strings(names: &[String]) -> Vec<u8> {
    let width = names.iter().map(|n| n.chars().count()).max().unwrap_or(0).max(1);
    let mut out = npy_header(&format!("<U{width}"), &[names.len()]);
    for n in names {
        let chars: Vec<char> = n.chars().collect();
        for k in 0..width {
            out.extend((chars.get(k).copied().unwrap_or('\0') as u32).to_le_bytes());
        }
    }
    out
}

/// Maps as a `.npy` file of `dtype`.
fn npy_maps(maps: &Array3<f32>, dtype: CamDtype) -> Result<Vec<u8>> {
    use ndarray_npy::WriteNpyExt;
    Ok(match dtype {
        CamDtype::Float32 => {
            let mut npy = Vec::new();
            maps.write_npy(&mut npy)?;
            npy
        }
        CamDtype::Float16 => {
            let (k, h, w) = maps.dim();
            let mut npy = npy_header("<f2", &[k, h, w]);
            npy.extend(cam_storage::to_f16_bytes(maps.iter().copied()));
            npy
        }
    })
}

impl CamArchive {
    /// Writes the archive: `keys`, `cams`, `raw_cams`.
    pub fn write(&self, path: &Path) -> Result<()> {
        self.write_named(path, None)
    }

    /// [`CamArchive::write`], plus `class_names` (one per key, numpy strings) when given, so that
    /// an archive says which classes its maps are without the config.
    pub fn write_named(&self, path: &Path, class_names: Option<&[String]>) -> Result<()> {
        self.write_stored(path, class_names, CamStorage::default())
    }

    /// [`CamArchive::write_named`] with the maps stored as `storage` says: `cams` and
    /// `raw_cams` in its dtype, and with a stride above 1 average-pooled to
    /// ceil(H / stride) x ceil(W / stride), with `stride` (int64 scalar) and `size` (int64
    /// [H, W], the original size) added so that readers can restore the original size.
    pub fn write_stored(&self, path: &Path, class_names: Option<&[String]>, storage: CamStorage) -> Result<()> {
        use ndarray_npy::WriteNpyExt;
        use std::io::Write;
        let stride = cam_storage::check_stride(storage.stride as i64)? as usize;
        let mut entries: Vec<(&str, Vec<u8>)> = Vec::new();
        let mut npy = Vec::new();
        Array1::from(self.keys.clone()).write_npy(&mut npy)?;
        entries.push(("keys.npy", npy));
        if let Some(names) = class_names {
            entries.push(("class_names.npy", npy_strings(names)));
        }
        for (name, arr) in [("cams.npy", &self.cams), ("raw_cams.npy", &self.raw_cams)] {
            let npy = if stride > 1 {
                npy_maps(&cam_storage::downsample(arr, stride), storage.dtype)?
            } else {
                npy_maps(arr, storage.dtype)?
            };
            entries.push((name, npy));
        }
        if stride > 1 {
            let (_, h, w) = self.cams.dim();
            let mut npy = Vec::new();
            ndarray::arr0(stride as i64).write_npy(&mut npy)?;
            entries.push(("stride.npy", npy));
            let mut npy = Vec::new();
            Array1::from(vec![h as i64, w as i64]).write_npy(&mut npy)?;
            entries.push(("size.npy", npy));
        }
        write_atomic(path, |w| {
            let mut zip = zip::ZipWriter::new(w);
            let options = zip::write::SimpleFileOptions::default()
                .compression_method(zip::CompressionMethod::Deflated)
                .large_file(false);
            let added = (|| -> Result<()> {
                for (name, bytes) in &entries {
                    zip.start_file(*name, options)?;
                    zip.write_all(bytes)?;
                }
                Ok(())
            })();
            if let Err(e) = added {
                // Dropping a failed zip writer retries the write and prints "ZipWriter drop
                // failed" to stderr (a full disk would print it for every image): the error is
                // reported once, as this image's failure, and the writer is not dropped.
                std::mem::forget(zip);
                return Err(e);
            }
            zip.finish()?;
            Ok(())
        })
    }

    /// Reads an archive without trusting it: only a regular file, each entry's size checked
    /// against its compressed size (deflate expands at most ~1032x) and its `.npy` header
    /// against the bytes it holds before any array is allocated, so a crafted archive cannot
    /// make the reader allocate more than about a thousand times its own size. Maps stored in
    /// float16 come back in float32, maps stored at a stride at their original size (`size`;
    /// bilinear, [`cam_storage::upsample`]). Values are not checked here: see
    /// [`CamArchive::validate`].
    pub fn read(path: &Path) -> Result<Self> {
        let file = crate::files::open_regular(path)?;
        let mut zip = zip::ZipArchive::new(std::io::BufReader::new(file))
            .with_context(|| format!("{} is not an .npz archive", path.display()))?;
        let keys = read_entry(&mut zip, "keys", path)?.int64s(1)?;
        let mut cams = read_entry(&mut zip, "cams", path)?.maps()?;
        let mut raw_cams = read_entry(&mut zip, "raw_cams", path)?.maps()?;
        let names = zip.file_names().map(str::to_string).collect::<Vec<_>>();
        let has = |n: &str| names.iter().any(|f| f == n);
        match (has("stride.npy"), has("size.npy")) {
            (false, false) => {}
            (true, true) => {
                let bad = |why: String| anyhow::anyhow!("{}: {why}", path.display());
                let stride = read_entry(&mut zip, "stride", path)?.int64s(0)?;
                let stride = cam_storage::check_stride(stride[0]).map_err(|e| bad(format!("`stride`: {e}")))? as usize;
                let size = read_entry(&mut zip, "size", path)?.int64s(1)?;
                let [h, w] = size[..] else {
                    return Err(bad(format!("`size` holds {} values, not [H, W]", size.len())));
                };
                for (name, maps) in [("cams", &cams), ("raw_cams", &raw_cams)] {
                    let (_, ph, pw) = maps.dim();
                    let fits =
                        |full: i64, stored: usize| full > 0 && (full as u64).div_ceil(stride as u64) == stored as u64;
                    if !(fits(h, ph) && fits(w, pw)) {
                        return Err(bad(format!(
                            "`{name}` is {ph}x{pw}, not the size {h}x{w} at stride {stride} (ceil(size / stride))"
                        )));
                    }
                }
                cams = cam_storage::upsample(&cams, h as usize, w as usize);
                raw_cams = cam_storage::upsample(&raw_cams, h as usize, w as usize);
            }
            _ => bail!("{}: `stride` and `size` go together (maps stored at a stride)", path.display()),
        }
        Ok(CamArchive { keys, cams, raw_cams })
    }

    /// Checks the archive against a config of `n_classes` foreground classes before its maps
    /// `key` ("cams" or "raw_cams") are used: at least one key, keys unique and in
    /// 0..n_classes, one key per map, every value finite and in [0, 1]. Values within
    /// [`MAP_TOLERANCE`] of [0, 1] (rounding in resizing) are clamped into it; anything else is
    /// an error naming the problem.
    pub fn validate(&mut self, key: &str, n_classes: usize) -> Result<()> {
        let maps = if key == "raw_cams" { &mut self.raw_cams } else { &mut self.cams };
        let k = maps.dim().0;
        if self.keys.is_empty() {
            bail!("no keys: an archive needs one class index per map");
        }
        if self.keys.len() != k {
            bail!("{} keys but {} maps in `{key}`", self.keys.len(), k);
        }
        if let Some(bad) = self.keys.iter().find(|&&c| c < 0 || c as u64 >= n_classes as u64) {
            bail!("key {bad} is not a class index of the config (0..={})", n_classes - 1);
        }
        let mut seen = std::collections::HashSet::new();
        if let Some(dup) = self.keys.iter().find(|&&c| !seen.insert(c)) {
            bail!("key {dup} appears twice: keys must be unique");
        }
        if let Some(v) = maps.iter().find(|v| !v.is_finite()) {
            bail!("`{key}` holds a non-finite value ({v})");
        }
        let range = -MAP_TOLERANCE..=1.0 + MAP_TOLERANCE;
        if let Some(v) = maps.iter().find(|v| !range.contains(*v)) {
            bail!("`{key}` holds {v}, outside [0, 1]: maps are normalised scores");
        }
        maps.mapv_inplace(|v| v.clamp(0.0, 1.0));
        Ok(())
    }
}

/// How far outside [0, 1] a saved map value may be and still be accepted (and clamped).
pub const MAP_TOLERANCE: f32 = 1e-3;

/// Largest expansion of a deflate stream (a 258-byte match per 2 bits, about 1032:1).
const MAX_DEFLATE_RATIO: u64 = 1032;

/// Longest `.npy` header accepted: numpy writes a few hundred bytes; a bound keeps the header
/// parser's work (and recursion) small.
const MAX_NPY_HEADER: usize = 4096;

/// One `.npy` entry of an archive, its header parsed and its data length checked against it.
struct Entry<'a> {
    name: String,
    path: &'a Path,
    bytes: Vec<u8>,
    header: ndarray_npy::npy::header::Header,
    data: usize,
}

impl Entry<'_> {
    fn bad(&self, why: String) -> anyhow::Error {
        anyhow::anyhow!("{}: `{}` {why}", self.path.display(), self.name)
    }

    /// The dtype as numpy spells it (`<f4`), without the literal's quotes.
    fn descr(&self) -> String {
        self.header.type_descriptor.to_string().trim_matches(['\'', '"']).to_string()
    }

    /// int64 values of an array of `ndim` dimensions (0: a scalar).
    fn int64s(self, ndim: usize) -> Result<Vec<i64>> {
        if self.header.shape.len() != ndim {
            return Err(self.bad(format!("has shape {:?}, expected {ndim} dimensions", self.header.shape)));
        }
        use ndarray_npy::ReadNpyExt;
        let arr =
            ndarray::ArrayD::<i64>::read_npy(&self.bytes[..]).map_err(|e| self.bad(format!("cannot be read: {e}")))?;
        Ok(arr.iter().copied().collect())
    }

    /// K x H x W maps, float32 or float16 (returned as float32).
    fn maps(self) -> Result<Array3<f32>> {
        use ndarray_npy::ReadNpyExt;
        let shape = self.header.shape.clone();
        let [k, h, w] = shape[..] else { return Err(self.bad(format!("has shape {shape:?}, expected K x H x W"))) };
        if self.descr() == "<f2" {
            if self.header.layout.is_fortran() {
                return Err(self.bad("is a Fortran-order float16 array (write it in C order)".into()));
            }
            let values = cam_storage::from_f16_bytes(&self.bytes[self.bytes.len() - self.data..]);
            return Array3::from_shape_vec((k, h, w), values).map_err(|e| self.bad(format!("cannot be read: {e}")));
        }
        Array3::<f32>::read_npy(&self.bytes[..]).map_err(|e| self.bad(format!("cannot be read: {e}")))
    }
}

/// Entry `name` of an `.npz` archive, with every size checked before it is allocated.
fn read_entry<'a, R>(zip: &mut zip::ZipArchive<R>, name: &str, path: &'a Path) -> Result<Entry<'a>>
where
    R: std::io::Read + std::io::Seek,
{
    use std::io::Read;
    let bad = |why: String| anyhow::anyhow!("{}: `{name}` {why}", path.display());
    let entry = match zip.by_name(&format!("{name}.npy")) {
        Ok(e) => e,
        Err(zip::result::ZipError::FileNotFound) => bail!("{}: no `{name}`", path.display()),
        Err(e) => return Err(bad(format!("cannot be read: {e}"))),
    };
    let size = entry.size();
    if size > entry.compressed_size().saturating_mul(MAX_DEFLATE_RATIO).saturating_add(4096) {
        return Err(bad(format!("claims {size} bytes from {} compressed bytes", entry.compressed_size())));
    }
    let mut bytes = Vec::new();
    let n = usize::try_from(size).map_err(|_| bad(format!("claims {size} bytes")))?;
    bytes.try_reserve_exact(n).map_err(|_| bad(format!("needs {size} bytes: not enough memory")))?;
    entry.take(size + 1).read_to_end(&mut bytes).map_err(|e| bad(format!("cannot be read: {e}")))?;
    if bytes.len() as u64 != size {
        return Err(bad(format!("holds {} bytes, not the {size} its entry declares", bytes.len())));
    }
    // The header's length field first (the parser would allocate it blindly), then the header,
    // then the data length its shape and dtype imply.
    let (start, header_len) = match (bytes.get(..8), bytes.get(8..12)) {
        (Some(m), Some(l)) if m.starts_with(b"\x93NUMPY") && m[6] == 1 => {
            (10, u16::from_le_bytes([l[0], l[1]]) as usize)
        }
        (Some(m), Some(l)) if m.starts_with(b"\x93NUMPY") && (m[6] == 2 || m[6] == 3) => {
            (12, u32::from_le_bytes([l[0], l[1], l[2], l[3]]) as usize)
        }
        _ => return Err(bad("is not an .npy array".into())),
    };
    if header_len > MAX_NPY_HEADER || start + header_len > bytes.len() {
        return Err(bad(format!("has a {header_len}-byte header")));
    }
    let depth = bytes[start..start + header_len].iter().try_fold((0i32, 0i32), |(d, max), &b| match b {
        b'(' | b'[' | b'{' => Some((d + 1, max.max(d + 1))),
        b')' | b']' | b'}' => Some((d - 1, max)),
        _ => Some((d, max)),
    });
    if depth.is_none_or(|(_, max)| max > 4) {
        return Err(bad("has a malformed header".into()));
    }
    let mut reader = &bytes[..];
    let header = ndarray_npy::npy::header::Header::from_reader(&mut reader)
        .map_err(|e| bad(format!("has a bad header: {e}")))?;
    let data = reader.len();
    let entry = Entry { name: name.to_string(), path, bytes, header, data };
    let descr = entry.descr();
    // The dtypes an archive holds: int64 keys and sizes, float32 or float16 maps.
    let element = match (name, descr.as_str()) {
        ("keys" | "stride" | "size", "<i8" | ">i8") => 8u64,
        ("cams" | "raw_cams", "<f4" | ">f4") => 4,
        ("cams" | "raw_cams", "<f2") => 2,
        (_, d) => return Err(entry.bad(format!("has dtype {d}, not one an archive holds"))),
    };
    let elements = entry.header.shape.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d as u64));
    if elements.and_then(|e| e.checked_mul(element)) != Some(data as u64) {
        return Err(entry.bad(format!("has shape {:?} but {data} bytes of data", entry.header.shape)));
    }
    Ok(entry)
}
