//! Elevation of a feature vector onto the permutohedral lattice and the simplex enclosing it
//! (pydensecrf permutohedral.cpp, `Permutohedral::init`, SSE variant; Adams, Baek & Davis
//! 2010): the keys of its d+1 vertices, the barycentric weights, and the lattice direction of
//! each simplex edge (which gives most blur neighbours without a lookup).
//!
//! It owns the arithmetic of the reference's lattice construction, in a scalar version and a
//! vectorised one (8 pixels at a time) that is bit-identical to it; `kernels` compiles the
//! vectorised one per instruction set. Safe code only.

use super::kernels::{self, Isa};
use super::keytable::{LatticeKey, MAX_D, NARROW_D};

/// Elevation and simplex of one feature vector, as one lane of pydensecrf's SSE `init`.
pub(super) struct Elevator {
    d: usize,
    scale: [f32; MAX_D],
    canonical: [[i16; MAX_D + 1]; MAX_D + 1],
}

impl Elevator {
    pub(super) fn new(d: usize) -> Self {
        assert!((1..=MAX_D).contains(&d));
        let mut canonical = [[0i16; MAX_D + 1]; MAX_D + 1];
        for i in 0..=d {
            for j in 0..=d - i {
                canonical[i][j] = i as i16;
            }
            for j in d - i + 1..=d {
                canonical[i][j] = i as i16 - (d as i16 + 1);
            }
        }
        // float inv_std_dev = sqrt(2.0 / 3.0)*(d_+1);  (p.6 in Adams et al. 2010)
        let inv_std_dev = ((2.0f64 / 3.0).sqrt() * (d as f64 + 1.0)) as f32;
        let mut scale = [0f32; MAX_D];
        for (i, s) in scale.iter_mut().enumerate().take(d) {
            // 1.0 / sqrt( (i+2)*(i+1) ) * inv_std_dev, in double, stored as float
            *s = (1.0 / (((i + 2) * (i + 1)) as f64).sqrt() * inv_std_dev as f64) as f32;
        }
        Elevator { d, scale, canonical }
    }

    /// For r in 0..=d: the key of the simplex's remainder-r vertex, its barycentric weight, and
    /// the lattice direction of the simplex edge from vertex r to vertex (r+1) mod (d+1)
    /// (vertex r+1 is the `n2` neighbour of vertex r along that direction).
    #[inline]
    pub(super) fn simplex<K: LatticeKey>(&self, f: &[f32], keys: &mut [K], bary: &mut [f32], dirs: &mut [u8]) {
        let d = self.d;
        let inv_dp1 = 1.0f32 / (d as f32 + 1.0);
        let dp1 = d as f32 + 1.0;
        let mut elevated = [0f32; MAX_D + 1];
        let mut rem0 = [0f32; MAX_D + 1];
        let mut rank = [0f32; MAX_D + 1];
        // Elevate (y = E p, p.5 in Adams et al. 2010).
        let mut sm = 0f32;
        for j in (1..=d).rev() {
            let cf = f[j - 1] * self.scale[j - 1];
            elevated[j] = sm - j as f32 * cf;
            sm += cf;
        }
        elevated[0] = sm;
        // Closest remainder-0 point: _mm_cvtps_epi32 under round-to-nearest(-even).
        let mut sum = 0f32;
        for i in 0..=d {
            let v = round_half_even(inv_dp1 * elevated[i]);
            rem0[i] = v * dp1;
            sum += v;
        }
        // Rank of each coordinate in the sorted order of the differences.
        for i in 0..d {
            let di = elevated[i] - rem0[i];
            for j in i + 1..=d {
                let dj = elevated[j] - rem0[j];
                if di < dj {
                    rank[i] += 1.0;
                } else {
                    rank[j] += 1.0;
                }
            }
        }
        // Bring the point back onto the plane if sum != 0.
        for i in 0..=d {
            rank[i] += sum;
            let add = if rank[i] < 0.0 { dp1 } else { 0.0 };
            let sub = if rank[i] >= dp1 { dp1 } else { 0.0 };
            rank[i] += add - sub;
            rem0[i] += add - sub;
        }
        // Barycentric coordinates (p.10 in Adams et al. 2010).
        let mut b = [0f32; MAX_D + 2];
        let mut by_rank = [0u8; MAX_D + 1];
        for i in 0..=d {
            let v = (elevated[i] - rem0[i]) * inv_dp1;
            let p = d - rank[i] as usize;
            b[p] += v;
            b[p + 1] -= v;
            by_rank[rank[i] as usize] = i as u8;
        }
        b[0] += 1.0 + b[d + 1];
        let mut key = [0i16; MAX_D];
        for r in 0..=d {
            for i in 0..d {
                key[i] = (rem0[i] + self.canonical[r][rank[i] as usize] as f32) as i16;
            }
            keys[r] = K::pack(&key[..d]);
            bary[r] = b[r];
            // canonical[r+1] - canonical[r] = 1 - (d+1) e_i for the coordinate i of rank d - r
            // (rank 0 for r = d, the wrap-around to the next remainder-0 point).
            dirs[r] = by_rank[d - r];
        }
    }
}

/// Round to nearest, ties to even (what `_mm_cvtps_epi32` does under the default rounding mode):
/// adding and subtracting 1.5 * 2^23 leaves exactly the rounded value for |x| < 2^22, and
/// larger floats are integers already. `f32::round_ties_even` is a libm call on baseline x86-64.
#[inline(always)]
fn round_half_even(x: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0;
    if x.abs() < 4_194_304.0 {
        (x + MAGIC) - MAGIC
    } else {
        x
    }
}

/// Pixels per block of the vectorised simplex.
const SIMPLEX_LANES: usize = 8;

impl Elevator {
    /// `simplex` for every pixel of `features` (pixel-major, d per pixel), writing d+1 keys,
    /// weights and directions per pixel. Blocks of 8 pixels take the vectorised path for the
    /// dimensions the kernels use (2 and 5); results are identical to `simplex`.
    pub(super) fn simplices<K: LatticeKey>(
        &self,
        isa: Isa,
        features: &[f32],
        keys: &mut [K],
        bary: &mut [f32],
        dirs: &mut [u8],
    ) {
        let (d, dp1) = (self.d, self.d + 1);
        let n = features.len() / d;
        let mut blocks = 0;
        if let Some(keys) = K::as_u128(keys).filter(|_| d == 2 || d == 5) {
            blocks = n / SIMPLEX_LANES;
            self.simplex8_blocks(isa, blocks, features, keys, bary, dirs);
        }
        for i in blocks * SIMPLEX_LANES..n {
            let r = i * dp1..(i + 1) * dp1;
            self.simplex(&features[i * d..(i + 1) * d], &mut keys[r.clone()], &mut bary[r.clone()], &mut dirs[r]);
        }
    }

    /// The first `blocks` blocks of 8 pixels of `simplices`, vectorised (d = 2 or 5).
    fn simplex8_blocks(
        &self,
        isa: Isa,
        blocks: usize,
        features: &[f32],
        keys: &mut [u128],
        bary: &mut [f32],
        dirs: &mut [u8],
    ) {
        let (d, dp1) = (self.d, self.d + 1);
        for b in 0..blocks {
            let (p, v) = (b * SIMPLEX_LANES * d, b * SIMPLEX_LANES * dp1);
            let f = &features[p..p + SIMPLEX_LANES * d];
            let (k, w, r) = (
                &mut keys[v..v + SIMPLEX_LANES * dp1],
                &mut bary[v..v + SIMPLEX_LANES * dp1],
                &mut dirs[v..v + SIMPLEX_LANES * dp1],
            );
            kernels::simplex8(isa, d, self, f, k, w, r);
        }
    }

    /// `simplex` on 8 pixels at once, each step lane-wise with the same operations in the same
    /// order, so every lane's result is bit-identical to `simplex`. The data-dependent indexing
    /// of the scalar version (by rank) becomes selects, which is what lets it vectorise.
    #[inline(always)]
    pub(super) fn simplex8_impl<const D: usize>(
        &self,
        f: &[f32],
        keys: &mut [u128],
        bary: &mut [f32],
        dirs: &mut [u8],
    ) {
        const { assert!(D <= NARROW_D) };
        const L: usize = SIMPLEX_LANES;
        type V = [f32; L];
        let inv_dp1 = 1.0f32 / (D as f32 + 1.0);
        let dp1 = D as f32 + 1.0;
        let mut ft = [[0f32; L]; NARROW_D];
        for l in 0..L {
            for c in 0..D {
                ft[c][l] = f[l * D + c];
            }
        }
        let mut elevated = [[0f32; L]; NARROW_D + 1];
        let mut sm: V = [0.0; L];
        for j in (1..=D).rev() {
            for l in 0..L {
                let cf = ft[j - 1][l] * self.scale[j - 1];
                elevated[j][l] = sm[l] - j as f32 * cf;
                sm[l] += cf;
            }
        }
        elevated[0] = sm;
        let mut rem0 = [[0f32; L]; NARROW_D + 1];
        let mut sum: V = [0.0; L];
        for i in 0..=D {
            for l in 0..L {
                let v = round_half_even(inv_dp1 * elevated[i][l]);
                rem0[i][l] = v * dp1;
                sum[l] += v;
            }
        }
        let mut diff = [[0f32; L]; NARROW_D + 1];
        for i in 0..=D {
            for l in 0..L {
                diff[i][l] = elevated[i][l] - rem0[i][l];
            }
        }
        let mut rank = [[0f32; L]; NARROW_D + 1];
        for i in 0..D {
            for j in i + 1..=D {
                for l in 0..L {
                    let lt = diff[i][l] < diff[j][l];
                    rank[i][l] += if lt { 1.0 } else { 0.0 };
                    rank[j][l] += if lt { 0.0 } else { 1.0 };
                }
            }
        }
        for i in 0..=D {
            for l in 0..L {
                let r = rank[i][l] + sum[l];
                let add = if r < 0.0 { dp1 } else { 0.0 };
                let sub = if r >= dp1 { dp1 } else { 0.0 };
                rank[i][l] = r + (add - sub);
                rem0[i][l] += add - sub;
            }
        }
        // by_rank[r] = the coordinate of rank r, and its (elevated - rem0) / (d+1).
        let mut by_rank = [[0f32; L]; NARROW_D + 1];
        let mut v_by_rank = [[0f32; L]; NARROW_D + 1];
        for i in 0..=D {
            for l in 0..L {
                let v = (elevated[i][l] - rem0[i][l]) * inv_dp1;
                for r in 0..=D {
                    let hit = rank[i][l] == r as f32;
                    by_rank[r][l] = if hit { i as f32 } else { by_rank[r][l] };
                    v_by_rank[r][l] = if hit { v } else { v_by_rank[r][l] };
                }
            }
        }
        // b[p] receives +v of rank d-p and -v of rank d-p+1; either order rounds the same.
        let mut b = [[0f32; L]; NARROW_D + 1];
        for l in 0..L {
            b[0][l] = (0.0 + v_by_rank[D][l]) + (1.0 + (0.0 - v_by_rank[0][l]));
        }
        for p in 1..=D {
            for l in 0..L {
                b[p][l] = (0.0 + v_by_rank[D - p][l]) - v_by_rank[D - p + 1][l];
            }
        }
        // Vertex r: rem0 + canonical[r][rank], canonical[r][k] = r for k <= d - r, else r - (d+1).
        let mut key = [[[0f32; L]; NARROW_D]; NARROW_D + 1];
        for r in 0..=D {
            for i in 0..D {
                for l in 0..L {
                    let c = if rank[i][l] <= (D - r) as f32 { r as f32 } else { r as f32 - dp1 };
                    key[r][i][l] = rem0[i][l] + c;
                }
            }
        }
        for l in 0..L {
            for r in 0..=D {
                let mut k = 0u128;
                for i in 0..D {
                    k |= ((key[r][i][l] as i16 as u16) as u128) << (16 * i);
                }
                keys[l * (D + 1) + r] = k;
                bary[l * (D + 1) + r] = b[r][l];
                dirs[l * (D + 1) + r] = by_rank[D - r][l] as u8;
            }
        }
    }

    /// pydensecrf's SSE init elevates 4 pixels at a time and pads the last block with the
    /// all-zero feature; those lanes' vertices are inserted in the lattice too (they are blur
    /// neighbours, so they change the result). Their keys, none when n is a multiple of 4.
    pub(super) fn padding_keys<K: LatticeKey>(&self, n: usize) -> Vec<K> {
        if n.is_multiple_of(4) {
            return Vec::new();
        }
        let dp1 = self.d + 1;
        let mut kk = [K::default(); MAX_D + 1];
        let mut bb = [0f32; MAX_D + 1];
        let mut dd = [0u8; MAX_D + 1];
        self.simplex(&[0f32; MAX_D][..self.d], &mut kk[..dp1], &mut bb[..dp1], &mut dd[..dp1]);
        kk[..dp1].to_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crf::kernels::detect_isa;
    use crate::crf::tests::TestRng;

    #[test]
    fn vectorised_simplex_matches_scalar() {
        // Random features, plus grid-like ones (integers over a scale) that produce ties and
        // exact remainder-0 points; every instruction-set variant must match `simplex` bit
        // for bit.
        let mut rng = TestRng::new(7);
        for d in [2usize, 5] {
            let el = Elevator::new(d);
            let dp1 = d + 1;
            let n = 8 * 40 + 5;
            let f: Vec<f32> = (0..n * d)
                .map(|i| match i % 3 {
                    0 => (rng.next() - 0.5) * 400.0,
                    1 => (i / 7) as f32 / 3.0,
                    _ => (i % 11) as f32,
                })
                .collect();
            for isa in [Isa::Base, detect_isa()] {
                let (mut k, mut b, mut r) = (vec![0u128; n * dp1], vec![0f32; n * dp1], vec![0u8; n * dp1]);
                el.simplices(isa, &f, &mut k, &mut b, &mut r);
                for i in 0..n {
                    let (mut k1, mut b1, mut r1) = ([0u128; MAX_D + 1], [0f32; MAX_D + 1], [0u8; MAX_D + 1]);
                    el.simplex(&f[i * d..(i + 1) * d], &mut k1[..dp1], &mut b1[..dp1], &mut r1[..dp1]);
                    let s = i * dp1..(i + 1) * dp1;
                    assert_eq!(&k[s.clone()], &k1[..dp1], "keys, d={d} pixel {i}");
                    assert_eq!(&r[s.clone()], &r1[..dp1], "directions, d={d} pixel {i}");
                    let (bv, bs): (Vec<u32>, Vec<u32>) =
                        (b[s].iter().map(|x| x.to_bits()).collect(), b1[..dp1].iter().map(|x| x.to_bits()).collect());
                    assert_eq!(bv, bs, "weights, d={d} pixel {i}");
                }
            }
        }
    }
}
