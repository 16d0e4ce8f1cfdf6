//! The permutohedral lattice (pydensecrf permutohedral.cpp): built once per feature set, with
//! everything the filter needs as flat index arrays (per pixel its d+1 vertex rows and
//! barycentric weights, per vertex its blur neighbours along each direction).
//!
//! It owns the invariant that the unchecked loops of `kernels` rely on: every vertex row index
//! the lattice stores is a valid row. `Lattice::assemble`, which every constructor goes
//! through, checks it once; the fields are private to this file and never change afterwards,
//! so every `Lattice` satisfies it. Safe code only: `kernels` holds the `unsafe` blocks that
//! rest on it.

use super::kernels::{self, detect_isa, Isa};
use super::keytable::{KeyTable, LatticeKey, WideKey, MAX_D, NARROW_D};
use super::simplex::Elevator;

/// A permutohedral lattice built once for a feature set, with everything the filter needs as
/// flat index arrays.
///
/// # Invariant
/// `offset` and `bary` hold n * (d+1) entries, `blur` holds (d+1) * m entries followed by
/// `BLUR_AHEAD` zero ones, and every row in `offset` and `blur` is <= m (checked by
/// `Lattice::assemble`; the fields are private and never modified after it). The filter loops
/// of `kernels` index vertex rows without bounds checks, relying on this.
pub(super) struct Lattice {
    d: usize,
    n: usize,
    /// Number of lattice vertices.
    m: usize,
    /// Per pixel, d+1 vertex rows (vertex id + 1; row 0 is the always-zero "missing" vertex).
    offset: Vec<u32>,
    /// Per pixel, d+1 barycentric weights.
    bary: Vec<f32>,
    /// Blur neighbours, direction-major: [(d+1) * m] of (n1 row, n2 row), 0 = missing, then
    /// BLUR_AHEAD zero entries so that the blur's look-ahead never leaves the array.
    blur: Vec<[u32; 2]>,
    alpha: f32,
}

/// How many items ahead the build and filter loops prefetch.
const AHEAD: usize = 8;
/// The blur's look-ahead, in entries of `blur` (which ends with as many zero entries).
pub(super) const BLUR_AHEAD: usize = 16;

impl Lattice {
    /// `features`: n x d, pixel-major.
    pub(super) fn new(features: &[f32], d: usize, n: usize) -> Lattice {
        assert_eq!(features.len(), n * d);
        let isa = detect_isa();
        if d == 2 {
            if let Some(lattice) = Lattice::new_dense2(isa, features, n) {
                return lattice;
            }
        }
        if d <= NARROW_D {
            Lattice::new_hashed::<u128>(isa, features, d, n)
        } else {
            Lattice::new_hashed::<WideKey>(isa, features, d, n)
        }
    }

    /// The general lattice: vertices found through the hash table, with keys of type K (wide
    /// enough for d coordinates).
    fn new_hashed<K: LatticeKey>(isa: Isa, features: &[f32], d: usize, n: usize) -> Lattice {
        let el = Elevator::new(d);
        let dp1 = d + 1;
        let mut bary = vec![0f32; n * dp1];
        let mut dirs = vec![0u8; n * dp1];
        let mut offset = vec![0u32; n * dp1];
        // Vertex ids are given in order of first use; they never influence a number, only
        // memory order. Pixels are elevated a block at a time so that the table slots their
        // keys hash to (random reads) can be prefetched before they are inserted.
        let mut table = KeyTable::<K>::new(n + n / 2);
        const BLOCK: usize = 64;
        let mut kbuf = vec![K::default(); BLOCK * dp1];
        let mut hbuf = [0usize; BLOCK * (MAX_D + 1)];
        for start in (0..n).step_by(BLOCK) {
            let end = (start + BLOCK).min(n);
            let len = (end - start) * dp1;
            let r = start * dp1..end * dp1;
            el.simplices(isa, &features[start * d..end * d], &mut kbuf[..len], &mut bary[r.clone()], &mut dirs[r]);
            for (h, &k) in hbuf[..len].iter_mut().zip(&kbuf[..len]) {
                *h = k.hash();
            }
            for &h in &hbuf[..len.min(2 * AHEAD)] {
                table.prefetch(h);
            }
            for t in 0..len {
                if let Some(&h) = hbuf[..len].get(t + 2 * AHEAD) {
                    table.prefetch(h);
                }
                offset[start * dp1 + t] = table.insert_hashed(kbuf[t], hbuf[t]) + 1;
            }
        }
        for k in el.padding_keys::<K>(n) {
            table.insert(k);
        }
        let m = table.keys.len();
        table.seal();
        let blur = blur_neighbours(&table, d, &offset, &dirs);
        drop(dirs);
        Lattice::assemble(d, n, m, offset, bary, blur)
    }

    /// The lattice of a 2-d feature set (the Gaussian kernel's pixel grid) whose keys span a
    /// small box: a dense array over the box replaces the hash table. Pixels in raster order
    /// walk through it smoothly, so both vertex insertion and the neighbour lookups are cache
    /// hits. None when the box is too large for that to pay.
    fn new_dense2(isa: Isa, features: &[f32], n: usize) -> Option<Lattice> {
        const D: usize = 2;
        const DP1: usize = 3;
        let el = Elevator::new(D);
        let mut keys = vec![0u32; n * DP1];
        let mut bary = vec![0f32; n * DP1];
        const BLOCK: usize = 64;
        let (mut kk, mut dirs) = ([0u128; BLOCK * DP1], [0u8; BLOCK * DP1]);
        for ((f, ks), bs) in
            features.chunks(BLOCK * D).zip(keys.chunks_mut(BLOCK * DP1)).zip(bary.chunks_mut(BLOCK * DP1))
        {
            el.simplices(isa, f, &mut kk[..ks.len()], bs, &mut dirs[..ks.len()]);
            for (k, &p) in ks.iter_mut().zip(&kk) {
                *k = p as u32;
            }
        }
        let unpack = |k: u32| [k as u16 as i16 as i32, (k >> 16) as u16 as i16 as i32];
        let (mut lo, mut hi) = ([i32::MAX; D], [i32::MIN; D]);
        let mut bound = |k: u32| {
            let c = unpack(k);
            for t in 0..D {
                lo[t] = lo[t].min(c[t]);
                hi[t] = hi[t].max(c[t]);
            }
        };
        for &k in &keys {
            bound(k);
        }
        let pad: Vec<u32> = el.padding_keys::<u128>(n).into_iter().map(|k| k as u32).collect();
        for &k in &pad {
            bound(k);
        }
        let r = [(hi[0] - lo[0] + 1) as usize, (hi[1] - lo[1] + 1) as usize];
        if r[0].checked_mul(r[1])? > (16 * n).max(1 << 16) {
            return None;
        }
        let pos = |c: [i32; D]| (c[0] - lo[0]) as usize * r[1] + (c[1] - lo[1]) as usize;
        let mut index = vec![0u32; r[0] * r[1]];
        let mut vertices: Vec<u32> = Vec::with_capacity(n + n / 4);
        let mut insert = |k: u32| {
            let p = pos(unpack(k));
            if index[p] == 0 {
                vertices.push(k);
                index[p] = vertices.len() as u32;
            }
            index[p]
        };
        let offset: Vec<u32> = keys.iter().map(|&k| insert(k)).collect();
        for k in pad {
            insert(k);
        }
        drop(keys);
        let m = vertices.len();
        // Neighbours along direction j: n1 = key - 1 except n1[j] = key[j] + d, n2 = key + 1
        // except n2[j] = key[j] - d (see `blur_neighbours`); outside the box means absent.
        let find = |c: [i32; D]| {
            if (0..D).all(|t| c[t] >= lo[t] && c[t] <= hi[t]) {
                index[pos(c)]
            } else {
                0
            }
        };
        let mut blur = vec![[0u32; 2]; DP1 * m];
        for j in 0..DP1 {
            for (v, &k) in vertices.iter().enumerate() {
                let c = unpack(k);
                let (mut n1, mut n2) = ([c[0] - 1, c[1] - 1], [c[0] + 1, c[1] + 1]);
                if j < D {
                    n1[j] = c[j] + D as i32;
                    n2[j] = c[j] - D as i32;
                }
                blur[j * m + v] = [find(n1), find(n2)];
            }
        }
        Some(Lattice::assemble(D, n, m, offset, bary, blur))
    }

    fn assemble(d: usize, n: usize, m: usize, offset: Vec<u32>, bary: Vec<f32>, mut blur: Vec<[u32; 2]>) -> Lattice {
        // The filter loops index vertex rows without bounds checks, relying on this.
        assert!(offset.len() == n * (d + 1) && bary.len() == n * (d + 1));
        assert!(blur.len() == (d + 1) * m);
        assert!(offset.iter().all(|&o| o as usize <= m));
        assert!(blur.iter().all(|&[a, b]| a as usize <= m && b as usize <= m));
        blur.resize((d + 1) * m + BLUR_AHEAD, [0, 0]);
        let alpha = 1.0f32 / (1.0 + 2f32.powi(-(d as i32)));
        Lattice { d, n, m, offset, bary, blur, alpha }
    }

    // Read access for `kernels` and `mean_field`; nothing outside this file can change a field,
    // which is what keeps the invariant established by `assemble`.

    /// Feature dimension d: each pixel has d+1 vertices, and the blur runs along d+1 directions.
    #[inline(always)]
    pub(super) fn d(&self) -> usize {
        self.d
    }
    /// Number of pixels n.
    #[inline(always)]
    pub(super) fn n(&self) -> usize {
        self.n
    }
    /// Number of lattice vertices m: vertex rows are 1..=m, row 0 is the "missing" vertex.
    #[inline(always)]
    pub(super) fn m(&self) -> usize {
        self.m
    }
    /// The slice scale 1/(1+2^-d).
    #[inline(always)]
    pub(super) fn alpha(&self) -> f32 {
        self.alpha
    }
    /// Per pixel, d+1 vertex rows: n * (d+1) entries, each <= m.
    #[inline(always)]
    pub(super) fn offset(&self) -> &[u32] {
        &self.offset
    }
    /// Per pixel, d+1 barycentric weights: n * (d+1) entries.
    #[inline(always)]
    pub(super) fn bary(&self) -> &[f32] {
        &self.bary
    }
    /// Blur neighbours (n1 row, n2 row), direction-major: (d+1) * m entries, each row <= m,
    /// then `BLUR_AHEAD` zero entries.
    #[inline(always)]
    pub(super) fn blur(&self) -> &[[u32; 2]] {
        &self.blur
    }

    /// K·input with one value per pixel (pydensecrf `Permutohedral::compute` with value_size 1,
    /// its `seqCompute`): splat, blur along the d+1 directions, slice. `reverse` blurs the
    /// directions in reverse order, the transpose of the forward filter (pydensecrf's
    /// `applyTranspose`; inference never uses it).
    pub(super) fn filter_scalar(&self, input: &[f32], reverse: bool) -> Vec<f32> {
        let dp1 = self.d + 1;
        let mut src = vec![0f32; self.m + 1];
        let mut dst = vec![0f32; self.m + 1];
        for (i, &x) in input.iter().enumerate() {
            for r in 0..dp1 {
                src[self.offset[i * dp1 + r] as usize] += self.bary[i * dp1 + r] * x;
            }
        }
        for step in 0..=self.d {
            let j = if reverse { self.d - step } else { step };
            kernels::base::blur::<1>(1, self, j, &src, &mut dst);
            std::mem::swap(&mut src, &mut dst);
        }
        (0..self.n)
            .map(|i| {
                let mut acc = 0f32;
                for r in 0..dp1 {
                    acc += self.bary[i * dp1 + r] * src[self.offset[i * dp1 + r] as usize] * self.alpha;
                }
                acc
            })
            .collect()
    }
}

/// Blur neighbours along each of the d+1 lattice directions (pydensecrf: n1 = key - 1 except
/// n1[j] = key[j] + d, n2 = key + 1 except n2[j] = key[j] - d).
///
/// The edges of every pixel's simplex are such neighbour pairs, which gives almost all of them
/// without a lookup. The relation is symmetric (u = n2(v) exactly when v = n1(u)), so of the
/// rest only the n2 side is looked up, each hit filling both sides; the candidates are almost
/// all absent and are answered by the cache-resident presence filter, and the few that pass
/// it are probed with their slots prefetched.
fn blur_neighbours<K: LatticeKey>(table: &KeyTable<K>, d: usize, offset: &[u32], dirs: &[u8]) -> Vec<[u32; 2]> {
    const UNKNOWN: u32 = u32::MAX;
    let dp1 = d + 1;
    let m = table.keys.len();
    let mut blur = vec![[UNKNOWN; 2]; dp1 * m];
    for (i, (offs, dir)) in offset.chunks_exact(dp1).zip(dirs.chunks_exact(dp1)).enumerate() {
        // Neighbouring pixels often share their simplex: its edges are already in.
        if i > 0 && offs == &offset[(i - 1) * dp1..i * dp1] {
            continue;
        }
        for r in 0..dp1 {
            let a = offs[r];
            let b = offs[if r == d { 0 } else { r + 1 }];
            let j = dir[r] as usize;
            blur[j * m + a as usize - 1][1] = b;
            blur[j * m + b as usize - 1][0] = a;
        }
    }
    // Candidates go through a pipeline, each stage prefetching for the ones behind it: the
    // presence filter's word, then (for those it lets through) the table slot.
    let dd = d as i16;
    let mut key = [0i16; MAX_D + 1];
    let mut cands: Vec<(u32, K, usize)> = Vec::new();
    let mut queries: Vec<(u32, K, usize)> = Vec::new();
    const BATCH: usize = 4096;
    for j in 0..dp1 {
        for start in (0..m).step_by(BATCH) {
            cands.clear();
            for v in start..(start + BATCH).min(m) {
                if blur[j * m + v][1] != UNKNOWN {
                    continue;
                }
                table.keys[v].unpack(d, &mut key);
                for t in 0..d {
                    key[t] = key[t].wrapping_add(1);
                }
                if j < d {
                    key[j] = key[j].wrapping_sub(dd + 1);
                }
                let q = K::pack(&key[..d]);
                cands.push((v as u32, q, q.hash()));
            }
            queries.clear();
            for (t, &(v, q, h)) in cands.iter().enumerate() {
                if let Some(&(_, _, ph)) = cands.get(t + 4 * AHEAD) {
                    table.prefetch_filter(ph);
                }
                if table.maybe_present(h) {
                    queries.push((v, q, h & table.mask));
                    table.prefetch(h);
                } else {
                    blur[j * m + v as usize][1] = 0;
                }
            }
            for &(v, q, h) in &queries {
                let v = v as usize;
                match table.find_from(q, h) {
                    Some(u) => {
                        blur[j * m + v][1] = u + 1;
                        blur[j * m + u as usize][0] = v as u32 + 1;
                    }
                    None => blur[j * m + v][1] = 0,
                }
            }
        }
    }
    // Every present n1 neighbour is now known (from an edge or its n2 lookup).
    for e in &mut blur {
        if e[0] == UNKNOWN {
            e[0] = 0;
        }
    }
    blur
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crf::tests::TestRng;
    use crate::crf::{bilateral_features, gaussian_features};

    fn filter1(lat: &Lattice, input: &[f32], reverse: bool) -> Vec<f32> {
        lat.filter_scalar(input, reverse)
    }

    #[test]
    fn isolated_point_normalisation() {
        // One pixel at the origin: all its weight is on the remainder-0 vertex, the lattice is
        // the cycle of its simplex, and the blur returns 1 + 2^-(d+1) to it; times alpha.
        for d in [1usize, 2, 3, 5] {
            let lat = Lattice::new(&vec![0.0; d], d, 1);
            assert_eq!(lat.m, d + 1);
            let k1 = filter1(&lat, &[1.0], false)[0];
            let want = (1.0 + 0.5f32.powi(d as i32 + 1)) / (1.0 + 0.5f32.powi(d as i32));
            assert!((k1 - want).abs() < 1e-6, "d={d}: {k1} vs {want}");
        }
    }

    #[test]
    fn dense_and_hashed_lattices_agree() {
        // The Gaussian kernel's dense 2-d index must build the same lattice as the hash table.
        for (w, h, sxy) in [(23usize, 17usize, 1.0f32), (40, 9, 3.0), (7, 30, 0.7)] {
            let n = w * h;
            let f = gaussian_features(w, h, sxy);
            let dense = Lattice::new_dense2(detect_isa(), &f, n).expect("small box");
            let hashed = Lattice::new_hashed::<u128>(detect_isa(), &f, 2, n);
            assert_eq!(dense.m, hashed.m);
            let mut rng = TestRng::new(5);
            let x: Vec<f32> = (0..n).map(|_| rng.next()).collect();
            for reverse in [false, true] {
                assert_eq!(dense.filter_scalar(&x, reverse), hashed.filter_scalar(&x, reverse));
            }
        }
    }

    #[test]
    fn constant_signal_and_symmetry() {
        let (w, h) = (23usize, 17usize);
        let n = w * h;
        let mut rng = TestRng::new(7);
        let img: Vec<u8> = (0..n * 3).map(|_| (rng.next() * 255.0) as u8).collect();
        for (d, f) in [(2, gaussian_features(w, h, 3.0)), (5, bilateral_features(&img, w, h, 5.0, 20.0))] {
            let lat = Lattice::new(&f, d, n);
            let ones = vec![1f32; n];
            let k1 = filter1(&lat, &ones, false);
            // Linear: K(c 1) = c K(1); every pixel receives at least its own contribution.
            let k3 = filter1(&lat, &vec![3f32; n], false);
            for (a, b) in k1.iter().zip(&k3) {
                assert!(*a > 0.0 && (3.0 * a - b).abs() <= 1e-5 * b.abs(), "{a} {b}");
            }
            // Splatting conserves mass: barycentric weights sum to 1.
            for i in 0..n {
                let s: f32 = lat.bary[i * (d + 1)..(i + 1) * (d + 1)].iter().sum();
                assert!((s - 1.0).abs() < 1e-5);
            }
            let a: Vec<f32> = (0..n).map(|_| rng.next()).collect();
            let b: Vec<f32> = (0..n).map(|_| rng.next()).collect();
            let dot = |x: &[f32], y: &[f32]| x.iter().zip(y).map(|(p, q)| (*p as f64) * (*q as f64)).sum::<f64>();
            let kb = filter1(&lat, &b, false);
            let ka = filter1(&lat, &a, false);
            let kta = filter1(&lat, &a, true);
            // Exact transpose: <a, K b> == <K^T a, b>, K^T = the reverse blur order.
            let (x, y) = (dot(&a, &kb), dot(&kta, &b));
            assert!((x - y).abs() <= 1e-5 * x.abs(), "transpose d={d}: {x} vs {y}");
            // The forward filter is symmetric up to the (small) non-commutativity of the blur
            // directions on a sparse lattice.
            let z = dot(&ka, &b);
            assert!((x - z).abs() <= 1e-2 * x.abs(), "symmetry d={d}: {x} vs {z}");
        }
    }
}
