//! The hot loops of the filter (splat, blur, slice, fused with the mean-field update), the
//! vectorised simplex, their instruction-set variants, and the buffers they work on.
//!
//! Every `unsafe` block of the CRF is in this file, except the two float-to-int conversions of
//! `eigen_pexp`, which are local to it. The filter loops read and write vertex rows
//! through raw pointers without bounds checks: they rely on the invariant of `Lattice` (every
//! row index it stores is <= m; established by `Lattice::assemble` in lattice.rs and read here
//! through its accessors only) and on `PassKernel::check` (once per pass: the buffers hold
//! m + 1 rows). The other sites are the AVX variants (chosen only when the CPU has AVX), the
//! prefetch hint (which never faults) and the view of aligned rows as f32. Each carries its
//! SAFETY argument. The rest of the module calls the safe entry points at the end of this file.

use super::compat::PassCompat;
use super::eigen::softmax_rows;
use super::lattice::{Lattice, BLUR_AHEAD};
use super::simplex::Elevator;

/// How many pixels ahead the splat and slice prefetch their vertex rows.
const PIX_AHEAD: usize = 8;

/// Hint the cache about a row we will read soon (the lattice's accesses are random, so the
/// hardware prefetcher cannot guess them; these loops are bound by memory latency).
#[inline(always)]
pub(super) fn prefetch<T>(p: *const T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: prefetching never faults, whatever the address.
    unsafe {
        std::arch::x86_64::_mm_prefetch(p as *const i8, std::arch::x86_64::_MM_HINT_T0);
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// Prefetch a row of `w` f32 starting at `p` (first and last cache line). Rows of 1, 2, 4 or 8
/// values in a 32-byte aligned buffer never straddle a cache line, so they need one prefetch.
#[inline(always)]
fn prefetch_row(p: *const f32, w: usize) {
    prefetch(p);
    if !matches!(w, 1 | 2 | 4 | 8) {
        prefetch(p.wrapping_add(w - 1));
    }
}

/// Which of pydensecrf's slicing orders to use: `seqCompute` (value_size <= 2) multiplies
/// (w * v) * alpha, `sseCompute` multiplies (w * alpha) * v.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum SliceOrder {
    Seq,
    Sse,
}

/// Eight f32 aligned to 32 bytes: rows of 8 values never straddle a cache line.
#[repr(C, align(32))]
#[derive(Clone, Copy)]
pub(super) struct A32([f32; 8]);

/// Vertex values of one lattice, rows of w values with a zero row 0 ("missing" neighbour):
/// `splat` receives the splatted input of the next filter, `blurred` ends up with the result.
pub(super) struct VertexBuf {
    pub(super) a: Vec<A32>,
    pub(super) b: Vec<A32>,
    len: usize,
}

impl VertexBuf {
    pub(super) fn new(m: usize, w: usize) -> Self {
        let len = (m + 1) * w;
        let z = A32([0.0; 8]);
        VertexBuf { a: vec![z; len.div_ceil(8)], b: vec![z; len.div_ceil(8)], len }
    }
    pub(super) fn both(&mut self) -> (&mut [f32], &mut [f32]) {
        let len = self.len;
        (&mut flat(&mut self.a)[..len], &mut flat(&mut self.b)[..len])
    }
}

fn flat(v: &mut [A32]) -> &mut [f32] {
    // SAFETY: A32 is repr(C) [f32; 8] without padding (32 bytes, align 32).
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr() as *mut f32, v.len() * 8) }
}

/// Instruction-set variants of the hot loops. The AVX variant is the same Rust code compiled
/// with wider vectors: no FMA, so every result is bit-identical to the baseline.
#[derive(Clone, Copy)]
pub(super) enum Isa {
    Base,
    #[cfg(target_arch = "x86_64")]
    Avx,
}

pub(super) fn detect_isa() -> Isa {
    #[cfg(target_arch = "x86_64")]
    {
        if std::env::var_os("CLIPMASK_CRF_NO_AVX").is_none() && is_x86_feature_detected!("avx") {
            return Isa::Avx;
        }
    }
    Isa::Base
}

macro_rules! dispatch {
    ($isa:expr, $w:expr, $f:ident ( $($arg:expr),* )) => {{
        match $isa {
            Isa::Base => match $w {
                2 => base::$f::<2>($w, $($arg),*),
                4 => base::$f::<4>($w, $($arg),*),
                8 => base::$f::<8>($w, $($arg),*),
                12 => base::$f::<12>($w, $($arg),*),
                16 => base::$f::<16>($w, $($arg),*),
                20 => base::$f::<20>($w, $($arg),*),
                24 => base::$f::<24>($w, $($arg),*),
                _ => base::$f::<0>($w, $($arg),*),
            },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: Isa::Avx is only chosen when the CPU has AVX.
            Isa::Avx => unsafe {
                match $w {
                    2 => avx::$f::<2>($w, $($arg),*),
                    4 => avx::$f::<4>($w, $($arg),*),
                    8 => avx::$f::<8>($w, $($arg),*),
                    12 => avx::$f::<12>($w, $($arg),*),
                    16 => avx::$f::<16>($w, $($arg),*),
                    20 => avx::$f::<20>($w, $($arg),*),
                    24 => avx::$f::<24>($w, $($arg),*),
                    _ => avx::$f::<0>($w, $($arg),*),
                }
            },
        }
    }};
}

/// What one mean-field pixel pass does for one kernel: slice its blurred vertex values into
/// the message, and (except after the last iteration) splat pre ⊙ Q into the next input.
pub(super) struct PassKernel<'a> {
    pub(super) lat: &'a Lattice,
    /// Per pixel, the factor before the filter (all ones when none: x · 1 = x exactly).
    pub(super) pre: &'a [f32],
    /// Per pixel, the factor after the filter (likewise).
    pub(super) post: &'a [f32],
    pub(super) compat: PassCompat<'a>,
    /// -w when `compat` is Potts (what the Potts-only loop reads), else unused.
    pub(super) neg_w: f32,
    pub(super) blurred: &'a [f32],
    pub(super) next: Option<&'a mut [f32]>,
    /// Rows 1..=zeroed of `next` are known to be zero. `next` is cleared just ahead of the
    /// splat (vertex ids follow first use in pixel order, so this walks forward through it
    /// while its lines are being written anyway) rather than in a separate pass.
    pub(super) zeroed: usize,
}

impl PassKernel<'_> {
    /// What the unchecked row accesses of a pass over n pixels with rows of w rely on (checked
    /// once per pass, not per pixel): the buffers hold m + 1 rows and the lattice has n pixels.
    fn check(&self, w: usize, n: usize) {
        let rows = (self.lat.m() + 1) * w;
        assert!(n <= self.lat.n() && self.pre.len() >= n && self.post.len() >= n);
        assert!(self.blurred.is_empty() || self.blurred.len() >= rows);
        assert!(self.next.as_ref().is_none_or(|next| next.len() >= rows));
    }

    /// After a splat: clear the rows of `next` that no pixel reached (vertices of the padding
    /// lanes), which the splat's running clear has not.
    fn zero_rest(&mut self, w: usize) {
        let m = self.lat.m();
        if let Some(next) = self.next.as_deref_mut() {
            if self.zeroed < m {
                next[(self.zeroed + 1) * w..(m + 1) * w].fill(0.0);
                self.zeroed = m;
            }
        }
    }
}

/// What `update` records for `DenseCrf::step_inference`, rows of w: pydensecrf's tmp1 (the
/// energies before the softmax) and tmp2 (the last kernel's message after its compatibility).
pub(super) struct Capture<'a> {
    pub(super) tmp1: &'a mut [f32],
    pub(super) tmp2: &'a mut [f32],
}

/// Filter kernels over rows of w values, generic over W (= w when known at compile time, else 0).
macro_rules! filter_kernels {
    ($($attr:meta)?) => {
        use super::{
            prefetch_row, softmax_rows, Capture, Elevator, Lattice, PassCompat, PassKernel,
            SliceOrder, BLUR_AHEAD, PIX_AHEAD,
        };

        /// `Elevator::simplex8_impl`, compiled for this instruction set.
        $(#[$attr])?
        pub fn simplex8<const D: usize>(
            el: &Elevator,
            f: &[f32],
            keys: &mut [u128],
            bary: &mut [f32],
            dirs: &mut [u8],
        ) {
            el.simplex8_impl::<D>(f, keys, bary, dirs)
        }

        /// One blur pass along direction `j`: dst[v] = src[v] + 0.5 (src[n1] + src[n2]).
        $(#[$attr])?
        pub fn blur<const W: usize>(w: usize, lat: &Lattice, j: usize, src: &[f32], dst: &mut [f32]) {
            let w = if W > 0 { W } else { w };
            let m = lat.m();
            let nb = &lat.blur()[j * m..(j + 1) * m + BLUR_AHEAD];
            let (src, dst) = (&src[..(m + 1) * w], &mut dst[..(m + 1) * w]);
            dst[..w].fill(0.0);
            let (s, out) = (src.as_ptr(), dst.as_mut_ptr());
            for v in 0..m {
                let [pa, pb] = nb[v + BLUR_AHEAD];
                let [a, b] = nb[v];
                // SAFETY: `Lattice::assemble` checked that every neighbour row is <= m, and
                // src and dst hold m + 1 rows of w; v + 1 <= m.
                unsafe {
                    prefetch_row(s.add(pa as usize * w), w);
                    prefetch_row(s.add(pb as usize * w), w);
                    let old = s.add((v + 1) * w);
                    let (a, b) = (s.add(a as usize * w), s.add(b as usize * w));
                    let o = out.add((v + 1) * w);
                    for t in 0..w {
                        *o.add(t) = *old.add(t) + 0.5 * (*a.add(t) + *b.add(t));
                    }
                }
            }
        }

        /// Splat norm ⊙ q (pixel-major rows of w) onto the vertices of each kernel's `next`
        /// buffer, scattering in pixel order: every vertex sums its contributions in increasing
        /// pixel order, as pydensecrf's splat does.
        $(#[$attr])?
        pub fn splat<const W: usize>(w: usize, q: &[f32], kernels: &mut [PassKernel]) {
            let w = if W > 0 { W } else { w };
            let n = q.len() / w;
            for k in kernels.iter() {
                k.check(w, n);
            }
            for i in 0..n {
                let qrow = &q[i * w..(i + 1) * w];
                for k in kernels.iter_mut() {
                    // SAFETY: checked above.
                    unsafe { splat_pixel::<W>(w, k, i, qrow) };
                }
            }
            for k in kernels.iter_mut() {
                k.zero_rest(w);
            }
        }

        /// Lanes are processed in blocks of 8 (and one of the remainder), accumulated in local
        /// arrays: registers the compiler knows alias nothing, so the lane loops vectorise.
        #[inline(always)]
        fn lane_blocks(w: usize) -> impl Iterator<Item = (usize, usize)> {
            (0..w / 8).map(|b| (b * 8, 8)).chain((w % 8 != 0).then_some((w / 8 * 8, w % 8)))
        }

        /// # Safety
        /// `k.check(w, n)` passed for the pass, and i < n.
        #[inline(always)]
        unsafe fn splat_pixel<const W: usize>(
            w: usize,
            k: &mut PassKernel,
            i: usize,
            qrow: &[f32],
        ) {
            let dp1 = k.lat.d() + 1;
            // SAFETY: passed on from the caller.
            unsafe {
                match dp1 {
                    3 => splat_rows::<W, 3>(w, dp1, k, i, qrow),
                    6 => splat_rows::<W, 6>(w, dp1, k, i, qrow),
                    _ => splat_rows::<W, 0>(w, dp1, k, i, qrow),
                }
            }
        }

        /// `splat_pixel` for d + 1 = DP (0: dp1 at run time); same safety contract.
        #[inline(always)]
        unsafe fn splat_rows<const W: usize, const DP: usize>(
            w: usize,
            dp1: usize,
            k: &mut PassKernel,
            i: usize,
            qrow: &[f32],
        ) {
            let w = if W > 0 { W } else { w };
            let dp1 = if DP > 0 { DP } else { dp1 };
            let lat = k.lat;
            let Some(next) = k.next.as_deref_mut() else { return };
            let offs = &lat.offset()[i * dp1..(i + 1) * dp1];
            let hi = offs.iter().fold(0, |a, &o| a.max(o as usize));
            if hi > k.zeroed {
                next[(k.zeroed + 1) * w..(hi + 1) * w].fill(0.0);
                k.zeroed = hi;
            }
            let next = next.as_mut_ptr();
            // SAFETY: offsets are <= m (`Lattice::assemble`), `next` holds m + 1 rows of w and
            // i < n (`PassKernel::check`), so the pixel's offsets, weights and rows are in bounds.
            unsafe {
                if i + PIX_AHEAD < lat.n() {
                    let ahead = lat.offset().as_ptr().add((i + PIX_AHEAD) * dp1);
                    for r in 0..dp1 {
                        prefetch_row(next.add(*ahead.add(r) as usize * w), w);
                    }
                }
                let s = *k.pre.get_unchecked(i);
                let offs = offs.as_ptr();
                let ws = lat.bary().as_ptr().add(i * dp1);
                for (l0, len) in lane_blocks(w) {
                    // DenseKernel::filter: in = Q ⊙ norm (or Q ⊙ 1).
                    let mut inp = [0f32; 8];
                    for t in 0..len {
                        inp[t] = qrow[l0 + t] * s;
                    }
                    for r in 0..dp1 {
                        let dst = next.add(*offs.add(r) as usize * w + l0);
                        let bw = *ws.add(r);
                        for t in 0..len {
                            *dst.add(t) += bw * inp[t];
                        }
                    }
                }
            }
        }

        /// One mean-field update over all pixels (pydensecrf `DenseCRF::inference`): slice each
        /// kernel's blurred values, tmp = -unary - Σ_k compat_k(post_k ⊙ K_k(pre_k ⊙ Q)), Q =
        /// softmax(tmp) on the l real labels, then splat the new Q into each kernel's `next`.
        /// Potts-only passes slice lane block by lane block (same numbers as `update_general`).
        $(#[$attr])?
        pub fn update<const W: usize>(
            w: usize,
            l: usize,
            order: SliceOrder,
            neg_unary: &[f32],
            q: &mut [f32],
            kernels: &mut [PassKernel],
            capture: Option<&mut Capture>,
        ) {
            let w = if W > 0 { W } else { w };
            let n = q.len() / w;
            assert!(neg_unary.len() >= n * w);
            assert!(capture.as_ref().is_none_or(|c| c.tmp1.len() >= n * w && c.tmp2.len() >= n * w));
            for k in kernels.iter() {
                k.check(w, n);
            }
            if capture.is_some() || kernels.iter().any(|k| !matches!(k.compat, PassCompat::Potts(_))) {
                // SAFETY: checked above.
                unsafe { update_general::<W>(w, l, order, neg_unary, q, kernels, capture) };
            } else {
                // Blocks of 8 pixels: slice each, softmax the block (vectorised across its
                // pixels), splat each. Splats stay in pixel order.
                for i0 in (0..n).step_by(8) {
                    let i1 = (i0 + 8).min(n);
                    for i in i0..i1 {
                        let qrow = &mut q[i * w..(i + 1) * w];
                        // SAFETY: checked above.
                        unsafe { slice_pixel::<W>(w, l, order, neg_unary, qrow, kernels, i) };
                    }
                    softmax_rows(&mut q[i0 * w..i1 * w], w, l);
                    // SAFETY: checked above.
                    unsafe { splat_block::<W>(w, kernels, q, i0, i1) };
                }
            }
            for k in kernels.iter_mut() {
                k.zero_rest(w);
            }
        }

        /// Splat pixels i0..i1 of q into every kernel's `next`, in pixel order.
        ///
        /// # Safety
        /// `k.check(w, n)` passed for every kernel of the pass, and i1 <= n.
        #[inline(always)]
        unsafe fn splat_block<const W: usize>(w: usize, kernels: &mut [PassKernel], q: &[f32], i0: usize, i1: usize) {
            for i in i0..i1 {
                for k in kernels.iter_mut() {
                    // SAFETY: passed on from the caller.
                    unsafe { splat_pixel::<W>(w, k, i, &q[i * w..(i + 1) * w]) };
                }
            }
        }

        /// `update`'s pixel loop for any compatibility, or with `capture` (a loop of its own,
        /// so that the Potts-only loop compiles as it did without it). Per pixel, each
        /// kernel's whole message post_k ⊙ (K_k(..))_i first, then tmp -= compat_k(message),
        /// kernel by kernel as `DenseCRF::inference`; tmp2 receives the last one's.
        ///
        /// # Safety
        /// `k.check(w, n)` passed for every kernel, and `capture` holds n rows of w.
        #[inline(always)]
        unsafe fn update_general<const W: usize>(
            w: usize,
            l: usize,
            order: SliceOrder,
            neg_unary: &[f32],
            q: &mut [f32],
            kernels: &mut [PassKernel],
            mut capture: Option<&mut Capture>,
        ) {
            let w = if W > 0 { W } else { w };
            let n = q.len() / w;
            let mut msg = vec![0f32; w];
            for i0 in (0..n).step_by(8) {
                let i1 = (i0 + 8).min(n);
                for i in i0..i1 {
                    prefetch_slices(w, kernels, i);
                    let qrow = &mut q[i * w..(i + 1) * w];
                    qrow.copy_from_slice(&neg_unary[i * w..(i + 1) * w]);
                    for (ki, k) in kernels.iter().enumerate() {
                        let s = k.post[i];
                        for (l0, len) in lane_blocks(w) {
                            // SAFETY: passed on from the caller.
                            let acc = unsafe { slice_any::<W>(w, k, i, l0, len, order) };
                            for t in 0..len {
                                msg[l0 + t] = acc[t] * s;
                            }
                        }
                        let last = capture.as_deref_mut().filter(|_| ki + 1 == kernels.len());
                        k.compat.subtract(&msg[..l], &mut qrow[..l], last.map(|c| &mut c.tmp2[i * w..i * w + l]));
                    }
                    qrow[l..].fill(0.0);
                }
                if let Some(c) = capture.as_deref_mut() {
                    c.tmp1[i0 * w..i1 * w].copy_from_slice(&q[i0 * w..i1 * w]);
                }
                softmax_rows(&mut q[i0 * w..i1 * w], w, l);
                // SAFETY: passed on from the caller.
                unsafe { splat_block::<W>(w, kernels, q, i0, i1) };
            }
        }

        /// Prefetch the blurred rows pixel i + PIX_AHEAD will slice.
        #[inline(always)]
        fn prefetch_slices(w: usize, kernels: &[PassKernel], i: usize) {
            for k in kernels.iter() {
                let lat = k.lat;
                let dp1 = lat.d() + 1;
                if i + PIX_AHEAD < lat.n() {
                    // SAFETY: pixel i + PIX_AHEAD exists; offsets are <= m and `blurred` holds
                    // m + 1 rows (`PassKernel::check`).
                    unsafe {
                        let ahead = lat.offset().as_ptr().add((i + PIX_AHEAD) * dp1);
                        for r in 0..dp1 {
                            prefetch_row(k.blurred.as_ptr().add(*ahead.add(r) as usize * w), w);
                        }
                    }
                }
            }
        }

        /// Slice pixel i's messages from every Potts kernel:
        /// qrow = -unary - Σ_k (-w_k) post_k ⊙ (K_k (pre_k ⊙ Q))_i.
        ///
        /// # Safety
        /// `k.check(w, n)` passed for every kernel of the pass, and i < n.
        #[inline(always)]
        unsafe fn slice_pixel<const W: usize>(
            w: usize,
            l: usize,
            order: SliceOrder,
            neg_unary: &[f32],
            qrow: &mut [f32],
            kernels: &[PassKernel],
            i: usize,
        ) {
            let w = if W > 0 { W } else { w };
            prefetch_slices(w, kernels, i);
            for (l0, len) in lane_blocks(w) {
                let mut tmp = [0f32; 8];
                tmp[..len].copy_from_slice(&neg_unary[i * w + l0..i * w + l0 + len]);
                for k in kernels.iter() {
                    // SAFETY: passed on from the caller.
                    let acc = unsafe { slice_any::<W>(w, k, i, l0, len, order) };
                    // out * norm, Potts: -w * out, tmp -= out.
                    let s = k.post[i];
                    for t in 0..len {
                        tmp[t] -= k.neg_w * (acc[t] * s);
                    }
                }
                qrow[l0..l0 + len].copy_from_slice(&tmp[..len]);
            }
            // Padding lanes stay 0 (their messages are 0: Q is 0 there).
            qrow[l..].fill(0.0);
        }

        /// `slice_rows` with d + 1 dispatched to its specialisations. Same safety contract.
        #[inline(always)]
        unsafe fn slice_any<const W: usize>(
            w: usize,
            k: &PassKernel,
            i: usize,
            l0: usize,
            len: usize,
            order: SliceOrder,
        ) -> [f32; 8] {
            // SAFETY: passed on from the caller.
            unsafe {
                match k.lat.d() + 1 {
                    3 => slice_rows::<W, 3>(w, 3, k, i, l0, len, order),
                    6 => slice_rows::<W, 6>(w, 6, k, i, l0, len, order),
                    dp1 => slice_rows::<W, 0>(w, dp1, k, i, l0, len, order),
                }
            }
        }

        /// One kernel's message at pixel i, lanes l0..l0 + len: Σ_r weight_r · blurred[offset_r],
        /// with pydensecrf's order of multiplications (see `SliceOrder`). DP = d + 1, or 0 when
        /// only known at run time. Same safety contract as `slice_pixel`.
        #[inline(always)]
        unsafe fn slice_rows<const W: usize, const DP: usize>(
            w: usize,
            dp1: usize,
            k: &PassKernel,
            i: usize,
            l0: usize,
            len: usize,
            order: SliceOrder,
        ) -> [f32; 8] {
            let w = if W > 0 { W } else { w };
            let dp1 = if DP > 0 { DP } else { dp1 };
            let lat = k.lat;
            let mut acc = [0f32; 8];
            // SAFETY: i < n, offsets are <= m (`Lattice::assemble`), l0 + len <= w.
            unsafe {
                let offs = lat.offset().as_ptr().add(i * dp1);
                let ws = lat.bary().as_ptr().add(i * dp1);
                let rows = k.blurred.as_ptr();
                for r in 0..dp1 {
                    let v = rows.add(*offs.add(r) as usize * w + l0);
                    let bw = *ws.add(r);
                    match order {
                        // sseCompute multiplies the weight by alpha first.
                        SliceOrder::Sse => {
                            let bw = bw * lat.alpha();
                            for t in 0..len {
                                acc[t] += bw * *v.add(t);
                            }
                        }
                        SliceOrder::Seq => {
                            for t in 0..len {
                                acc[t] += bw * *v.add(t) * lat.alpha();
                            }
                        }
                    }
                }
            }
            acc
        }
    };
}

pub(super) mod base {
    filter_kernels!();
}

#[cfg(target_arch = "x86_64")]
mod avx {
    filter_kernels!(target_feature(enable = "avx"));
}

// Safe entry points for the rest of the module: the instruction-set dispatch of the loops above.

/// `Elevator::simplex8_impl` for d = 2 or 5 (`d`), compiled for `isa`.
pub(super) fn simplex8(isa: Isa, d: usize, el: &Elevator, f: &[f32], k: &mut [u128], w: &mut [f32], r: &mut [u8]) {
    match (isa, d) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: Isa::Avx is only chosen when the CPU has AVX.
        (Isa::Avx, 2) => unsafe { avx::simplex8::<2>(el, f, k, w, r) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        (Isa::Avx, _) => unsafe { avx::simplex8::<5>(el, f, k, w, r) },
        (_, 2) => base::simplex8::<2>(el, f, k, w, r),
        _ => base::simplex8::<5>(el, f, k, w, r),
    }
}

/// `splat` (rows of w values), compiled for `isa`.
pub(super) fn splat(isa: Isa, w: usize, q: &[f32], kernels: &mut [PassKernel]) {
    dispatch!(isa, w, splat(q, kernels))
}

/// `blur` along direction `j` (rows of w values), compiled for `isa`.
pub(super) fn blur(isa: Isa, w: usize, lat: &Lattice, j: usize, src: &[f32], dst: &mut [f32]) {
    dispatch!(isa, w, blur(lat, j, src, dst))
}

/// `update` (rows of w values, l labels), compiled for `isa`.
#[allow(clippy::too_many_arguments)]
pub(super) fn update(
    isa: Isa,
    w: usize,
    l: usize,
    order: SliceOrder,
    neg_unary: &[f32],
    q: &mut [f32],
    kernels: &mut [PassKernel],
    capture: Option<&mut Capture>,
) {
    dispatch!(isa, w, update(l, order, neg_unary, q, kernels, capture))
}
