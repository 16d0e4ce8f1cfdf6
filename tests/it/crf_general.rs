//! The general dense CRF (`clipmask::crf::DenseCrf`, the engine of `clipmask.densecrf`) against
//! pydensecrf called from Python with the same inputs (tests/python/densecrf_general_reference.py):
//! Q within 1e-5 (max abs) on DenseCRF2D Gaussian + bilateral terms with Potts, diagonal and
//! (non-symmetric) matrix compatibilities, every normalisation and kernel type,
//! addPairwiseEnergy with features of 1 to 16 dimensions, a real photo with CLIP-ES's
//! parameters and `unary_from_softmax`, startInference / stepInference (Q, tmp1, tmp2) and
//! klDivergence; and the one-line errors for bad input.
use crate::support::{python, python_cmd, rng, root, synthetic_image, Rng, StdRng};
use clipmask::crf::{Cancelled, Compat, DenseCrf, KernelType, Normalization};
use ndarray::{Array1, Array2, Array3};
use ndarray_npy::{read_npy, write_npy};
use std::path::Path;

const TOL: f32 = 1e-5;

#[derive(Clone)]
enum Kind {
    Gaussian {
        sxy: [f32; 2],
    },
    Bilateral {
        sxy: [f32; 2],
        srgb: [f32; 3],
        rgb: Vec<u8>,
    },
    /// (D, N) features
    Energy {
        dim: usize,
        features: Vec<f32>,
    },
}

#[derive(Clone)]
struct Term {
    kind: Kind,
    compat: Compat,
    kernel: KernelType,
    norm: Normalization,
}

#[derive(Clone)]
enum Unary {
    Energy(Vec<f32>),
    /// Probabilities (M, N): the unary is pydensecrf's `unary_from_softmax` of them.
    Softmax(Vec<f32>),
}

#[derive(Clone)]
struct Case {
    name: String,
    n: usize,
    m: usize,
    grid: Option<(usize, usize)>,
    unary: Unary,
    terms: Vec<Term>,
    iterations: usize,
    steps: usize,
    kl: bool,
}

fn kernel_code(k: KernelType) -> i64 {
    match k {
        KernelType::Const => 0,
        KernelType::Diag => 1,
        KernelType::Full => 2,
    }
}

fn norm_code(z: Normalization) -> i64 {
    match z {
        Normalization::None => 0,
        Normalization::Before => 1,
        Normalization::After => 2,
        Normalization::Symmetric => 3,
    }
}

/// Random unary energies -log softmax(logits), logits uniform in [-10, 10] (scale ~10).
fn random_unary(r: &mut StdRng, n: usize, m: usize) -> Vec<f32> {
    softmax_probs(r, n, m).iter().map(|&p| -(p as f64).ln() as f32).collect()
}

/// Random softmax probabilities (M, N) of logits uniform in [-10, 10].
fn softmax_probs(r: &mut StdRng, n: usize, m: usize) -> Vec<f32> {
    let logits: Vec<f64> = (0..n * m).map(|_| r.random_range(-10.0..10.0)).collect();
    let mut p = vec![0f32; n * m];
    for i in 0..n {
        let mx = (0..m).map(|l| logits[l * n + i]).fold(f64::MIN, f64::max);
        let s: f64 = (0..m).map(|l| (logits[l * n + i] - mx).exp()).sum();
        for l in 0..m {
            p[l * n + i] = ((logits[l * n + i] - mx).exp() / s) as f32;
        }
    }
    p
}

fn noise_image(r: &mut StdRng, w: usize, h: usize) -> Vec<u8> {
    (0..w * h * 3).map(|_| r.random::<u8>()).collect()
}

fn build(case: &Case, unary: &[f32]) -> DenseCrf {
    let mut crf = DenseCrf::new(case.n, case.m).unwrap();
    crf.set_unary_energy(unary).unwrap();
    for t in &case.terms {
        let c = t.compat.clone();
        match &t.kind {
            Kind::Gaussian { sxy } => {
                let (w, h) = case.grid.unwrap();
                crf.add_pairwise_gaussian_2d(w, h, sxy[0], sxy[1], c, t.kernel, t.norm).unwrap();
            }
            Kind::Bilateral { sxy, srgb, rgb } => {
                let (w, h) = case.grid.unwrap();
                let [sr, sg, sb] = *srgb;
                crf.add_pairwise_bilateral_2d(w, h, sxy[0], sxy[1], sr, sg, sb, rgb, c, t.kernel, t.norm).unwrap();
            }
            Kind::Energy { dim, features } => crf.add_pairwise_energy(features, *dim, c, t.kernel, t.norm).unwrap(),
        }
    }
    crf
}

fn write_case(dir: &Path, case: &Case) {
    std::fs::create_dir_all(dir).unwrap();
    let (n, m) = (case.n, case.m);
    let (unary, softmax) = match &case.unary {
        Unary::Energy(u) => {
            write_npy(dir.join("unary.npy"), &Array2::from_shape_vec((m, n), u.clone()).unwrap()).unwrap();
            (Some("unary.npy"), None)
        }
        Unary::Softmax(p) => {
            write_npy(dir.join("probs.npy"), &Array2::from_shape_vec((m, n), p.clone()).unwrap()).unwrap();
            (None, Some("probs.npy"))
        }
    };
    let mut terms = vec![];
    for (k, t) in case.terms.iter().enumerate() {
        let compat = match &t.compat {
            Compat::Potts(w) => serde_json::json!({ "potts": w }),
            Compat::Diagonal(w) => {
                write_npy(dir.join(format!("c{k}.npy")), &Array1::from_vec(w.clone())).unwrap();
                serde_json::json!({ "diag": format!("c{k}.npy") })
            }
            Compat::Matrix { labels, w } => {
                write_npy(
                    dir.join(format!("c{k}.npy")),
                    &Array2::from_shape_vec((*labels, *labels), w.clone()).unwrap(),
                )
                .unwrap();
                serde_json::json!({ "matrix": format!("c{k}.npy") })
            }
        };
        let mut j = serde_json::json!({ "compat": compat, "kernel": kernel_code(t.kernel), "norm": norm_code(t.norm) });
        match &t.kind {
            Kind::Gaussian { sxy } => {
                j["kind"] = "gaussian".into();
                j["sxy"] = serde_json::json!(sxy);
            }
            Kind::Bilateral { sxy, srgb, rgb } => {
                let (w, h) = case.grid.unwrap();
                write_npy(dir.join(format!("img{k}.npy")), &Array3::from_shape_vec((h, w, 3), rgb.clone()).unwrap())
                    .unwrap();
                j["kind"] = "bilateral".into();
                j["sxy"] = serde_json::json!(sxy);
                j["srgb"] = serde_json::json!(srgb);
                j["image"] = format!("img{k}.npy").into();
            }
            Kind::Energy { dim, features } => {
                write_npy(dir.join(format!("f{k}.npy")), &Array2::from_shape_vec((*dim, n), features.clone()).unwrap())
                    .unwrap();
                j["kind"] = "energy".into();
                j["features"] = format!("f{k}.npy").into();
            }
        }
        terms.push(j);
    }
    let spec = serde_json::json!({
        "n": n, "m": m,
        "width": case.grid.map(|g| g.0), "height": case.grid.map(|g| g.1),
        "unary": unary, "softmax": softmax, "terms": terms,
        "iterations": case.iterations, "steps": case.steps, "kl": case.kl,
    });
    std::fs::write(dir.join("spec.json"), spec.to_string()).unwrap();
}

fn read(dir: &Path, name: &str) -> Vec<f32> {
    let a: Array2<f32> = read_npy(dir.join(name)).unwrap_or_else(|e| panic!("{}: {e}", dir.join(name).display()));
    // Logical (row-major) order: pydensecrf's arrays are column-major (Fortran-order .npy).
    a.iter().copied().collect()
}

fn max_abs(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max)
}

/// max |a - b| / max(1, |b|): for energies, whose scale is that of the unary.
fn max_rel(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs() / y.abs().max(1.0)).fold(0f32, f32::max)
}

fn voc_photo() -> Option<(String, Vec<u8>, usize, usize)> {
    let dir = root().join("../shared/data/voc-sample/JPEGImages");
    let mut names: Vec<_> = std::fs::read_dir(&dir).ok()?.filter_map(|e| e.ok()).map(|e| e.path()).collect();
    names.retain(|p| p.extension().is_some_and(|e| e == "jpg"));
    names.sort();
    let p = names.first()?;
    let img = image::open(p).unwrap().to_rgb8();
    let (w, h) = (img.width() as usize, img.height() as usize);
    Some((p.file_stem().unwrap().to_string_lossy().into_owned(), img.into_raw(), w, h))
}

fn term(kind: Kind, compat: Compat) -> Term {
    Term { kind, compat, kernel: KernelType::Diag, norm: Normalization::Symmetric }
}

fn random_matrix(r: &mut StdRng, m: usize) -> Compat {
    Compat::Matrix { labels: m, w: (0..m * m).map(|_| r.random_range(-2.0..4.0)).collect() }
}

fn grid_case(r: &mut StdRng, name: String, w: usize, h: usize, m: usize, terms: Vec<Term>) -> Case {
    Case {
        name,
        n: w * h,
        m,
        grid: Some((w, h)),
        unary: Unary::Energy(random_unary(r, w * h, m)),
        terms,
        iterations: 5,
        steps: 0,
        kl: false,
    }
}

/// Gaussian + bilateral with each normalisation and each kernel type, in groups of three
/// kernel types sharing one unary.
fn norm_kernel_cases(r: &mut StdRng) -> Vec<Case> {
    let (w, h, m) = (20, 15, 4);
    let rgb = synthetic_image(w as u32, h as u32, 7).into_raw();
    let mut out = vec![];
    for norm in [Normalization::None, Normalization::Before, Normalization::After, Normalization::Symmetric] {
        let unary = Unary::Energy(random_unary(r, w * h, m));
        for kernel in [KernelType::Const, KernelType::Diag, KernelType::Full] {
            let terms = vec![
                Term { kind: Kind::Gaussian { sxy: [3.0, 3.0] }, compat: Compat::Potts(3.0), kernel, norm },
                Term {
                    kind: Kind::Bilateral { sxy: [30.0, 30.0], srgb: [13.0; 3], rgb: rgb.clone() },
                    compat: Compat::Potts(10.0),
                    kernel,
                    norm,
                },
            ];
            let mut c = grid_case(r, format!("{norm:?} {kernel:?}"), w, h, m, terms);
            c.unary = unary.clone();
            out.push(c);
        }
    }
    out
}

fn cases() -> Vec<Case> {
    let mut r = rng(0x09e7_eca1);
    let mut out = vec![];
    // (a) DenseCRF2D Gaussian + bilateral, Potts, a few sizes and label counts.
    for (k, (w, h, m)) in
        [(23usize, 17usize, 3usize), (40, 30, 5), (31, 19, 2), (16, 12, 21), (29, 21, 1)].into_iter().enumerate()
    {
        let rgb = if k % 2 == 0 {
            synthetic_image(w as u32, h as u32, k as u64).into_raw()
        } else {
            noise_image(&mut r, w, h)
        };
        let terms = vec![
            term(Kind::Gaussian { sxy: [3.0, 1.5] }, Compat::Potts(3.0)),
            term(Kind::Bilateral { sxy: [20.0, 15.0], srgb: [10.0, 13.0, 7.5], rgb }, Compat::Potts(5.0)),
        ];
        out.push(grid_case(&mut r, format!("2d potts {w}x{h}"), w, h, m, terms));
    }
    // (b) matrix (random, not symmetric) and diagonal compatibilities.
    for (w, h, m) in [(30usize, 20usize, 4usize), (25, 18, 2), (22, 14, 6)] {
        let rgb = noise_image(&mut r, w, h);
        let diag = Compat::Diagonal((0..m).map(|_| r.random_range(0.0..5.0)).collect());
        let terms = vec![
            term(Kind::Gaussian { sxy: [2.0, 2.0] }, random_matrix(&mut r, m)),
            term(Kind::Bilateral { sxy: [10.0, 10.0], srgb: [20.0; 3], rgb }, diag),
        ];
        let mut c = grid_case(&mut r, format!("2d matrix+diag {w}x{h}"), w, h, m, terms);
        c.kl = true;
        out.push(c);
    }
    // (c) every normalisation with every kernel type.
    out.extend(norm_kernel_cases(&mut r));
    // (d) addPairwiseEnergy with random features of several dimensions (16: the widest keys).
    for (dim, m) in [(1usize, 3usize), (3, 4), (7, 2), (12, 5), (16, 3)] {
        let n = 300;
        let features: Vec<f32> = (0..dim * n).map(|_| r.random_range(0.0..3.0)).collect();
        let compat = if dim == 3 { random_matrix(&mut r, m) } else { Compat::Potts(4.0) };
        out.push(Case {
            name: format!("energy D={dim}"),
            n,
            m,
            grid: None,
            unary: Unary::Energy(random_unary(&mut r, n, m)),
            terms: vec![term(Kind::Energy { dim, features }, compat)],
            iterations: 5,
            steps: 0,
            kl: dim == 7,
        });
    }
    // (f) startInference + 3 x stepInference.
    let (w, h, m) = (40, 30, 5);
    let rgb = synthetic_image(w as u32, h as u32, 3).into_raw();
    let terms = vec![
        term(Kind::Gaussian { sxy: [1.0, 1.0] }, Compat::Potts(3.0)),
        term(Kind::Bilateral { sxy: [20.0, 20.0], srgb: [5.0; 3], rgb }, random_matrix(&mut r, m)),
    ];
    let mut c = grid_case(&mut r, "steps".into(), w, h, m, terms);
    (c.iterations, c.steps, c.kl) = (3, 3, true);
    out.push(c);
    // (e) a real photo, unary_from_softmax, CLIP-ES's parameters.
    if let Some((id, rgb, w, h)) = voc_photo() {
        let m = 21;
        let terms = vec![
            term(Kind::Gaussian { sxy: [1.0, 1.0] }, Compat::Potts(3.0)),
            term(Kind::Bilateral { sxy: [67.0, 67.0], srgb: [3.0; 3], rgb }, Compat::Potts(4.0)),
        ];
        let mut c = grid_case(&mut r, format!("photo {id}"), w, h, m, terms);
        (c.unary, c.iterations) = (Unary::Softmax(softmax_probs(&mut r, w * h, m)), 10);
        out.push(c);
    } else {
        eprintln!("../shared/data/voc-sample not present: the real-photo case is skipped");
    }
    out
}

#[test]
fn general_crf_matches_pydensecrf() {
    let tmp = tempfile::tempdir().unwrap();
    let cases = cases();
    let dirs: Vec<_> = (0..cases.len()).map(|k| tmp.path().join(format!("case{k}"))).collect();
    for (case, dir) in cases.iter().zip(&dirs) {
        write_case(dir, case);
    }
    let script = root().join("tests/python/densecrf_general_reference.py");
    let out =
        python_cmd().arg(script).args(&dirs).output().unwrap_or_else(|e| panic!("cannot run {:?}: {e}", python()));
    assert!(out.status.success(), "reference failed:\n{}", String::from_utf8_lossy(&out.stderr));
    let mut failures = vec![];
    println!("| case | N | M | max abs dQ | other |");
    println!("|---|---|---|---|---|");
    for (case, dir) in cases.iter().zip(&dirs) {
        let unary = match &case.unary {
            Unary::Energy(u) => u.clone(),
            Unary::Softmax(_) => read(dir, "unary.npy"),
        };
        let crf = build(case, &unary);
        let q = crf.inference(case.iterations, None).unwrap();
        let want = read(dir, "q.npy");
        let dq = max_abs(&q, &want);
        let mut other = vec![];
        let mut ok = dq <= TOL;
        if case.steps > 0 {
            let mut st = crf.start_inference().unwrap();
            for _ in 0..case.steps {
                crf.step_inference(&mut st).unwrap();
            }
            // The same iterations, whether stepped or not: identical numbers.
            assert_eq!(st.q, crf.inference(case.steps, None).unwrap(), "{}: steps differ from inference", case.name);
            let (a, b, c) = (
                max_abs(&st.q, &read(dir, "q_step.npy")),
                max_rel(&st.tmp1, &read(dir, "tmp1.npy")),
                max_rel(&st.tmp2, &read(dir, "tmp2.npy")),
            );
            other.push(format!("step Q {a:.2e}, tmp1 {b:.2e} (rel), tmp2 {c:.2e} (rel)"));
            ok &= a <= TOL && b <= TOL && c <= TOL;
        }
        if case.kl {
            let v: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(dir.join("kl.json")).unwrap()).unwrap();
            let want_kl = v["kl"].as_f64().unwrap();
            let got = crf.kl_divergence(&want).unwrap();
            let rel = (got - want_kl).abs() / want_kl.abs().max(1.0);
            other.push(format!("KL {got:.6e} vs {want_kl:.6e} (rel {rel:.1e})"));
            ok &= rel <= 1e-5;
        }
        println!("| {} | {} | {} | {dq:.2e} | {} |", case.name, case.n, case.m, other.join("; "));
        if !ok {
            failures.push(format!("{}: max |dQ| {dq:e} {}", case.name, other.join("; ")));
        }
    }
    assert!(failures.is_empty(), "general CRF differs from pydensecrf:\n{}", failures.join("\n"));
}

#[test]
fn kernel_types_filter_alike() {
    // The kernel type only chooses learnable parameters (identity at inference): the same Q,
    // number for number, for CONST, DIAG and FULL.
    let cases = norm_kernel_cases(&mut rng(5));
    for group in cases.chunks(3) {
        let qs: Vec<Vec<f32>> = group
            .iter()
            .map(|c| {
                let Unary::Energy(u) = &c.unary else { panic!("energy unary expected") };
                build(c, u).inference(5, None).unwrap()
            })
            .collect();
        assert_eq!(qs[0], qs[1], "{}", group[1].name);
        assert_eq!(qs[0], qs[2], "{}", group[2].name);
    }
    // ... while each normalisation gives its own Q (from the same unary for all of them), so
    // the parity cases above tell them apart.
    let q_with = |c: &Case| {
        let Unary::Energy(u) = &cases[0].unary else { panic!("energy unary expected") };
        build(c, u).inference(5, None).unwrap()
    };
    let qs: Vec<Vec<f32>> = cases.iter().step_by(3).map(q_with).collect();
    for a in 0..qs.len() {
        for b in a + 1..qs.len() {
            let d = qs[a].iter().zip(&qs[b]).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
            assert!(d > 1e-2, "{} and {} give the same Q (max diff {d})", cases[3 * a].name, cases[3 * b].name);
        }
    }
}

fn err(r: anyhow::Result<impl Sized>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => {
            let s = e.to_string();
            assert!(!s.contains('\n'), "one line: {s}");
            s
        }
    }
}

#[test]
fn general_crf_errors() {
    let has = |s: String, want: &str| assert!(s.contains(want), "{s:?} should mention {want:?}");
    has(err(DenseCrf::new(0, 3)), "at least one pixel");
    has(err(DenseCrf::new(4, 0)), "at least one label");
    let mut crf = DenseCrf::new(4, 3).unwrap();
    has(err(crf.inference(1, None)), "no unary energy set");
    has(err(crf.start_inference()), "(M, N) = (3, 4)");
    has(err(crf.set_unary_energy(&[0.0; 11])), "expected shape (M, N) = (3, 4) = 12 values");
    let mut u = vec![1.0f32; 12];
    u[5] = f32::NAN;
    has(err(crf.set_unary_energy(&u)), "non-finite");
    crf.set_unary_energy(&[1.0; 12]).unwrap();
    let (p, k, z) = (Compat::Potts(1.0), KernelType::Diag, Normalization::Symmetric);
    has(err(crf.add_pairwise_energy(&[0.0; 7], 2, p.clone(), k, z)), "expected shape (D, N) = (2, 4) = 8 values");
    has(err(crf.add_pairwise_energy(&[], 0, p.clone(), k, z)), "expected 1 to 16");
    has(err(crf.add_pairwise_energy(&[0.0; 68], 17, p.clone(), k, z)), "expected 1 to 16");
    has(err(crf.add_pairwise_energy(&[f32::INFINITY; 4], 1, p.clone(), k, z)), "non-finite");
    let bad = Compat::Matrix { labels: 2, w: vec![0.0; 4] };
    has(err(crf.add_pairwise_energy(&[0.0; 4], 1, bad, k, z)), "expected labels x labels = 3 x 3");
    has(err(crf.add_pairwise_energy(&[0.0; 4], 1, Compat::Diagonal(vec![1.0; 2]), k, z)), "one per label (3)");
    has(err(crf.add_pairwise_energy(&[0.0; 4], 1, Compat::Potts(f32::NAN), k, z)), "non-finite");
    has(
        err(crf.add_pairwise_gaussian_2d(3, 2, 1.0, 1.0, p.clone(), k, z)),
        "3 x 2 image has 6 pixels, but the CRF has 4",
    );
    has(err(crf.add_pairwise_gaussian_2d(2, 2, 0.0, 1.0, p.clone(), k, z)), "sx must be finite and non-zero");
    has(
        err(crf.add_pairwise_bilateral_2d(2, 2, 1.0, 1.0, 1.0, 1.0, 1.0, &[0; 11], p.clone(), k, z)),
        "(H, W, 3) = (2, 2, 3) = 12 bytes",
    );
    let mut st = crf.start_inference().unwrap();
    st.q.pop();
    has(err(crf.step_inference(&mut st)), "Q has 11 values, expected shape (M, N) = (3, 4)");
    has(err(crf.kl_divergence(&[0.5; 3])), "expected shape (M, N) = (3, 4)");
    // Nothing failed half-way: the CRF still has no pairwise term and runs.
    assert_eq!(crf.inference(2, None).unwrap().len(), 12);
    let stop = std::sync::atomic::AtomicBool::new(true);
    let e = crf.inference(2, Some(&stop)).unwrap_err();
    assert!(e.downcast_ref::<Cancelled>().is_some(), "{e}");
}
