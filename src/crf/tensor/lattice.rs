//! The permutohedral lattice from tensor operations (docs/method.md §6, "The CRF as tensors"):
//! the same lattice as `crf::lattice` (same vertices, same blur neighbours, same weights), built
//! and applied on any tch device.
//!
//! - elevation and the enclosing simplex: elementwise f32 maths over all pixels, the operations
//!   of `simplex::Elevator` in the same order (`simplex8_impl`'s form: selects and a scatter by
//!   rank instead of indexing), so that keys and barycentric weights are the CPU lattice's;
//! - vertices: the d stored key coordinates packed into one i64 (mixed radix over the keys' box,
//!   with a margin of d + 1 on each side so that every blur neighbour packs too), sorted and
//!   de-duplicated by `unique` with its inverse (a pixel's vertex rows);
//! - blur neighbours: a neighbour's packed key is the vertex's plus a constant per direction
//!   (the margin keeps every digit in range), looked up by `searchsorted`; absent ones are row 0;
//! - splat, blur and slice: `scatter_add`, `index_select`, elementwise maths, with all labels of a
//!   pixel in one row, so that every step is one tensor operation for all labels.
//!
//! Vertex ids are ranks of packed keys rather than first-use order: that changes no number, only
//! memory order. Building needs the vertex count on the host (one sync per lattice, before
//! inference); filtering needs none.

use anyhow::{bail, ensure, Result};
use tch::{Device, Kind, Tensor};

/// Which of pydensecrf's slicing orders (see `kernels::SliceOrder`): `Seq` multiplies
/// (w * v) * alpha (value size 1 or 2), `Sse` multiplies (w * alpha) * v.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Order {
    Seq,
    Sse,
}

/// A lattice over n pixels with d-dimensional features, on one device.
pub(super) struct TensorLattice {
    d: usize,
    n: i64,
    /// Number of vertices; vertex rows are 1..=m, row 0 is the always-zero "missing" vertex.
    m: i64,
    /// Pixel-major vertex rows, n * (d+1) (pixel i's d+1 rows, in remainder order).
    offset: Tensor,
    /// Barycentric weights in the same layout, f32.
    bary: Tensor,
    /// Per remainder r: the pixels' vertex rows (n) and weights (n x 1) for the slice.
    rows: Vec<(Tensor, Tensor)>,
    /// Per direction j: the n1 and n2 neighbour rows of vertices 1..=m (0 = absent).
    blur: Vec<(Tensor, Tensor)>,
    alpha: f32,
}

/// The f32 constants of `simplex::Elevator::new`: per-axis scale factors.
fn scales(d: usize) -> Vec<f32> {
    let inv_std_dev = ((2.0f64 / 3.0).sqrt() * (d as f64 + 1.0)) as f32;
    (0..d).map(|i| (1.0 / (((i + 2) * (i + 1)) as f64).sqrt() * inv_std_dev as f64) as f32).collect()
}

/// Keys (n x (d+1) x d, i64) and barycentric weights (n x (d+1), f32) of the simplices enclosing
/// `features` (n x d, f32): `Elevator::simplex` lane-wise, operation for operation. Every scalar
/// below is an f32 value (exact in f64), and tch computes f32 tensors with f32 scalars.
fn simplices(features: &Tensor, d: usize) -> (Tensor, Tensor) {
    let dp1 = d as f64 + 1.0;
    let inv_dp1 = (1.0f32 / (d as f32 + 1.0)) as f64;
    let scale = scales(d);
    let n = features.size()[0];
    let opts = (Kind::Float, features.device());
    // Elevate (y = E p, p.5 in Adams et al. 2010).
    let mut elevated: Vec<Tensor> = (0..=d).map(|_| Tensor::zeros([n], opts)).collect();
    let mut sm = Tensor::zeros([n], opts);
    for j in (1..=d).rev() {
        let cf = features.select(1, j as i64 - 1) * scale[j - 1] as f64;
        elevated[j] = &sm - &cf * j as f64;
        sm += cf;
    }
    elevated[0] = sm;
    // Closest remainder-0 point; torch's round is round-half-even, as _mm_cvtps_epi32.
    let mut rem0 = Vec::with_capacity(d + 1);
    let mut sum = Tensor::zeros([n], opts);
    for e in &elevated {
        let v = (e * inv_dp1).round();
        rem0.push(&v * dp1);
        sum += v;
    }
    let diff: Vec<Tensor> = elevated.iter().zip(&rem0).map(|(e, r)| e - r).collect();
    // Rank of each coordinate: for i < j, `di < dj` ranks i up, else j.
    let mut rank: Vec<Tensor> = (0..=d).map(|_| Tensor::zeros([n], opts)).collect();
    for i in 0..d {
        for j in i + 1..=d {
            let lt = diff[i].lt_tensor(&diff[j]).to_kind(Kind::Float);
            rank[i] += &lt;
            rank[j] += 1.0 - lt;
        }
    }
    // Back onto the plane if sum != 0.
    for i in 0..=d {
        let r = &rank[i] + &sum;
        let add = r.lt(0.0).to_kind(Kind::Float) * dp1;
        let sub = r.ge(dp1).to_kind(Kind::Float) * dp1;
        let delta = add - sub;
        rank[i] = r + &delta;
        rem0[i] = &rem0[i] + delta;
    }
    // Barycentric coordinates (p.10 in Adams et al. 2010), as `simplex8_impl`: v by rank, then
    // b[0] = v[rank d] + (1 - v[rank 0]), b[p] = v[rank d-p] - v[rank d-p+1].
    let v: Vec<Tensor> = elevated.iter().zip(&rem0).map(|(e, r)| (e - r) * inv_dp1).collect();
    let rank_t = Tensor::stack(&rank, 1);
    let by_rank =
        Tensor::zeros([n, d as i64 + 1], opts).scatter(1, &rank_t.to_kind(Kind::Int64), &Tensor::stack(&v, 1));
    let col = |k: usize| by_rank.select(1, k as i64);
    let mut b = vec![col(d) + (1.0 - col(0))];
    for p in 1..=d {
        b.push(col(d - p) - col(d - p + 1));
    }
    let bary = Tensor::stack(&b, 1);
    // Vertex r: rem0 + canonical[r][rank], canonical[r][k] = r for k <= d - r, else r - (d+1).
    let mut keys = Vec::with_capacity(d + 1);
    for r in 0..=d {
        let coords: Vec<Tensor> = (0..d)
            .map(|i| {
                let wrap = rank[i].gt((d - r) as f64).to_kind(Kind::Float) * dp1;
                (&rem0[i] + r as f64 - wrap).to_kind(Kind::Int64)
            })
            .collect();
        keys.push(Tensor::stack(&coords, 1));
    }
    (Tensor::stack(&keys, 1), bary)
}

impl TensorLattice {
    /// `features`: n x d f32 on the lattice's device.
    pub(super) fn new(features: &Tensor, d: usize) -> Result<TensorLattice> {
        let dev = features.device();
        let n = features.size()[0];
        let dp1 = d as i64 + 1;
        let (keys, bary) = simplices(features, d);
        let mut all = keys.reshape([n * dp1, d as i64]);
        // pydensecrf elevates 4 pixels at a time and pads the last block with the all-zero
        // feature; those lanes' vertices are in its lattice (they are blur neighbours).
        if n % 4 != 0 {
            let (pad, _) = simplices(&Tensor::zeros([1, d as i64], (Kind::Float, dev)), d);
            all = Tensor::cat(&[all, pad.reshape([dp1, d as i64])], 0);
        }
        // Mixed radix over the keys' box widened by d + 1 each side: a blur neighbour differs
        // by at most d + 1 per coordinate, so its packed key is the vertex's plus a constant.
        let lo = Vec::<i64>::try_from(all.amin([0], false).to_device(Device::Cpu))?;
        let hi = Vec::<i64>::try_from(all.amax([0], false).to_device(Device::Cpu))?;
        let mut stride = vec![0i64; d];
        let mut total: i128 = 1;
        for i in (0..d).rev() {
            stride[i] = total as i64;
            total *= (hi[i] - lo[i] + 1 + 2 * dp1) as i128;
            if total >= i64::MAX as i128 {
                bail!(
                    "tensor CRF: lattice keys span too large a box to pack into 64 bits (very large \
                     image or tiny CRF standard deviations); use --crf-device cpu"
                );
            }
        }
        let mut packed = Tensor::zeros([all.size()[0]], (Kind::Int64, dev));
        for i in 0..d {
            packed += (all.select(1, i as i64) - (lo[i] - dp1)) * stride[i];
        }
        let (vertices, inverse, _) = packed.internal_unique2(true, true, false);
        let m = vertices.size()[0];
        ensure!(m > 0, "tensor CRF: empty lattice");
        let offset = inverse.narrow(0, 0, n * dp1) + 1;
        let bary = bary.reshape([n * dp1]);
        let alpha = 1.0f32 / (1.0 + 2f32.powi(-(d as i32)));
        let offset2 = offset.view([n, dp1]);
        let bary2 = bary.view([n, dp1]);
        let rows = (0..dp1).map(|r| (offset2.select(1, r).contiguous(), bary2.select(1, r).unsqueeze(1))).collect();
        // Neighbours along direction j: n1 = key - 1 except n1[j] = key[j] + d, n2 = key + 1
        // except n2[j] = key[j] - d (pydensecrf; for j = d every stored coordinate moves by 1).
        let find = |delta: i64| -> Tensor {
            let q = &vertices + delta;
            let pos = q.searchsorted(&vertices, false, false, "left", None::<Tensor>).clamp_max(m - 1);
            let hit = vertices.index_select(0, &pos).eq_tensor(&q);
            (pos + 1).where_scalarother(&hit, 0)
        };
        let mut blur = Vec::with_capacity(d + 1);
        for j in 0..=d {
            let mut delta = -stride.iter().sum::<i64>();
            if j < d {
                delta += (d as i64 + 1) * stride[j];
            }
            blur.push((find(delta), find(-delta)));
        }
        Ok(TensorLattice { d, n, m, offset, bary, rows, blur, alpha })
    }

    /// Number of vertices.
    #[cfg(test)]
    pub(super) fn m(&self) -> i64 {
        self.m
    }

    /// Splat: n x L values onto (m+1) x L vertex rows (row 0 stays zero), contributions in
    /// pixel-major order, `weight * value` as pydensecrf.
    pub(super) fn splat(&self, values: &Tensor) -> Tensor {
        let l = values.size()[1];
        let dp1 = self.d as i64 + 1;
        let contrib = (values.unsqueeze(1) * self.bary.view([self.n, dp1, 1])).reshape([self.n * dp1, l]);
        // scatter_add, the elementwise form of index_add: libtorch's CPU index_add of rows runs
        // one add per index (seconds per image); scatter_add is one pass, in index order on the
        // CPU (pydensecrf's order), atomic on CUDA.
        let index = self.offset.unsqueeze(1).expand([self.n * dp1, l], false);
        Tensor::zeros([self.m + 1, l], (Kind::Float, values.device())).scatter_add(0, &index, &contrib)
    }

    /// Blur along the d+1 directions in order: v + 0.5 (n1 + n2) per direction.
    pub(super) fn blur(&self, vertex_values: Tensor) -> Tensor {
        let mut src = vertex_values;
        let l = src.size()[1];
        let zero = Tensor::zeros([1, l], (Kind::Float, src.device()));
        for (n1, n2) in &self.blur {
            let body = src.narrow(0, 1, self.m) + (src.index_select(0, n1) + src.index_select(0, n2)) * 0.5;
            src = Tensor::cat(&[&zero, &body], 0);
        }
        src
    }

    /// Slice: per pixel Σ_r (weight_r, alpha, blurred[row_r]) in remainder order, with
    /// pydensecrf's order of multiplications for the value size.
    pub(super) fn slice(&self, blurred: &Tensor, order: Order) -> Tensor {
        let alpha = self.alpha as f64;
        let mut acc: Option<Tensor> = None;
        for (rows, w) in &self.rows {
            let v = blurred.index_select(0, rows);
            let term = match order {
                Order::Sse => (w * alpha) * v,
                Order::Seq => (w * v) * alpha,
            };
            acc = Some(match acc {
                None => term,
                Some(a) => a + term,
            });
        }
        acc.expect("d + 1 >= 1 remainders")
    }

    /// K · values (n x L): splat, blur, slice.
    pub(super) fn filter(&self, values: &Tensor, order: Order) -> Tensor {
        self.slice(&self.blur(self.splat(values)), order)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crf::lattice::Lattice;
    use crate::crf::tests::TestRng;
    use crate::crf::{bilateral_features, gaussian_features};

    /// The same lattice as the CPU one: as many vertices, and K·x within float rounding (the
    /// CPU lattice filters with the same operations; only summation order may differ).
    #[test]
    fn matches_the_cpu_lattice() {
        let mut rng = TestRng::new(5);
        for (w, h) in [(23usize, 17usize), (40, 31), (8, 8)] {
            let n = w * h;
            let img: Vec<u8> = (0..n * 3).map(|_| (rng.next() * 255.0) as u8).collect();
            let x: Vec<f32> = (0..n).map(|_| rng.next()).collect();
            for (d, f) in [
                (2, gaussian_features(w, h, 1.0)),
                (2, gaussian_features(w, h, 3.0)),
                (5, bilateral_features(&img, w, h, 5.0, 20.0)),
                (5, bilateral_features(&img, w, h, 67.0, 3.0)),
            ] {
                let cpu = Lattice::new(&f, d, n);
                let ft = Tensor::from_slice(&f).view([n as i64, d as i64]);
                let lat = TensorLattice::new(&ft, d).unwrap();
                assert_eq!(lat.m() as usize, cpu.m(), "vertices, {w}x{h} d={d}");
                for order in [Order::Seq, Order::Sse] {
                    let want = cpu.filter_scalar(&x, false);
                    let got = lat.filter(&Tensor::from_slice(&x).view([n as i64, 1]), order);
                    let got = Vec::<f32>::try_from(got.view([-1])).unwrap();
                    for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                        assert!((a - b).abs() <= 1e-5 * b.abs().max(1.0), "{w}x{h} d={d} pixel {i}: {a} vs {b}");
                    }
                }
            }
        }
    }

    /// Keys and weights are the CPU elevator's, bit for bit (same f32 operations).
    #[test]
    fn simplices_match_the_cpu_elevator() {
        use crate::crf::keytable::MAX_D;
        use crate::crf::simplex::Elevator;
        let mut rng = TestRng::new(9);
        for d in [2usize, 5] {
            let n = 333;
            let f: Vec<f32> = (0..n * d)
                .map(|i| match i % 3 {
                    0 => (rng.next() - 0.5) * 400.0,
                    1 => (i / 7) as f32 / 3.0,
                    _ => (i % 11) as f32,
                })
                .collect();
            let (keys, bary) = simplices(&Tensor::from_slice(&f).view([n as i64, d as i64]), d);
            let keys = Vec::<i64>::try_from(keys.reshape([-1])).unwrap();
            let bary = Vec::<f32>::try_from(bary.reshape([-1])).unwrap();
            let el = Elevator::new(d);
            let dp1 = d + 1;
            for i in 0..n {
                let (mut k, mut b, mut r) = ([0u128; MAX_D + 1], [0f32; MAX_D + 1], [0u8; MAX_D + 1]);
                el.simplex(&f[i * d..(i + 1) * d], &mut k[..dp1], &mut b[..dp1], &mut r[..dp1]);
                for v in 0..dp1 {
                    for c in 0..d {
                        let want = (k[v] >> (16 * c)) as u16 as i16 as i64;
                        assert_eq!(keys[(i * dp1 + v) * d + c], want, "d={d} pixel {i} vertex {v} coord {c}");
                    }
                    assert_eq!(bary[i * dp1 + v], b[v], "d={d} pixel {i} weight {v}");
                }
            }
        }
    }
}
