//! pydensecrf's `expAndNormalize` with Eigen 3.3's arithmetic: the SSE `pexp<Packet4f>`
//! polynomial, the vectorised sum reduction's order, and the softmax built from them.
//!
//! It owns the bit-exact reproduction of those packet operations, written lane-wise so that it
//! vectorises across pixels (docs/method.md §6: the marginals must match pydensecrf). Its two
//! `unsafe` conversions are local to `eigen_pexp` (their range follows from its clamp) and
//! unrelated to the lattice.

/// Eigen 3.3's SSE `pexp<Packet4f>` (Cephes polynomial, no FMA), as used by pydensecrf's
/// `expAndNormalize`. Lane-wise with the same operations as the packet code, so that it compiles
/// to the same vector instructions; N lanes are independent (N = 8 fills an AVX register).
#[inline(always)]
fn eigen_pexp<const N: usize>(x0: [f32; N]) -> [f32; N] {
    const EXP_HI: f32 = 88.376_26;
    const EXP_LO: f32 = -88.376_26;
    const LOG2EF: f32 = std::f32::consts::LOG2_E;
    const C1: f32 = 0.693_359_4;
    const C2: f32 = -2.121_944_4e-4;
    const P0: f32 = 1.987_569_1e-4;
    const P1: f32 = 1.398_199_9e-3;
    const P2: f32 = 8.333_452e-3;
    const P3: f32 = 4.166_579_6e-2;
    const P4: f32 = 1.666_666_5e-1;
    const P5: f32 = 0.5; // Cephes' 5.0000001201E-1f rounds to exactly 0.5 in f32
    let mut out = [0f32; N];
    for k in 0..N {
        // pmin / pmax are _mm_min_ps / _mm_max_ps: min(a, b) = a < b ? a : b (NaN -> b).
        let mut x = if x0[k] < EXP_HI { x0[k] } else { EXP_HI };
        x = if x > EXP_LO { x } else { EXP_LO };
        let mut fx = x * LOG2EF + 0.5;
        // floor via truncation: tmp = (float)(int)fx; if tmp > fx: tmp - 1.
        // SAFETY: |fx| <= 128 after the clamp above, so the truncation is in range of i32.
        let t = unsafe { fx.to_int_unchecked::<i32>() } as f32;
        fx = if t > fx { t - 1.0 } else { t };
        let tmp = fx * C1;
        let z = fx * C2;
        x -= tmp;
        x -= z;
        let z = x * x;
        let mut y = P0;
        y = y * x + P1;
        y = y * x + P2;
        y = y * x + P3;
        y = y * x + P4;
        y = y * x + P5;
        y = y * z + x;
        y += 1.0;
        // SAFETY: as above, fx is an integer in [-128, 128].
        let e = f32::from_bits(((unsafe { fx.to_int_unchecked::<i32>() } + 127) << 23) as u32);
        let r = y * e;
        out[k] = if r > x0[k] { r } else { x0[k] };
    }
    out
}

/// pydensecrf `expAndNormalize` (subtract the max, exp, sum with Eigen's vectorised reduction
/// order, divide) on P pixels at once: `rows` holds P rows of `w` values whose first `l` are the
/// labels, and every step is lane-wise across the pixels, so that it vectorises whatever l is.
///
/// Eigen evaluates whole packets of 4 labels with `pexp` and the last l mod 4 with libm's
/// `expf`; here every label uses `pexp`, which differs from `expf` by at most a few ulp
/// (2e-7 relative), far below what the marginals' tolerance could see, and keeps the loop
/// vectorised across pixels.
#[inline(always)]
fn softmax_block<const P: usize>(rows: &mut [f32], w: usize, l: usize) {
    // Lets the compiler drop the bounds checks of the gathers below.
    assert!(rows.len() == P * w && l >= 1 && l <= w);
    let get = |rows: &[f32], c: usize| -> [f32; P] { std::array::from_fn(|p| rows[p * w + c]) };
    let mut mx = get(rows, 0);
    for c in 1..l {
        let x = get(rows, c);
        for p in 0..P {
            if x[p] > mx[p] {
                mx[p] = x[p];
            }
        }
    }
    for c in 0..l {
        let mut x = get(rows, c);
        for p in 0..P {
            x[p] -= mx[p];
        }
        let e = eigen_pexp(x);
        for p in 0..P {
            rows[p * w + c] = e[p];
        }
    }
    let s = eigen_sum(l, |c| get(rows, c));
    for p in 0..P {
        for c in 0..l {
            rows[p * w + c] /= s[p];
        }
    }
}

/// `softmax_block` over all pixels of `q` (rows of w): blocks of 8, then one pixel at a time.
#[inline(always)]
pub(super) fn softmax_rows(q: &mut [f32], w: usize, l: usize) {
    let mut blocks = q.chunks_exact_mut(8 * w);
    for b in &mut blocks {
        softmax_block::<8>(b, w, l);
    }
    for row in blocks.into_remainder().chunks_exact_mut(w) {
        softmax_block::<1>(row, w, l);
    }
}

/// Eigen 3.3 `redux` with `scalar_sum_op`, LinearVectorizedTraversal, SSE Packet4f, aligned
/// start: two packet accumulators, then predux = (a0 + a2) + (a1 + a3), then the scalar tail.
/// Over `l` values `v(0..l)`, each an array of P independent lanes (pixels).
#[inline(always)]
pub(super) fn eigen_sum<const P: usize>(l: usize, v: impl Fn(usize) -> [f32; P]) -> [f32; P] {
    let add = |a: [f32; P], b: [f32; P]| -> [f32; P] { std::array::from_fn(|p| a[p] + b[p]) };
    let ps = 4;
    let aligned = l / ps * ps;
    if aligned == 0 {
        let mut r = v(0);
        for c in 1..l {
            r = add(r, v(c));
        }
        return r;
    }
    let aligned2 = l / (2 * ps) * (2 * ps);
    let mut p0 = [v(0), v(1), v(2), v(3)];
    if aligned > ps {
        let mut p1 = [v(4), v(5), v(6), v(7)];
        let mut i = 2 * ps;
        while i < aligned2 {
            for k in 0..4 {
                p0[k] = add(p0[k], v(i + k));
                p1[k] = add(p1[k], v(i + ps + k));
            }
            i += 2 * ps;
        }
        for k in 0..4 {
            p0[k] = add(p0[k], p1[k]);
        }
        if aligned > aligned2 {
            for k in 0..4 {
                p0[k] = add(p0[k], v(aligned2 + k));
            }
        }
    }
    let mut r = add(add(p0[0], p0[2]), add(p0[1], p0[3]));
    for c in aligned..l {
        r = add(r, v(c));
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crf::tests::TestRng;
    use crate::crf::{dense_crf, CrfParams};

    #[test]
    fn softmax_init_and_no_iterations() {
        // With 0 iterations the result is Q0 = softmax(log clip(P)).
        let (w, h, l) = (5usize, 3usize, 6usize);
        let n = w * h;
        let mut rng = TestRng::new(3);
        let probs: Vec<f32> = (0..n * l).map(|_| rng.next()).collect();
        let img = vec![0u8; n * 3];
        let p = CrfParams { iterations: 0, ..CrfParams::default() };
        let q = dense_crf(&img, w, h, &probs, l, &p).unwrap();
        for i in 0..n {
            let col: Vec<f64> = (0..l).map(|c| (probs[c * n + i] as f64).clamp(1e-5, 1.0)).collect();
            let s: f64 = col.iter().sum();
            for c in 0..l {
                let want = col[c] / s;
                assert!((q[c * n + i] as f64 - want).abs() < 1e-6, "{} vs {}", q[c * n + i], want);
            }
        }
        // eigen_pexp agrees with exp to float precision over the range the softmax sees.
        for k in 0..1600 {
            let x = -(k as f32) * 0.05;
            let (a, b) = (eigen_pexp([x])[0] as f64, (x as f64).exp());
            assert!((a - b).abs() <= 3e-7 * b + 1e-38, "{x}: {a} vs {b}");
        }
    }
}
