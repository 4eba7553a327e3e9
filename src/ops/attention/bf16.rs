//! The fused causal attention's bf16 kernels, for CPU bf16 mixed precision on x86 CPUs with
//! AVX512-BF16 (AMD Zen 4/5, Intel Cooper Lake and later): the six products of a head's forward
//! and backward (S = Q·Kᵀ, Y = P·V; dP = dY·Vᵀ, dQ = dS·K, dK = dSᵀ·Q, dV = Pᵀ·dY) multiply
//! bf16 operands with `vdpbf16ps`, which adds the products of 16 pairs of bf16 values into 16
//! f32 sums per instruction, twice the multiply-adds of an f32 FMA. The softmax, its statistics,
//! P itself, dS's arithmetic and every output stay f32, as under PyTorch's CPU autocast and
//! flash attention: only the products' operands are rounded (to nearest even, as the linear
//! layers round theirs).
//!
//! On `baby`'s head shape (T = 256, head_dim 64) a 4×64 tile of `vdpbf16ps` runs at about twice
//! the rate of gemm's f32 kernel on the same product (docs/performance.md).
//!
//! `vdpbf16ps` wants its right operand as 16 output columns × one pair along the reduction, so
//! each operand is packed once per head into "panels": groups of 16 lanes, and for each pair
//! index p of the reduction, the 16 lanes' (x₂ₚ, x₂ₚ₊₁) as bf16 pairs in u32s (`[group][p][lane]`).
//! The left operand is read one u32 pair at a time (broadcast), either from rows of bf16 (a
//! row-major bf16 matrix is already pairs along its rows) or from panels (for Pᵀ and dSᵀ).
//! Row groups skip what the causal mask hides: a group of query rows multiplies only the keys it
//! sees (whole 16-key panels), and a group of key rows only the queries at or after it.

use std::arch::x86_64::*;

use super::head::{head_parts, head_parts_mut, Dims};
use super::tiles::{
    backward_by_head, causal_softmax_padded, forward_by_head, panel_ceil, product, row_panels,
    softmax_grad_padded, span, Bf16PairStep, Left, Out, Right, PANEL,
};

/// Whether this CPU has the instructions these kernels use.
pub(super) fn available() -> bool {
    std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512bw")
        && std::arch::is_x86_feature_detected!("avx512bf16")
}

/// [`product`] of bf16 pairs, compiled for AVX512-BF16.
///
/// # Safety
/// As [`product`]; the CPU has AVX512-BF16.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn bf16_product(
    a: Left<u32>,
    b: Right<u32>,
    c: Out,
    shape: (usize, usize),
    extent: impl Fn(usize, usize) -> (usize, usize, usize),
) {
    product::<Bf16PairStep>(a, b, c, shape, extent)
}

/// The first `n` (≤ 16) values at `src` (reading no further), rounded to bf16 by the CPU's
/// conversion (round to nearest even; unlike [`crate::ops::simd::bf16_bits`], subnormals flush to
/// zero, which for f32 values below 1.2·10⁻³⁸ changes nothing a product can see).
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
#[inline]
unsafe fn load_rounded(src: *const f32, n: usize) -> __m256bh {
    let x = if n >= PANEL {
        _mm512_loadu_ps(src)
    } else {
        _mm512_maskz_loadu_ps(((1u32 << n) - 1) as u16, src)
    };
    _mm512_cvtneps_pbh(x)
}

/// The first `cols` values of each of `rows` rows of `src` (row stride `rs`) rounded to bf16
/// ([`load_rounded`]), into rows of `dst` (u16, row stride `dst_rs`), zeros after them up to
/// `zero_to`.
///
/// # Safety
/// The CPU has AVX512-BF16; the rows lie inside the buffers.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn round_rows(
    src: *const f32,
    rs: usize,
    (rows, cols): (usize, usize),
    dst: *mut u16,
    (dst_rs, zero_to): (usize, usize),
) {
    for r in 0..rows {
        let (from, to) = (src.add(r * rs), dst.add(r * dst_rs));
        for j in (0..cols).step_by(PANEL) {
            let n = (cols - j).min(PANEL);
            let rounded: [u16; PANEL] = std::mem::transmute(load_rounded(from.add(j), n));
            std::ptr::copy_nonoverlapping(rounded.as_ptr(), to.add(j), n);
        }
        if zero_to > cols {
            std::ptr::write_bytes(to.add(cols), 0, zero_to - cols);
        }
    }
}

/// Panels with pairs along the rows of `src` (`rows` × `cols`, row stride `rs`): lane l of group
/// g holds column 16g + l, pair p its entries in rows 2p and 2p + 1, rounded to bf16
/// ([`load_rounded`]); zero outside src, and with `causal` also above the diagonal (column >
/// row), which src need not hold. With `causal`, group g is written only from pair 8g on: the
/// pairs before it are all above the diagonal, and no product reads them.
///
/// # Safety
/// The CPU has AVX512-BF16; dst holds ⌈cols/16⌉·16·⌈rows/2⌉ u32s.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn panels_down(
    src: *const f32,
    rs: usize,
    (rows, cols): (usize, usize),
    causal: bool,
    dst: *mut u32,
) {
    // Lane l of the result takes 16-bit element l of the first vector and then element l of the
    // second: the pair (row 2p, row 2p + 1) in one u32.
    let interleave = _mm512_set_epi16(
        31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21, 5, 20, 4,
        19, 3, 18, 2, 17, 1, 16, 0,
    );
    let pairs = rows.div_ceil(2);
    for g in 0..cols.div_ceil(PANEL) {
        let j0 = g * PANEL;
        let first = if causal { j0 / 2 } else { 0 };
        for p in first..pairs {
            // The entries of row i in this panel's columns (none past src, or past the diagonal).
            let row = |i: usize| -> __m256bh {
                let n = if i >= rows {
                    0
                } else if causal {
                    (i + 1).saturating_sub(j0).min(cols - j0)
                } else {
                    cols - j0
                };
                load_rounded(src.add(i.min(rows - 1) * rs + j0), n)
            };
            let both: __m512i = std::mem::transmute([row(2 * p), row(2 * p + 1)]);
            _mm512_storeu_si512(
                dst.add((g * pairs + p) * PANEL).cast(),
                _mm512_permutexvar_epi16(interleave, both),
            );
        }
    }
}

/// One thread's buffers for one head at a time, kept between calls (every kernel writes what it
/// later reads, so they are never cleared).
#[derive(Default)]
struct Scratch {
    /// Q (forward) or dY (backward) as rows of bf16 pairs (T × head pairs).
    rows: Vec<u32>,
    /// K or V as rows of bf16 pairs, on the way to `keys`.
    staging: Vec<u32>,
    /// K (for S) or V (for dP) in panels of 16 keys.
    keys: Vec<u32>,
    /// V, K, Q or dY in panels of 16 head columns, pairs along the sequence.
    columns: Vec<u32>,
    /// P or dS as rows of bf16 (T × padded T).
    square_rows: Vec<u16>,
    /// Pᵀ or dSᵀ in panels of 16 keys, pairs along queries.
    square_panels: Vec<u32>,
    /// f32 T × padded T: the probabilities where the forward did not keep them.
    recomputed: Vec<f32>,
    /// f32 T × padded T: dP, then dS (backward only).
    grad: Vec<f32>,
}

thread_local! {
    static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::default();
}

impl Scratch {
    /// Grows the buffers to what a head of `d` needs (`recompute`: the probabilities;
    /// `backward`: dP and dS too).
    fn fit(&mut self, d: &Dims, recompute: bool, backward: bool) {
        fn at_least<T: Copy + Default>(v: &mut Vec<T>, n: usize) {
            if v.len() < n {
                v.resize(n, T::default());
            }
        }
        let (t, tp, hp) = (d.t, panel_ceil(d.t), d.head_dim.div_ceil(2));
        let square = t * tp;
        at_least(&mut self.rows, t * hp);
        at_least(&mut self.staging, t * hp);
        at_least(&mut self.keys, tp * hp);
        at_least(&mut self.columns, panel_ceil(d.head_dim) * t.div_ceil(2));
        at_least(&mut self.square_rows, square);
        at_least(&mut self.square_panels, tp * t.div_ceil(2));
        at_least(&mut self.recomputed, if recompute { square } else { 0 });
        at_least(&mut self.grad, if backward { square } else { 0 });
    }

    /// Runs `f` with this thread's scratch, fitted to `d`.
    fn with<R>(d: &Dims, recompute: bool, backward: bool, f: impl FnOnce(&mut Self) -> R) -> R {
        SCRATCH.with_borrow_mut(|s| {
            s.fit(d, recompute, backward);
            f(s)
        })
    }
}

/// One head's probabilities into `p` (T rows, row stride padded T; row i's entries from span(i)
/// on are not written), from its q and k in qkv.
///
/// # Safety
/// As [`round_rows`]; q and k point at the head's first query and key of its batch row.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn probabilities(s: &mut Scratch, (q, k): (*const f32, *const f32), p: *mut f32, d: &Dims) {
    let (t, tp, hd, hp) = (d.t, panel_ceil(d.t), d.head_dim, d.head_dim.div_ceil(2));
    let qkv_rs = 3 * d.c;
    let scale = d.scale() as f32;
    round_rows(
        q,
        qkv_rs,
        (t, hd),
        s.rows.as_mut_ptr().cast(),
        (2 * hp, 2 * hp),
    );
    round_rows(
        k,
        qkv_rs,
        (t, hd),
        s.staging.as_mut_ptr().cast(),
        (2 * hp, 2 * hp),
    );
    row_panels(s.staging.as_ptr(), hp, (t, hp), s.keys.as_mut_ptr());
    // A group of rows sees keys up to its last row: whole panels of them.
    bf16_product(
        Left::rows(s.rows.as_ptr(), hp),
        Right::panels(s.keys.as_ptr(), hp),
        Out { base: p, rs: tp },
        (t, t),
        |r, mr| (0, hp, panel_ceil(r + mr)),
    );
    causal_softmax_padded(p, t, scale);
}

/// Rows of a causal T × T matrix (P or dS, f32, row stride padded T, row i held up to span(i))
/// as rows of bf16 (same stride), for the left operand of a product over keys.
///
/// # Safety
/// As [`round_rows`].
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn round_causal_rows(src: *const f32, t: usize, dst: *mut u16) {
    let tp = panel_ceil(t);
    for i in 0..t {
        round_rows(src.add(i * tp), tp, (1, span(i)), dst.add(i * tp), (tp, 0));
    }
}

/// C (T × head_dim, row stride `c_rs`) = M·X for a causal T × T matrix M in `s.square_rows`
/// (rows of bf16) and X (T × head_dim, f32, row stride `x_rs`): Y = P·V and dQ = dS·K.
///
/// # Safety
/// As [`round_rows`].
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn causal_rows_times(
    s: &mut Scratch,
    x: (*const f32, usize),
    c: (*mut f32, usize),
    d: &Dims,
) {
    let (t, tp, hd) = (d.t, panel_ceil(d.t), d.head_dim);
    panels_down(x.0, x.1, (t, hd), false, s.columns.as_mut_ptr());
    // A group of rows needs the keys up to its last row (row i of M is zero past i).
    bf16_product(
        Left::rows(s.square_rows.as_ptr().cast(), tp / 2),
        Right::panels(s.columns.as_ptr(), t.div_ceil(2)),
        Out { base: c.0, rs: c.1 },
        (t, hd),
        |r, mr| (0, (r + mr).div_ceil(2), hd),
    );
}

/// C (T × head_dim, row stride `c_rs`) = Mᵀ·X for a causal T × T matrix M (f32, row stride
/// padded T, row i held up to span(i)) and X (T × head_dim, row stride `x_rs`): dK = dSᵀ·Q and
/// dV = Pᵀ·dY.
///
/// # Safety
/// As [`round_rows`].
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn causal_transposed_times(
    s: &mut Scratch,
    m: *const f32,
    x: (*const f32, usize),
    c: (*mut f32, usize),
    d: &Dims,
) {
    let (t, tp, hd) = (d.t, panel_ceil(d.t), d.head_dim);
    let pairs = t.div_ceil(2);
    panels_down(m, tp, (t, t), true, s.square_panels.as_mut_ptr());
    panels_down(x.0, x.1, (t, hd), false, s.columns.as_mut_ptr());
    // Key row j meets the queries at or after it: a group starting at an even row r needs the
    // pairs from r / 2 on.
    bf16_product(
        Left::panels(s.square_panels.as_ptr(), pairs),
        Right::panels(s.columns.as_ptr(), pairs),
        Out { base: c.0, rs: c.1 },
        (t, hd),
        |r, _| (r / 2, pairs, hd),
    );
}

/// The bf16 attention's output and, with `keep_probabilities`, every head's f32 probabilities
/// (B·H blocks of T rows, row stride T rounded up to 16; zero past each row's span).
///
/// # Safety
/// The CPU has AVX512-BF16 ([`available`]); qkv holds B·T·3C values.
pub(super) unsafe fn forward(
    qkv: &[f32],
    d: Dims,
    keep_probabilities: bool,
) -> (Vec<f32>, Option<Vec<f32>>) {
    let c = d.c;
    // SAFETY: each task writes all rows of its head's columns of y, and all of its kept block.
    forward_by_head(&d, keep_probabilities, |task, y, kept| {
        Scratch::with(&d, kept.is_none(), false, |s| {
            let (at_qkv, at_out) = d.head_offsets(task);
            // SAFETY: as the gemm kernel's forward: this task writes only rows of its batch row and
            // the columns of its head of y, and only its own block of the kept probabilities.
            unsafe {
                let [q, k, v] = head_parts(qkv.as_ptr(), at_qkv, c);
                let mut recomputed = std::mem::take(&mut s.recomputed);
                let p = kept.unwrap_or(recomputed.as_mut_ptr());
                probabilities(s, (q, k), p, &d);
                round_causal_rows(p, d.t, s.square_rows.as_mut_ptr());
                causal_rows_times(s, (v, 3 * c), (y.add(at_out), c), &d);
                s.recomputed = recomputed;
            }
        })
    })
}

/// dqkv of the bf16 attention from (qkv, dy), with the forward's probabilities when it kept them
/// (as [`forward`] returns them), else recomputing them.
///
/// # Safety
/// As [`forward`]; dy holds B·T·C values and `kept`, when given, B·H·T·⌈T/16⌉·16.
pub(super) unsafe fn backward(qkv: &[f32], dy: &[f32], d: Dims, kept: Option<&[f32]>) -> Vec<f32> {
    let (t, c, hd, tp) = (d.t, d.c, d.head_dim, panel_ceil(d.t));
    let hp = hd.div_ceil(2);
    let scale = d.scale() as f32;
    // SAFETY: each task writes all rows of its head's dq, dk and dv columns.
    backward_by_head(&d, qkv.len(), |task, dqkv| {
        Scratch::with(&d, kept.is_none(), true, |s| {
            let (at_qkv, at_out) = d.head_offsets(task);
            // SAFETY: as the gemm kernel's backward: this task writes only rows of its batch
            // row and the columns of its head in each of dq, dk and dv.
            unsafe {
                let [q, k, v] = head_parts(qkv.as_ptr(), at_qkv, c);
                let dy = dy.as_ptr().add(at_out);
                let [dq, dk, dv] = head_parts_mut(dqkv, at_qkv, c);
                let mut recomputed = std::mem::take(&mut s.recomputed);
                let p: *const f32 = match kept {
                    Some(kept) => kept.as_ptr().add(task * t * tp),
                    None => {
                        let p = recomputed.as_mut_ptr();
                        probabilities(s, (q, k), p, &d);
                        p
                    }
                };
                // dP = dY·Vᵀ over the keys each row group sees, then dS in place.
                round_rows(dy, c, (t, hd), s.rows.as_mut_ptr().cast(), (2 * hp, 2 * hp));
                round_rows(
                    v,
                    3 * c,
                    (t, hd),
                    s.staging.as_mut_ptr().cast(),
                    (2 * hp, 2 * hp),
                );
                row_panels(s.staging.as_ptr(), hp, (t, hp), s.keys.as_mut_ptr());
                let ds = s.grad.as_mut_ptr();
                bf16_product(
                    Left::rows(s.rows.as_ptr(), hp),
                    Right::panels(s.keys.as_ptr(), hp),
                    Out { base: ds, rs: tp },
                    (t, t),
                    |r, mr| (0, hp, panel_ceil(r + mr)),
                );
                softmax_grad_padded(p, ds, t, scale);
                round_causal_rows(ds, t, s.square_rows.as_mut_ptr());
                causal_rows_times(s, (k, 3 * c), (dq, 3 * c), &d);
                causal_transposed_times(s, ds, (q, 3 * c), (dk, 3 * c), &d);
                causal_transposed_times(s, p, (dy, c), (dv, 3 * c), &d);
                s.recomputed = recomputed;
            }
        })
    })
}
