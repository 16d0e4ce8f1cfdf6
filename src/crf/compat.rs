//! Label compatibility, as the mean-field pixel pass applies it to one pixel's message
//! (pydensecrf labelcompatibility.cpp; docs/method.md §6).
//!
//! It owns the arithmetic of pydensecrf's three compatibilities: `PottsCompatibility` (out =
//! -w · message), `DiagonalCompatibility` (out = diag(w) · message) and `MatrixCompatibility`
//! (out = W · message with W = (M + Mᵀ)/2, symmetrised when the kernel is built), and the
//! update `tmp1 -= out` of `DenseCRF::inference` that follows. Safe code only.

/// A kernel's label compatibility, borrowed from its `Kernel` for one pass.
#[derive(Clone, Copy)]
pub(super) enum PassCompat<'a> {
    /// Potts: holds -w (pydensecrf evaluates `-w_*Q` as (-w) · Q).
    Potts(f32),
    /// Diagonal: w per label.
    Diagonal(&'a [f32]),
    /// Matrix: the symmetrised l x l matrix, row-major.
    Matrix(&'a [f32]),
}

impl PassCompat<'_> {
    /// tmp -= compat(msg) over the l labels (`msg`, `tmp` hold l values); `out`, when given,
    /// receives compat(msg) (pydensecrf's tmp2 after the last kernel).
    #[inline(always)]
    pub(super) fn subtract(self, msg: &[f32], tmp: &mut [f32], mut out: Option<&mut [f32]>) {
        let l = msg.len();
        let mut put = |c: usize, o: f32, tmp: &mut [f32]| {
            tmp[c] -= o;
            if let Some(out) = out.as_deref_mut() {
                out[c] = o;
            }
        };
        match self {
            PassCompat::Potts(neg_w) => {
                for c in 0..l {
                    put(c, neg_w * msg[c], tmp);
                }
            }
            PassCompat::Diagonal(w) => {
                for c in 0..l {
                    put(c, w[c] * msg[c], tmp);
                }
            }
            PassCompat::Matrix(w) => {
                // Eigen's product accumulates each output over the labels in order, from 0.
                for c in 0..l {
                    let row = &w[c * l..(c + 1) * l];
                    let mut acc = 0f32;
                    for (a, m) in row.iter().zip(msg) {
                        acc += a * m;
                    }
                    put(c, acc, tmp);
                }
            }
        }
    }
}

/// pydensecrf's `MatrixCompatibility` constructor: W = 0.5 (M + Mᵀ), in f32 (`m` is l x l,
/// row-major; the symmetric result is the same in either order).
pub(super) fn symmetrise(m: &[f32], l: usize) -> Vec<f32> {
    let mut w = vec![0f32; l * l];
    for a in 0..l {
        for b in 0..l {
            w[a * l + b] = 0.5 * (m[a * l + b] + m[b * l + a]);
        }
    }
    w
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_made_compatibilities() {
        let msg = [1.0f32, 2.0, 4.0];
        let mut tmp = [10.0f32; 3];
        let mut out = [0f32; 3];
        PassCompat::Potts(-3.0).subtract(&msg, &mut tmp, Some(&mut out));
        assert_eq!(out, [-3.0, -6.0, -12.0]);
        assert_eq!(tmp, [13.0, 16.0, 22.0]);
        let mut tmp = [0f32; 3];
        PassCompat::Diagonal(&[1.0, -1.0, 0.5]).subtract(&msg, &mut tmp, None);
        assert_eq!(tmp, [-1.0, 2.0, -2.0]);
        // [[0, 2, 0], [4, 0, 0], [0, 0, 1]] symmetrises to [[0, 3, 0], [3, 0, 0], [0, 0, 1]].
        let w = symmetrise(&[0.0, 2.0, 0.0, 4.0, 0.0, 0.0, 0.0, 0.0, 1.0], 3);
        assert_eq!(w, vec![0.0, 3.0, 0.0, 3.0, 0.0, 0.0, 0.0, 0.0, 1.0]);
        let mut tmp = [0f32; 3];
        PassCompat::Matrix(&w).subtract(&msg, &mut tmp, Some(&mut out));
        assert_eq!(out, [6.0, 3.0, 4.0]);
        assert_eq!(tmp, [-6.0, -3.0, -4.0]);
    }
}
