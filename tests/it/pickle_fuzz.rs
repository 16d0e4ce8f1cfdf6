//! The torch.save reader (src/clip/torch_pickle.rs) under a seeded, bounded fuzz, and a memory
//! bomb like a reported 775-byte `pytorch_model.bin` end to end. The pickle of a checkpoint comes
//! from anyone (`--model org/name`): a few hundred bytes of MEMOIZE / GET / APPEND once doubled a
//! list until the process died. Mutations of valid `torch.save` archives (written by torch
//! itself) and hand-made bombs must never panic, never hang, and never make the reader allocate
//! more than a constant times the file (the counting allocator of fuzz_inputs.rs measures Rust's
//! heap; what libtorch allocates is the tensors returned, checked separately).
use crate::fuzz_inputs::{mutate, run_cases, LIVE, PEAK, SERIAL};
use crate::support::*;
use clipmask::clip::torch_pickle::read_state_dict;
use std::io::{Cursor, Read, Write};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tch::{Device, Kind, Tensor};

/// A zip archive of `entries`, stored (as torch.save writes) or deflated.
fn zip_of(entries: &[(String, Vec<u8>)], deflate: bool) -> Vec<u8> {
    let method = if deflate { zip::CompressionMethod::Deflated } else { zip::CompressionMethod::Stored };
    let mut w = zip::ZipWriter::new(Cursor::new(Vec::new()));
    for (name, data) in entries {
        w.start_file(name.as_str(), zip::write::SimpleFileOptions::default().compression_method(method)).unwrap();
        w.write_all(data).unwrap();
    }
    w.finish().unwrap().into_inner()
}

fn entries_of(archive: &[u8]) -> Vec<(String, Vec<u8>)> {
    let mut z = zip::ZipArchive::new(Cursor::new(archive)).unwrap();
    (0..z.len())
        .map(|i| {
            let mut f = z.by_index(i).unwrap();
            let mut data = Vec::new();
            f.read_to_end(&mut data).unwrap();
            (f.name().to_string(), data)
        })
        .collect()
}

/// The archive with its data.pkl replaced (the CRC recomputed, so the pickle machine sees it).
fn with_pickle(entries: &[(String, Vec<u8>)], pkl: Vec<u8>) -> Vec<u8> {
    let e: Vec<(String, Vec<u8>)> = entries
        .iter()
        .map(|(n, d)| (n.clone(), if n.ends_with("data.pkl") { pkl.clone() } else { d.clone() }))
        .collect();
    zip_of(&e, false)
}

/// An archive holding one pickle and the given storages (`archive/data/<key>`).
fn archive(pkl: &[u8], storages: &[(&str, Vec<u8>)]) -> Vec<u8> {
    let mut e = vec![("archive/data.pkl".to_string(), pkl.to_vec())];
    e.extend(storages.iter().map(|(k, d)| (format!("archive/data/{k}"), d.clone())));
    zip_of(&e, false)
}

/// The reported bomb: a list memoized, then `n` times GET of the memo, APPEND, MEMOIZE: each
/// copy doubles (709 bytes for n = 140, 2^140 nodes).
fn list_bomb(n: usize) -> Vec<u8> {
    let mut p = b"\x80\x02]K\x01aq\x00".to_vec();
    for _ in 0..n {
        p.extend(b"h\x00aq\x00");
    }
    p.push(b'.');
    p
}

/// A pickle int (LONG1, 8 bytes).
fn long(v: i64) -> Vec<u8> {
    let mut b = vec![0x8a, 8];
    b.extend(v.to_le_bytes());
    b
}

/// A tensor of `tensor_pickle`: name, storage key, offset, size, stride.
type TensorSpec<'a> = (&'a str, &'a str, i64, Vec<i64>, Vec<i64>);

/// A state dict pickle as torch.save writes it (protocol 2, `_rebuild_tensor_v2` over float
/// storages).
fn tensor_pickle(tensors: &[TensorSpec]) -> Vec<u8> {
    let s = |b: &mut Vec<u8>, t: &str| {
        b.push(b'X');
        b.extend((t.len() as u32).to_le_bytes());
        b.extend(t.as_bytes());
    };
    let ints = |b: &mut Vec<u8>, v: &[i64]| {
        b.push(b'(');
        for &x in v {
            b.extend(long(x));
        }
        b.push(b't');
    };
    let mut b = b"\x80\x02}q\x00(".to_vec();
    for (name, key, offset, size, stride) in tensors {
        s(&mut b, name);
        b.extend(b"ctorch._utils\n_rebuild_tensor_v2\n((");
        s(&mut b, "storage");
        b.extend(b"ctorch\nFloatStorage\n");
        s(&mut b, key);
        s(&mut b, "cpu");
        b.extend(b"K\x01tQ");
        b.extend(long(*offset));
        ints(&mut b, size);
        ints(&mut b, stride);
        b.extend(b"\x89ccollections\nOrderedDict\n)RtR");
    }
    b.extend(b"u.");
    b
}

/// Hand-made bombs and lies, each a whole archive: (what, archive, a word of the error).
fn bombs() -> Vec<(&'static str, Vec<u8>, &'static str)> {
    let mut out = vec![("list doubling (the reported bomb)", archive(&list_bomb(140), &[]), "work budget")];
    // A dict: SETITEMS of a copy of itself under key 1.
    let mut p = b"\x80\x02}q\x00".to_vec();
    for _ in 0..120 {
        p.extend(b"(K\x01h\x00uq\x00");
    }
    out.push(("dict doubling", archive(&[p, b".".to_vec()].concat(), &[]), "work budget"));
    // A tuple of two copies of the previous one, memoized: nothing mutated, still doubling.
    let mut p = b"\x80\x02K\x01q\x00".to_vec();
    for _ in 0..120 {
        p.extend(b"h\x00h\x00\x86q\x00");
    }
    out.push(("tuple doubling", archive(&[p, b".".to_vec()].concat(), &[]), "work budget"));
    // Copies of one large tuple: 100 000 items, then GET a thousand times.
    let mut p = b"\x80\x02(".to_vec();
    p.extend(std::iter::repeat_n(b'N', 100_000));
    p.extend(b"tq\x00");
    p.extend(std::iter::repeat_n(*b"h\x00", 1000).flatten());
    out.push(("one large tuple copied", archive(&[p, b".".to_vec()].concat(), &[]), "work budget"));
    // Nesting: lists 50 000 deep (APPEND each into the one below), tuples 100 000 deep.
    let mut p = b"\x80\x02".to_vec();
    p.extend(std::iter::repeat_n(b']', 50_000));
    p.extend(std::iter::repeat_n(b'a', 49_999));
    out.push(("lists 50 000 deep", archive(&[p, b".".to_vec()].concat(), &[]), "nest more than 32"));
    let mut p = b"\x80\x02)".to_vec();
    p.extend(std::iter::repeat_n(0x85u8, 100_000));
    out.push(("tuples 100 000 deep", archive(&[p, b".".to_vec()].concat(), &[]), "nest more than 32"));
    // Lengths that lie: BINUNICODE of 4 GiB, LONG1 of 255 bytes, a GLOBAL without its newline.
    out.push(("BINUNICODE of 4 GiB", archive(b"\x80\x02X\xff\xff\xff\xffabc.", &[]), "ends early"));
    out.push((
        "LONG1 of 255 bytes",
        archive(&[&b"\x80\x02\x8a\xff"[..], &[0x7f; 255], b"."].concat(), &[]),
        "integer too large",
    ));
    out.push(("GLOBAL without newline", archive(&[&b"\x80\x02c"[..], &[b'x'; 10_000]].concat(), &[]), "bad GLOBAL"));
    // A million MARKs; 200 000 memo entries under distinct keys.
    out.push(("a million MARKs", archive(&[vec![b'('; 1_000_000], b"t.".to_vec()].concat(), &[]), "not a state dict"));
    let mut p = b"\x80\x02N".to_vec();
    for k in 0..200_000u32 {
        p.push(b'r');
        p.extend(k.to_le_bytes());
    }
    out.push(("200 000 memo entries", archive(&[p, b".".to_vec()].concat(), &[]), "not a state dict"));
    // data.pkl deflated 1000 to 1: 20 MB of zeros (BINUNICODE) in a ~20 KB archive.
    let mut p = b"\x80\x02X\x00\x00\x40\x01".to_vec();
    p.extend(vec![b'0'; 0x0140_0000]);
    p.push(b'.');
    out.push(("deflated data.pkl 1000:1", zip_of(&[("archive/data.pkl".into(), p)], true), "larger than"));
    // Tensor views: 10^10 elements over one float (zero strides), a thousand views of one
    // 64 KiB storage, negative strides, overflowing reach and element counts, 100 dimensions.
    let one = vec![0u8; 4];
    let t = |size: Vec<i64>, stride: Vec<i64>, offset: i64| tensor_pickle(&[("w", "0", offset, size, stride)]);
    out.push((
        "expanded view",
        archive(&t(vec![100_000, 100_000], vec![0, 0], 0), &[("0", one.clone())]),
        "bytes of storage",
    ));
    let many: Vec<_> = (0..1000).map(|i| (format!("w{i}"), "0", 0, vec![16384], vec![1])).collect();
    let many: Vec<_> = many.iter().map(|(n, k, o, s, st)| (n.as_str(), *k, *o, s.clone(), st.clone())).collect();
    out.push((
        "a thousand views of one storage",
        archive(&tensor_pickle(&many), &[("0", vec![0u8; 65536])]),
        "bytes of storage",
    ));
    out.push(("negative stride", archive(&t(vec![2], vec![-1], 1), &[("0", vec![0u8; 8])]), "negative"));
    out.push(("negative size", archive(&t(vec![-5], vec![1], 0), &[("0", one.clone())]), "negative"));
    out.push(("reach overflows", archive(&t(vec![4, 2], vec![1 << 62, 1], 0), &[("0", one.clone())]), "reaches past"));
    out.push((
        "count overflows",
        archive(&t(vec![1 << 40, 1 << 40], vec![0, 0], 0), &[("0", one.clone())]),
        "too many elements",
    ));
    out.push(("offset past storage", archive(&t(vec![1], vec![1], 1 << 40), &[("0", one.clone())]), "reaches past"));
    out.push(("100 dimensions", archive(&t(vec![1; 100], vec![1; 100], 0), &[("0", one.clone())]), "100 sizes"));
    out.push(("storage missing", archive(&t(vec![1], vec![1], 0), &[]), "missing"));
    out.push(("storage of 3 bytes", archive(&t(vec![1], vec![1], 0), &[("0", vec![0u8; 3])]), "reaches past"));
    out
}

/// Small valid archives written by torch.save itself: a state dict of every supported dtype with
/// views (transposed, sliced, expanded), a 0-d tensor and a Parameter; an OpenCLIP-style training
/// checkpoint (weights under "state_dict", optimizer state beside them).
fn torch_seeds(dir: &Path) -> (Vec<u8>, Vec<u8>) {
    let script = r#"
import collections, sys, torch
a = torch.arange(24, dtype=torch.float32).reshape(6, 4)
sd = collections.OrderedDict(a=a, b=a.t(), c=a[2:], d=torch.arange(5), e=torch.ones(3, dtype=torch.float16),
    f=torch.zeros(2).expand(3, 2), g=torch.tensor(2.5, dtype=torch.float64), h=torch.tensor([True, False]),
    i=torch.arange(4, dtype=torch.bfloat16), j=torch.nn.Parameter(torch.ones(2)))
torch.save(sd, sys.argv[1] + "/small.bin")
ck = {"epoch": 3, "name": "run", "state_dict": {"module.w": a.clone(), "module.b": torch.zeros(4)},
      "optimizer": {"state": {0: {"step": torch.tensor(10.0), "exp_avg": torch.zeros(6, 4)}},
                    "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.98), "params": [0, 1]}]}}
torch.save(ck, sys.argv[1] + "/train.bin")
"#;
    run_python(&["-c", script, dir.to_str().unwrap()]);
    (std::fs::read(dir.join("small.bin")).unwrap(), std::fs::read(dir.join("train.bin")).unwrap())
}

/// What the reader may allocate for an archive of `len` bytes, by its own constants
/// (torch_pickle.rs): data.pkl at most the archive when stored, 4 times it plus 64 KiB when
/// deflated; values at most 128 bytes a pickle byte plus 1 MiB, times 3 for growing vectors and
/// the memo's map; the pickle, the storages and 8 MiB for the zip reader and the rest.
fn allocation_bound(len: usize, stored: bool) -> usize {
    let pkl = if stored { len } else { 4 * len + (64 << 10) };
    3 * (128 * pkl + (1 << 20)) + pkl + 2 * len + (8 << 20)
}

#[test]
fn pickle_reader_survives_mutated_archives_and_bombs_within_the_budget() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let (small, train) = torch_seeds(dir.path());

    // The seeds read correctly (a reader that refuses everything passes no fuzz test).
    let path = dir.path().join("case.bin");
    std::fs::write(&path, &small).unwrap();
    let got: std::collections::HashMap<String, Tensor> = read_state_dict(&path).unwrap().into_iter().collect();
    let a = Tensor::arange(24, (Kind::Float, Device::Cpu)).reshape([6, 4]);
    let cpu = |k: Kind| (k, Device::Cpu);
    let expect = [
        ("a", a.shallow_clone()),
        ("b", a.transpose(0, 1)),
        ("c", a.narrow(0, 2, 4)),
        ("d", Tensor::arange(5, cpu(Kind::Int64))),
        ("e", Tensor::ones([3], cpu(Kind::Half))),
        ("f", Tensor::zeros([3, 2], cpu(Kind::Float))),
        ("g", Tensor::from(2.5f64)),
        ("h", Tensor::from_slice(&[true, false])),
        ("i", Tensor::arange(4, cpu(Kind::BFloat16))),
        ("j", Tensor::ones([2], cpu(Kind::Float))),
    ];
    assert_eq!(got.len(), expect.len(), "{:?}", got.keys().collect::<Vec<_>>());
    for (name, want) in &expect {
        let t = &got[*name];
        assert!(t.kind() == want.kind() && t.size() == want.size() && t.equal(want), "{name}: {t:?} != {want:?}");
    }
    std::fs::write(&path, &train).unwrap();
    let got = read_state_dict(&path).unwrap();
    let mut names: Vec<&str> = got.iter().map(|(n, _)| n.as_str()).collect();
    names.sort();
    assert_eq!(names, ["module.b", "module.w"]);

    // Cases: pickle-level mutations re-zipped with a valid CRC (they reach the pickle machine),
    // archive-level mutations (the zip reader), deflated seeds and their mutations, the bombs
    // and mutations of their pickles.
    let mut rng = rng(27);
    let mut cases: Vec<Case> = Vec::new();
    for (seed_name, seed) in [("small", &small), ("train", &train)] {
        let entries = entries_of(seed);
        let pkl = entries.iter().find(|(n, _)| n.ends_with("data.pkl")).unwrap().1.clone();
        for i in 0..400 {
            let archive = with_pickle(&entries, mutate(&mut rng, &pkl));
            cases.push(Case {
                what: format!("{seed_name}, pickle mutation {i}"),
                archive,
                kind: Expect::Mutation,
                stored: true,
            });
        }
        for i in 0..100 {
            let archive = mutate(&mut rng, seed);
            cases.push(Case {
                what: format!("{seed_name}, archive mutation {i}"),
                archive,
                kind: Expect::Mutation,
                stored: true,
            });
        }
        let deflated = zip_of(&entries, true);
        for i in 0..50 {
            let archive = mutate(&mut rng, &deflated);
            cases.push(Case {
                what: format!("{seed_name} deflated, mutation {i}"),
                archive,
                kind: Expect::Mutation,
                stored: false,
            });
        }
        cases.push(Case {
            what: format!("{seed_name} deflated"),
            archive: deflated,
            kind: Expect::Valid,
            stored: false,
        });
    }
    for (what, bomb, word) in bombs() {
        if let Some((_, pkl)) = entries_of(&bomb).into_iter().find(|(n, _)| n.ends_with("data.pkl")) {
            let entries = entries_of(&bomb);
            for i in 0..10 {
                let archive = with_pickle(&entries, mutate(&mut rng, &pkl));
                cases.push(Case {
                    what: format!("{what}, mutation {i}"),
                    archive,
                    kind: Expect::Mutation,
                    stored: true,
                });
            }
        }
        let stored = !what.starts_with("deflated");
        cases.push(Case { what: what.to_string(), archive: bomb, kind: Expect::Bomb(word), stored });
    }

    let archives: Vec<Vec<u8>> = cases.iter().map(|c| c.archive.clone()).collect();
    let t = Instant::now();
    let (mut read_ok, mut next, mut worst) = (0, 0, (0f64, String::new()));
    let mut refusals = Vec::new();
    run_cases("torch.save reader", &archives, Duration::from_secs(10), |c| {
        let case = &cases[next];
        let what = &case.what;
        next += 1;
        std::fs::write(&path, c).unwrap();
        let base = LIVE.load(Ordering::SeqCst);
        PEAK.store(base, Ordering::SeqCst);
        let r = read_state_dict(&path);
        let peak = PEAK.load(Ordering::SeqCst) - base;
        let bound = allocation_bound(c.len(), case.stored);
        assert!(peak <= bound, "{what}: peak allocation {peak} bytes for a {}-byte archive (bound {bound})", c.len());
        if peak as f64 / bound as f64 > worst.0 {
            worst = (peak as f64 / bound as f64, format!("{what}: {peak} bytes for {} bytes", c.len()));
        }
        match (r, case.kind) {
            (Ok(tensors), _) => {
                read_ok += 1;
                assert!(!matches!(case.kind, Expect::Bomb(_)), "{what}: read");
                // What libtorch holds: views at most 4 times their storages (stored: at most
                // the archive) plus 1 MiB.
                let bytes: usize = tensors.iter().map(|(_, t)| t.numel() * t.kind().elt_size_in_bytes()).sum();
                assert!(!case.stored || bytes <= 4 * c.len() + (1 << 20), "{what}: {bytes} bytes of tensors");
            }
            (Err(e), Expect::Bomb(word)) => {
                let line = clipmask::cli::format_error(&e);
                assert!(line.contains(word) && line.contains("case.bin"), "{what}: {line}");
                assert!(line.len() < 400, "{what}: a short line: {line}");
                refusals.push(format!("{what}: {line}"));
            }
            (Err(e), Expect::Valid) => panic!("{what}: {e:#}"),
            (Err(_), _) => {}
        }
    });
    eprintln!("{}", refusals.join("\n"));
    eprintln!(
        "{} archives, {read_ok} read, worst peak {:.1}% of its bound ({}), {:.1} s",
        cases.len(),
        worst.0 * 100.0,
        worst.1,
        t.elapsed().as_secs_f64()
    );
    assert!(read_ok > 20, "some mutations keep the archive valid ({read_ok})");
    assert_eq!(refusals.len(), bombs().len());
}

#[derive(Clone, Copy)]
enum Expect {
    /// Must read.
    Valid,
    /// May read or fail.
    Mutation,
    /// Must fail, with this word in the message.
    Bomb(&'static str),
}

struct Case {
    what: String,
    archive: Vec<u8>,
    kind: Expect,
    /// Its data.pkl and storages stored, not deflated: none larger than the archive.
    stored: bool,
}

/// `cmd` with its address space capped at `bytes` (RLIMIT_AS), one OpenMP thread and two malloc
/// arenas: libtorch maps about 2.8 GiB of libraries and thread stacks and arenas grow with the
/// cores, so the limit is taken relative to a run that fits the same settings.
fn capped(cmd: &mut Command, bytes: u64) -> &mut Command {
    use std::os::unix::process::CommandExt;
    cmd.env("OMP_NUM_THREADS", "1").env("MALLOC_ARENA_MAX", "2");
    // SAFETY: the closure runs between fork and exec and only calls setrlimit, which is
    // async-signal-safe, and allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            let lim = libc::rlimit { rlim_cur: bytes as libc::rlim_t, rlim_max: bytes as libc::rlim_t };
            if libc::setrlimit(libc::RLIMIT_AS, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    }
}

#[test]
fn memory_bomb_model_is_a_one_line_error_under_an_address_space_cap() {
    // A normal run peaks at about 2.8 GiB of address space (mostly libtorch's and CUDA's
    // libraries); the bomb, unbounded, grew past any cap (SIGABRT at 3.7 GB resident).
    const CAP: u64 = 4 << 30;
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let img = save_png(d, "img", 64, 48, 1);
    let bomb = d.join("bomb.bin");
    std::fs::write(&bomb, archive(&list_bomb(140), &[])).unwrap();

    // The same fixture as a torch.save state dict classifies under the cap.
    let good = d.join("model.bin");
    let fx = fixture("tiny", 0, false).join("model.safetensors");
    run_python(&[
        "-c",
        "import sys, torch; from safetensors.torch import load_file; torch.save(load_file(sys.argv[1]), sys.argv[2])",
        fx.to_str().unwrap(),
        good.to_str().unwrap(),
    ]);
    let classify = |model: &Path| {
        let mut c = clipmask(d);
        c.args(["classify", "--device", "cpu", "--config", "voc12", "--model"]).arg(model).arg(&img);
        c
    };
    let r = run(capped(&mut classify(&good), CAP));
    assert_eq!(r.code, Some(0), "a normal run fits in {CAP} bytes of address space\n{}", r.show());

    let t = Instant::now();
    let r = run(capped(&mut classify(&bomb), CAP));
    let line = assert_one_line_error(&r, 2);
    assert!(line.contains("bomb.bin") && line.contains("work budget"), "{line}");
    eprintln!("classify: {line} ({:.1} s)", t.elapsed().as_secs_f64());

    let imgs = d.join("imgs");
    save_png(&imgs, "a", 64, 48, 2);
    std::fs::write(d.join("labels.json"), r#"{"a": ["dog"]}"#).unwrap();
    let out = d.join("out");
    let mut c = clipmask(d);
    c.args(["generate", "--device", "cpu", "--model"])
        .arg(&bomb)
        .arg("--images")
        .arg(&imgs)
        .arg("--labels")
        .arg(d.join("labels.json"))
        .arg("--out")
        .arg(&out);
    let r = run(capped(&mut c, CAP));
    let line = assert_one_line_error(&r, 2);
    assert!(line.contains("bomb.bin") && line.contains("work budget"), "{line}");
    assert!(files_under(&out).is_empty(), "files written: {:?}", files_under(&out));
}
