//! CPU storage access and the strided gemm shared by the CPU kernels.

use candle_core::{bail, Layout, Result};
use num_traits::Float;

/// The elements of a contiguous tensor's storage; `what` names the tensor in the error (every
/// fused kernel's wrapper makes its inputs contiguous, so this is a guard).
pub(crate) fn contiguous<'a, T>(s: &'a [T], l: &Layout, what: &str) -> Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&s[a..b]),
        None => bail!("fused kernel: its {what} must be contiguous"),
    }
}

/// A strided matrix view: (pointer, row stride, column stride), in elements.
pub(crate) type View<T> = (*const T, isize, isize);

/// dst (m×n) = lhs (m×k) · rhs (k×n), or dst += lhs · rhs with `accumulate`, with gemm (the
/// crate candle's CPU matmul uses), every operand strided. gemm splits the output among threads,
/// never the k loop, so the result does not depend on `parallelism`.
///
/// # Safety
/// Every view must cover its whole matrix, and `dst` must not overlap the inputs.
#[inline]
pub(crate) unsafe fn strided_matmul<T: Float + 'static>(
    (m, n, k): (usize, usize, usize),
    dst: (*mut T, isize, isize),
    lhs: View<T>,
    rhs: View<T>,
    accumulate: bool,
    parallelism: gemm::Parallelism,
) {
    gemm::gemm(
        m,
        n,
        k,
        dst.0,
        dst.2,
        dst.1,
        accumulate,
        lhs.0,
        lhs.2,
        lhs.1,
        rhs.0,
        rhs.2,
        rhs.1,
        T::one(),
        T::one(),
        false,
        false,
        false,
        parallelism,
    )
}
