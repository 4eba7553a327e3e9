//! What the attention kernels share ([`super`]'s gemm path and the AVX-512 tiles): the shape of
//! one call, where a head lies in the packed qkv buffer, and the causal softmax and its gradient
//! over one row of a head's scores.

use crate::ops::simd::{dot_lanes, max_lanes, sum_lanes, FastExp, LANES};
use candle_core::{bail, Layout, Result};

/// The shape of one attention call.
#[derive(Clone, Copy)]
pub(super) struct Dims {
    pub(super) batch: usize,
    pub(super) t: usize,
    /// Model width C (qkv is 3C wide).
    pub(super) c: usize,
    pub(super) n_head: usize,
    pub(super) head_dim: usize,
}

impl Dims {
    /// Where task `task` (batch row · heads + head) finds its head: the offset of its first
    /// query in qkv, and of its first column in a (B, T, C) tensor (y, dy).
    pub(super) fn head_offsets(&self, task: usize) -> (usize, usize) {
        let (bi, h) = (task / self.n_head, task % self.n_head);
        (
            bi * self.t * 3 * self.c + h * self.head_dim,
            bi * self.t * self.c + h * self.head_dim,
        )
    }

    /// The scores' scale, 1/√head_dim.
    pub(super) fn scale(&self) -> f64 {
        1.0 / (self.head_dim as f64).sqrt()
    }

    pub(super) fn of_qkv(l: &Layout, n_head: usize) -> Result<Self> {
        let (batch, t, c3) = l.shape().dims3()?;
        if c3 % 3 != 0 || n_head == 0 || (c3 / 3) % n_head != 0 {
            bail!("fused attention: qkv width {c3} is not 3 × a multiple of {n_head} heads");
        }
        let c = c3 / 3;
        Ok(Self {
            batch,
            t,
            c,
            n_head,
            head_dim: c / n_head,
        })
    }
}

/// A head's q, k and v in a packed (B, T, 3C) buffer, from the buffer and the head's offset
/// ([`Dims::head_offsets`]): k and v lie C and 2C after q.
///
/// # Safety
/// The head lies inside the buffer.
pub(super) unsafe fn head_parts<T>(qkv: *const T, offset: usize, c: usize) -> [*const T; 3] {
    let q = qkv.add(offset);
    [q, q.add(c), q.add(2 * c)]
}

/// [`head_parts`] of a buffer to write (dq, dk, dv in dqkv).
///
/// # Safety
/// As [`head_parts`].
pub(super) unsafe fn head_parts_mut<T>(qkv: *mut T, offset: usize, c: usize) -> [*mut T; 3] {
    let q = qkv.add(offset);
    [q, q.add(c), q.add(2 * c)]
}

/// Row `i` of the probabilities in place: softmax(scale · s) over its first `visible` = i + 1
/// entries, zeros after them.
///
/// The loops run over the visible entries rounded up to whole [`LANES`] chunks (the hidden
/// entries in that span are masked), so that no row ends in a scalar remainder loop: rows of a
/// causal block average 32-128 entries, and their 0-15 leftover entries, each a scalar exp,
/// made up much of the softmax's time.
#[inline(always)]
pub(super) fn causal_softmax_row<T: FastExp>(row: &mut [T], visible: usize, scale: T) {
    let span = visible.next_multiple_of(LANES).min(row.len());
    let (active, hidden) = row.split_at_mut(span);
    active[visible..].fill(T::neg_infinity());
    // scale > 0, so max(scale · s) = scale · max(s).
    let max = max_lanes(active) * scale;
    for v in active.iter_mut() {
        *v = (*v * scale - max).fast_exp();
    }
    // The fast exp of −∞ is the smallest normal float, not 0.
    active[visible..].fill(T::zero());
    let inv = T::one() / sum_lanes(active);
    for v in active.iter_mut() {
        *v = *v * inv;
    }
    hidden.fill(T::zero());
}

/// A row of dP (`ds`) into dS = scale · P ⊙ (dP − Σⱼ P ⊙ dP) in place, over the row's
/// probabilities `p` (as long as `ds`), which are zero past its visible entries, so that the
/// entries there add nothing and come out zero.
#[inline(always)]
pub(super) fn softmax_grad_row<T: FastExp>(p: &[T], ds: &mut [T], scale: T) {
    let dot = dot_lanes(p, ds);
    for (g, &y) in ds.iter_mut().zip(p) {
        *g = scale * y * (*g - dot);
    }
}
