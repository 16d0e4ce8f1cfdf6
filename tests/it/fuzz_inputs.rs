//! A seeded, bounded fuzz of the image decode path and the `.npz` reader. Random
//! bytes and byte-level mutations of valid files (every supported format, and the VOC sample
//! photos when ../shared/data is present) must never panic, never hang and never allocate past
//! the pixel budget: a counting global allocator measures the peak of Rust allocations during
//! each decode (libjpeg's own C allocations are bounded by the header check that precedes them).
use crate::support::{rng, synthetic_image, voc_sample, Rng, StdRng};
use clipmask::image_input::decode_rgb_limited;
use clipmask::outputs::CamArchive;
use std::alloc::{GlobalAlloc, Layout, System};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Counts live bytes and their peak.
struct Counting;

pub(crate) static LIVE: AtomicUsize = AtomicUsize::new(0);
pub(crate) static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(l) };
        if !p.is_null() {
            let now = LIVE.fetch_add(l.size(), Ordering::Relaxed) + l.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) };
        LIVE.fetch_sub(l.size(), Ordering::Relaxed);
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        let q = unsafe { System.realloc(p, l, new) };
        if !q.is_null() {
            if new >= l.size() {
                let now = LIVE.fetch_add(new - l.size(), Ordering::Relaxed) + new - l.size();
                PEAK.fetch_max(now, Ordering::Relaxed);
            } else {
                LIVE.fetch_sub(l.size() - new, Ordering::Relaxed);
            }
        }
        q
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// The tests measuring the global counter (these and pickle_fuzz.rs): one at a time.
pub(crate) static SERIAL: Mutex<()> = Mutex::new(());

/// Byte-level mutations: bit flips, bytes set to extremes (sizes in headers), deletions,
/// insertions, truncation, duplicated runs.
pub(crate) fn mutate(rng: &mut StdRng, base: &[u8]) -> Vec<u8> {
    let mut v = base.to_vec();
    for _ in 0..rng.random_range(1..=4) {
        if v.is_empty() {
            v.push(rng.random());
            continue;
        }
        // Headers matter most: half the mutations land in the first 64 bytes.
        let i = if rng.random() { rng.random_range(0..v.len().min(64)) } else { rng.random_range(0..v.len()) };
        match rng.random_range(0..7) {
            0 => v[i] ^= 1 << rng.random_range(0..8),
            1 => v[i] = [0x00, 0xFF, 0x7F, 0x80][rng.random_range(0..4)],
            2 => {
                v.remove(i);
            }
            3 => v.insert(i, rng.random()),
            4 => v.truncate(i.max(1)),
            5 => {
                let j = (i + rng.random_range(0..64)).min(v.len());
                let chunk = v[i..j].to_vec();
                v.splice(i..i, chunk);
            }
            _ => v[i] = rng.random(),
        }
    }
    v
}

/// Runs `f` on every case with a watchdog (a case running past `limit` aborts the test binary
/// with a message: a hang fails instead of blocking `make test`). Panics are collected.
pub(crate) fn run_cases(what: &str, cases: &[Vec<u8>], limit: Duration, mut f: impl FnMut(&[u8])) {
    let busy = std::sync::Arc::new((AtomicUsize::new(usize::MAX), AtomicBool::new(false)));
    let b = busy.clone();
    let what_s = what.to_string();
    let watchdog = std::thread::spawn(move || {
        let mut last = (usize::MAX, Instant::now());
        while !b.1.load(Ordering::SeqCst) {
            let cur = b.0.load(Ordering::SeqCst);
            if cur != last.0 {
                last = (cur, Instant::now());
            } else if cur != usize::MAX && last.1.elapsed() > limit {
                eprintln!("{what_s}: case {cur} ran for more than {limit:?}: a hang");
                std::process::abort();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    let prev = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let mut panics = Vec::new();
    for (i, c) in cases.iter().enumerate() {
        busy.0.store(i, Ordering::SeqCst);
        if let Err(e) = catch_unwind(AssertUnwindSafe(|| f(c))) {
            let msg = e
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            panics.push(format!("case {i} ({} bytes): {msg}", c.len()));
        }
        busy.0.store(usize::MAX, Ordering::SeqCst);
    }
    std::panic::set_hook(prev);
    busy.1.store(true, Ordering::SeqCst);
    watchdog.join().unwrap();
    assert!(panics.is_empty(), "{what}: {} of {} inputs panicked:\n{}", panics.len(), cases.len(), panics.join("\n"));
}

/// Valid small files of every decoded format, plus VOC photos when available.
fn seeds() -> Vec<Vec<u8>> {
    let img = image::DynamicImage::ImageRgb8(synthetic_image(40, 30, 7));
    let mut out = Vec::new();
    for fmt in [
        image::ImageFormat::Jpeg,
        image::ImageFormat::Png,
        image::ImageFormat::Gif,
        image::ImageFormat::Bmp,
        image::ImageFormat::Tiff,
        image::ImageFormat::WebP,
    ] {
        let mut b = Vec::new();
        img.write_to(&mut std::io::Cursor::new(&mut b), fmt).unwrap();
        out.push(b);
    }
    let mut b = Vec::new();
    img.to_luma16().write_to(&mut std::io::Cursor::new(&mut b), image::ImageFormat::Png).unwrap();
    out.push(b);
    if let Some(voc) = voc_sample() {
        let mut photos: Vec<_> =
            std::fs::read_dir(voc.join("JPEGImages")).unwrap().flatten().map(|e| e.path()).collect();
        photos.sort();
        out.extend(photos.iter().take(2).map(|p| std::fs::read(p).unwrap()));
    }
    out
}

#[test]
fn image_decoding_survives_random_and_mutated_files_within_the_budget() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let max_pixels: u64 = 250_000;
    // What a decode may hold at once: the decoder's allowance (16 bytes a budget pixel, at
    // least 64 MiB for header parsing), the RGB copy, the file, and 4 MiB of decoder state.
    let seeds = seeds();
    let largest = seeds.iter().map(Vec::len).max().unwrap();
    let bound = (max_pixels * 16).max(64 << 20) as usize + (max_pixels * 3) as usize + 2 * largest + (4 << 20);
    let mut rng = rng(13);
    let mut cases: Vec<Vec<u8>> = Vec::new();
    for _ in 0..120 {
        let n = rng.random_range(0..3000);
        cases.push((0..n).map(|_| rng.random()).collect());
    }
    // Random bytes behind each format's magic number reach the decoders' header parsers.
    for magic in [&b"\xFF\xD8\xFF\xE0"[..], b"\x89PNG\r\n\x1a\n", b"GIF89a", b"BM", b"II*\0", b"RIFF\0\0\0\0WEBPVP8 "] {
        for _ in 0..20 {
            let n = rng.random_range(0..400);
            let mut c = magic.to_vec();
            c.extend((0..n).map(|_| rng.random::<u8>()));
            cases.push(c);
        }
    }
    for seed in &seeds {
        for _ in 0..200 {
            cases.push(mutate(&mut rng, seed));
        }
    }
    // Headers that lie: the JPEG seed claiming 65535 x 65535 (4.3 gigapixels, 12.9 GB of RGB).
    let jpeg = &seeds[0];
    let sof = jpeg.windows(2).position(|m| m[0] == 0xFF && (0xC0..=0xC2).contains(&m[1])).expect("SOF");
    for (w, h) in [(65535u16, 65535u16), (65535, 1), (1, 65535), (600, 500), (0, 10)] {
        let mut c = jpeg.clone();
        c[sof + 5..sof + 7].copy_from_slice(&h.to_be_bytes());
        c[sof + 7..sof + 9].copy_from_slice(&w.to_be_bytes());
        cases.push(c);
    }
    let t = Instant::now();
    let mut decoded = 0;
    let mut worst = 0usize;
    run_cases("decode", &cases, Duration::from_secs(10), |c| {
        let base = LIVE.load(Ordering::SeqCst);
        PEAK.store(base, Ordering::SeqCst);
        let r = decode_rgb_limited(c, Path::new("fuzz.img"), max_pixels);
        let peak = PEAK.load(Ordering::SeqCst) - base;
        worst = worst.max(peak);
        assert!(peak <= bound, "peak allocation {peak} bytes over the bound {bound}");
        if let Ok(img) = r {
            assert!(img.width() as u64 * img.height() as u64 <= max_pixels);
            decoded += 1;
        }
    });
    eprintln!(
        "{} inputs, {decoded} decoded, worst peak {:.1} MiB, {:.1} s",
        cases.len(),
        worst as f64 / (1 << 20) as f64,
        t.elapsed().as_secs_f64()
    );
    assert!(decoded >= seeds.len(), "the unmutated-like cases should decode sometimes ({decoded})");
}

#[test]
fn npz_reading_and_validation_survive_random_and_mutated_archives() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let valid = dir.path().join("valid.npz");
    let maps = ndarray::Array3::from_shape_fn((2, 12, 16), |(k, y, x)| ((k + y + x) % 7) as f32 / 7.0);
    CamArchive { keys: vec![3, 11], cams: maps.clone(), raw_cams: maps.clone() }.write(&valid).unwrap();
    let mut plain = Vec::new();
    {
        let mut npz = ndarray_npy::NpzWriter::new(std::io::Cursor::new(&mut plain));
        npz.add_array("keys", &ndarray::Array1::from(vec![3i64, 11])).unwrap();
        npz.add_array("cams", &maps).unwrap();
        npz.add_array("raw_cams", &maps).unwrap();
        npz.finish().unwrap();
    }
    // Headers that lie: the uncompressed archive with `cams` claiming 2e6 x 12000 x 16 floats
    // (1.5 TB), padding shortened to keep the header's length.
    let lying = {
        let key = b"'shape': (";
        let at = plain.windows(key.len()).position(|w| w == key).expect("shape in a header") + key.len();
        let end = at + plain[at..].iter().position(|&b| b == b')').unwrap();
        let newline = end + plain[end..].iter().position(|&b| b == b'\n').unwrap();
        let dims = b"2000000, 12000, 16";
        let grow = dims.len() - (end - at);
        assert!(plain[newline - grow..newline].iter().all(|&b| b == b' '), "room in the header padding");
        let mut c = plain[..at].to_vec();
        c.extend(dims);
        c.extend(&plain[end..newline - grow]);
        c.extend(&plain[newline..]);
        assert_eq!(c.len(), plain.len());
        c
    };
    let seeds = [std::fs::read(&valid).unwrap(), plain];
    let mut rng = rng(31);
    let mut cases: Vec<Vec<u8>> =
        (0..60).map(|_| (0..rng.random_range(0..2000)).map(|_| rng.random()).collect()).collect();
    cases.push(lying);
    for seed in &seeds {
        for _ in 0..250 {
            cases.push(mutate(&mut rng, seed));
        }
    }
    let path = dir.path().join("case.npz");
    let mut read_ok = 0;
    let mut valid_ok = 0;
    // A claimed array shape is not trusted: reading never holds more than a few times the file.
    let bound = 64 << 20;
    run_cases("npz", &cases, Duration::from_secs(10), |c| {
        std::fs::write(&path, c).unwrap();
        let base = LIVE.load(Ordering::SeqCst);
        PEAK.store(base, Ordering::SeqCst);
        if let Ok(mut a) = CamArchive::read(&path) {
            read_ok += 1;
            if a.validate("cams", 20).is_ok() {
                valid_ok += 1;
                assert!(a.cams.iter().all(|v| (0.0..=1.0).contains(v)));
                assert!(a.keys.iter().all(|&k| (0..20).contains(&k)) && a.keys.len() == a.cams.dim().0);
            }
        }
        let peak = PEAK.load(Ordering::SeqCst) - base;
        assert!(peak <= bound, "peak allocation {peak} bytes reading a {}-byte archive", c.len());
    });
    eprintln!("{} archives, {read_ok} read, {valid_ok} valid", cases.len());
    assert!(valid_ok > 0, "some mutations keep the archive valid");
}
