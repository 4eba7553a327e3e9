//! The fused causal attention's f32 kernels on AVX-512: the six products of a head's forward
//! and backward as register tiles of FMAs ([`super::tiles`]) instead of gemm calls.
//!
//! A head's products are small (at `tiny`'s shape a 64-query block's scores are 64 × 128 × 32),
//! and gemm packs both operands and dispatches through its planner on every call: at `tiny`'s
//! shape its dispatch alone was 5.5% of a step, and all of its work about a quarter. Here the
//! tiles read q, k, v, dy and the probabilities where they lie, through strides (a transposed
//! left operand is a column-strided one), and only K (for the scores) and V (for dP) are copied,
//! into panels of 16 keys, once per head. Row groups skip what the causal mask hides, in
//! 16-key panels rather than 64-row blocks.
//!
//! Each output is a plain sum over its reduction in order, one FMA a step, so the results differ
//! from gemm's at rounding level (gemm splits and orders its sums its own way).

use super::head::{head_parts, head_parts_mut, Dims};
use super::tiles::{
    backward_by_head, causal_softmax_padded, forward_by_head, panel_ceil, product, row_panels,
    softmax_grad_padded, F32Step, Left, Out, Right,
};

/// Whether this CPU has the instructions these kernels use.
pub(super) fn available() -> bool {
    std::arch::is_x86_feature_detected!("avx512f")
}

/// [`product`] of f32, compiled for AVX-512F.
///
/// # Safety
/// As [`product`]; the CPU has AVX-512F.
#[target_feature(enable = "avx512f")]
unsafe fn f32_product(
    a: Left<f32>,
    b: Right<f32>,
    c: Out,
    shape: (usize, usize),
    extent: impl Fn(usize, usize) -> (usize, usize, usize),
) {
    product::<F32Step>(a, b, c, shape, extent)
}

/// One thread's buffers for one head at a time, kept between calls (every kernel writes what it
/// later reads, so they are never cleared).
#[derive(Default)]
struct Scratch {
    /// K (for the scores) or V (for dP) in panels of 16 keys.
    keys: Vec<f32>,
    /// T × padded T: the probabilities where the forward did not keep them.
    recomputed: Vec<f32>,
    /// T × padded T: dP, then dS (backward only).
    grad: Vec<f32>,
}

thread_local! {
    static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::default();
}

impl Scratch {
    /// Runs `f` with this thread's scratch, grown to what a head of `d` needs (`recompute`: the
    /// probabilities; `backward`: dP and dS too).
    fn with<R>(d: &Dims, recompute: bool, backward: bool, f: impl FnOnce(&mut Self) -> R) -> R {
        fn at_least(v: &mut Vec<f32>, n: usize) {
            if v.len() < n {
                v.resize(n, 0.0);
            }
        }
        SCRATCH.with_borrow_mut(|s| {
            let square = d.t * panel_ceil(d.t);
            at_least(&mut s.keys, panel_ceil(d.t) * d.head_dim);
            at_least(&mut s.recomputed, if recompute { square } else { 0 });
            at_least(&mut s.grad, if backward { square } else { 0 });
            f(s)
        })
    }
}

/// One head's probabilities into `p` (T rows, row stride T rounded up to a panel; row i's
/// entries from span(i) on are not written), from its q and k in qkv.
///
/// # Safety
/// The CPU has AVX-512F; q and k point at the head's first query and key of its batch row.
#[target_feature(enable = "avx512f")]
unsafe fn probabilities(keys: &mut [f32], (q, k): (*const f32, *const f32), p: *mut f32, d: &Dims) {
    let (t, tp, hd, qkv_rs) = (d.t, panel_ceil(d.t), d.head_dim, 3 * d.c);
    row_panels(k, qkv_rs, (t, hd), keys.as_mut_ptr());
    // A group of rows sees the keys up to its last row: whole panels of them.
    f32_product(
        Left::rows(q, qkv_rs),
        Right::panels(keys.as_ptr(), hd),
        Out { base: p, rs: tp },
        (t, t),
        |r, mr| (0, hd, panel_ceil(r + mr)),
    );
    causal_softmax_padded(p, t, d.scale() as f32);
}

/// The attention's output and, with `keep_probabilities`, every head's probabilities (B·H
/// blocks of T rows, row stride T rounded up to 16; zero past each row's span).
///
/// # Safety
/// The CPU has AVX-512F ([`available`]); qkv holds B·T·3C values.
pub(super) unsafe fn forward(
    qkv: &[f32],
    d: Dims,
    keep_probabilities: bool,
) -> (Vec<f32>, Option<Vec<f32>>) {
    let (t, c, tp, hd) = (d.t, d.c, panel_ceil(d.t), d.head_dim);
    // SAFETY: each task writes all rows of its head's columns of y, and all of its kept block.
    forward_by_head(&d, keep_probabilities, |task, y, kept| {
        Scratch::with(&d, kept.is_none(), false, |s| {
            let (at_qkv, at_out) = d.head_offsets(task);
            // SAFETY: as the gemm kernel's forward: this task writes only rows of its batch row and
            // the columns of its head of y, and only its own block of the kept probabilities.
            unsafe {
                let [q, k, v] = head_parts(qkv.as_ptr(), at_qkv, c);
                let p = kept.unwrap_or(s.recomputed.as_mut_ptr());
                probabilities(&mut s.keys, (q, k), p, &d);
                // Y = P·V: a group of rows needs the keys up to its last row (P is zero past
                // each row's diagonal, up to its span).
                f32_product(
                    Left::rows(p, tp),
                    Right::rows(v, 3 * c),
                    Out {
                        base: y.add(at_out),
                        rs: c,
                    },
                    (t, hd),
                    |r, mr| (0, r + mr, hd),
                );
            }
        })
    })
}

/// dqkv from (qkv, dy), with the forward's probabilities when it kept them (as [`forward`]
/// returns them), else recomputing them.
///
/// # Safety
/// As [`forward`]; dy holds B·T·C values and `kept`, when given, B·H·T·⌈T/16⌉·16.
pub(super) unsafe fn backward(qkv: &[f32], dy: &[f32], d: Dims, kept: Option<&[f32]>) -> Vec<f32> {
    let (t, c, hd, tp) = (d.t, d.c, d.head_dim, panel_ceil(d.t));
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
                let p: *const f32 = match kept {
                    Some(kept) => kept.as_ptr().add(task * t * tp),
                    None => {
                        let p = s.recomputed.as_mut_ptr();
                        probabilities(&mut s.keys, (q, k), p, &d);
                        p
                    }
                };
                // dP = dY·Vᵀ over the keys each row group sees, then dS in place.
                row_panels(v, 3 * c, (t, hd), s.keys.as_mut_ptr());
                let ds = s.grad.as_mut_ptr();
                f32_product(
                    Left::rows(dy, c),
                    Right::panels(s.keys.as_ptr(), hd),
                    Out { base: ds, rs: tp },
                    (t, t),
                    |r, mr| (0, hd, panel_ceil(r + mr)),
                );
                softmax_grad_padded(p, ds, t, scale);
                // dQ = dS·K over the keys each row group sees.
                f32_product(
                    Left::rows(ds, tp),
                    Right::rows(k, 3 * c),
                    Out {
                        base: dq,
                        rs: 3 * c,
                    },
                    (t, hd),
                    |r, mr| (0, r + mr, hd),
                );
                // dK = dSᵀ·Q and dV = Pᵀ·dY: key row j meets the queries from j on, and the
                // entries a group reads above the diagonal lie within each row's span (zero).
                f32_product(
                    Left::columns(ds, tp),
                    Right::rows(q, 3 * c),
                    Out {
                        base: dk,
                        rs: 3 * c,
                    },
                    (t, hd),
                    |r, _| (r, t, hd),
                );
                f32_product(
                    Left::columns(p, tp),
                    Right::rows(dy, c),
                    Out {
                        base: dv,
                        rs: 3 * c,
                    },
                    (t, hd),
                    |r, _| (r, t, hd),
                );
            }
        })
    })
}
