//! CPU storage access and the strided gemm shared by the CPU kernels.

use super::simd::written_vec;
use super::Precision;
use candle_core::{backend::BackendStorage, bail, CpuStorage, Layout, Result};
use num_traits::Float;
use std::borrow::Cow;
use std::mem::MaybeUninit;

/// Runs `f` on one of rayon's worker threads and waits for it (directly, when called from one).
///
/// Every parallel CPU op (candle's, gemm's, ours) runs on rayon's pool. Called from a thread
/// outside the pool, each op is handed to the pool and its caller sleeps until a worker wakes it:
/// hundreds of hand-offs and wake-ups a step. Called from a worker, an op splits its work on that
/// worker's own queue and the worker takes part in it. A training step's forward and backward
/// passes and its update run here on CPU. Six interleaved pairs on AMD Zen 4, 2 threads: medians
/// `tiny` f32 +6%, `baby` f32 +5%, `baby` bf16 +4% (one pair of six slower), `tiny50k` (a few
/// large ops) no change beyond ±4%. Values are unchanged: the ops split their work by thread
/// count, not by which thread calls them.
pub fn on_worker_thread<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if rayon::current_thread_index().is_some() {
        f()
    } else {
        rayon::scope(|_| f())
    }
}

/// [`on_worker_thread`] for work on `device`: on CPU it moves to a worker; on other devices it
/// runs on the calling thread (a CUDA context is current per thread, and their ops do not run
/// on rayon).
pub fn on_worker_thread_if_cpu<R: Send>(
    device: &candle_core::Device,
    f: impl FnOnce() -> R + Send,
) -> R {
    if device.is_cpu() {
        on_worker_thread(f)
    } else {
        f()
    }
}

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

/// A matrix operand of [`matmul`]: its elements with (row stride, column stride), in f32 or as
/// bf16 bits ([`super::simd::round_to_bf16`]).
#[derive(Clone, Copy)]
pub(crate) enum Matrix<'a> {
    F32(&'a [f32], isize, isize),
    Bf16(&'a [u16], isize, isize),
}

impl Matrix<'_> {
    /// Whether [`matmul`] sends this left operand to gemm even with oneDNN loaded: f32 read
    /// transposed (column stride ≠ 1), as dyᵀ in dW = dyᵀ·x. oneDNN 2.x has no brgemm kernel for
    /// it on some CPUs (Intel Xeons) and falls back to its slower "gemm:jit" (docs/performance.md,
    /// "Tried and dropped"); gemm takes any strides at full speed.
    ///
    /// Where oneDNN has no bf16 matmul for the CPU (oneDNN 2.x needs AVX-512), [`Operand::bf16`]
    /// has already widened bf16 operands to f32 (exact, so the products are the bf16 products),
    /// and a bf16 matrix here would be a bug that gemm refuses.
    fn goes_to_gemm(&self) -> bool {
        match self {
            Matrix::F32(_, _, cs) => *cs != 1,
            Matrix::Bf16(..) => !super::onednn::bf16_kernels(),
        }
    }

    /// Whether a (rows × cols) view with these strides stays inside the slice.
    fn covers(&self, rows: usize, cols: usize) -> bool {
        let (len, rs, cs) = match *self {
            Matrix::F32(s, rs, cs) => (s.len(), rs, cs),
            Matrix::Bf16(s, rs, cs) => (s.len(), rs, cs),
        };
        if rows == 0 || cols == 0 {
            return true;
        }
        rs >= 0 && cs >= 0 && (rows - 1) * (rs as usize) + (cols - 1) * (cs as usize) < len
    }

    /// The rows from `row` on.
    fn rows_from(self, row: usize) -> Self {
        match self {
            Matrix::F32(s, rs, cs) => Matrix::F32(&s[row * rs as usize..], rs, cs),
            Matrix::Bf16(s, rs, cs) => Matrix::Bf16(&s[row * rs as usize..], rs, cs),
        }
    }

    /// The columns from `col` on.
    fn cols_from(self, col: usize) -> Self {
        match self {
            Matrix::F32(s, rs, cs) => Matrix::F32(&s[col * cs as usize..], rs, cs),
            Matrix::Bf16(s, rs, cs) => Matrix::Bf16(&s[col * cs as usize..], rs, cs),
        }
    }

    fn operand(&self) -> super::onednn::Operand {
        use super::onednn::Elem;
        match *self {
            Matrix::F32(s, rs, cs) => (s.as_ptr().cast(), Elem::F32, rs, cs),
            Matrix::Bf16(s, rs, cs) => (s.as_ptr().cast(), Elem::Bf16, rs, cs),
        }
    }
}

/// A pointer shared across parallel tasks that each write their own, disjoint elements of one
/// buffer (the attention's heads, a matrix's column blocks).
#[derive(Clone, Copy)]
pub(crate) struct SharedPtr<T>(pub(crate) *mut T);
// SAFETY: tasks write disjoint elements (see each use), and the buffer outlives the parallel loop.
unsafe impl<T> Send for SharedPtr<T> {}
unsafe impl<T> Sync for SharedPtr<T> {}

impl<T> SharedPtr<T> {
    /// The pointer (a method, so closures capture the `Sync` wrapper rather than its field).
    pub(crate) fn get(self) -> *mut T {
        self.0
    }
}

/// Rows of the output per oneDNN call, at least: below it one thread does the whole matmul.
const MIN_ROWS_PER_TASK: usize = 64;

/// dst (m×n, row-major) = lhs (m×k) · rhs (k×n) [+ bias on every row], or dst += … with
/// `accumulate`, products accumulated in f32: through oneDNN when it is loaded
/// ([`super::onednn::onednn`]), else with gemm (f32 operands only), on rayon's thread count.
pub(crate) fn matmul(
    mnk: (usize, usize, usize),
    dst: &mut [f32],
    lhs: Matrix,
    rhs: Matrix,
    bias: Option<&[f32]>,
    accumulate: bool,
) -> Result<()> {
    // SAFETY: MaybeUninit<f32> has f32's layout, and only initialised f32 are written through it.
    let dst = unsafe { &mut *(dst as *mut [f32] as *mut [MaybeUninit<f32>]) };
    matmul_uninit(mnk, dst, lhs, rhs, bias, accumulate)
}

/// The f32 and f64 arms of a CPU op, written once: each `name = storage, layout, "what"` binds
/// `name` to its storage's contiguous slice, the storages all f32 or all f64, and what `$body`
/// returns goes into a storage of that dtype; any other mix is the error `$error`.
macro_rules! by_float {
    ($error:literal; $($name:ident = $storage:expr, $layout:expr, $what:literal);+ => $body:expr) => {
        match ($($storage,)+) {
            ($(candle_core::CpuStorage::F32($name),)+) => {
                $(let $name = $crate::ops::cpu::contiguous($name, $layout, $what)?;)+
                candle_core::CpuStorage::F32($body)
            }
            ($(candle_core::CpuStorage::F64($name),)+) => {
                $(let $name = $crate::ops::cpu::contiguous($name, $layout, $what)?;)+
                candle_core::CpuStorage::F64($body)
            }
            _ => candle_core::bail!($error),
        }
    };
}
pub(crate) use by_float;

/// bf16 bits as the f32 values they stand for.
fn widen_bf16(bits: &[u16]) -> Vec<f32> {
    use rayon::prelude::*;
    bits.par_iter()
        .map(|&b| f32::from_bits(u32::from(b) << 16))
        .collect()
}

/// Columns of the output per oneDNN call in [`matmul_by_columns`], a multiple of: oneDNN's f32
/// and bf16 kernels work on blocks of 16-64 columns.
const COLUMN_BLOCK: usize = 64;

/// dst (m×n, row-major) = lhs (m×k) · rhs (k×n), as [`matmul`] (without bias or accumulation),
/// with the output's columns rather than its rows split over rayon's threads when oneDNN runs
/// it. For a wide rhs that oneDNN repacks on every call (a transposed one, as the tied
/// embedding in the lm_head's x·wᵀ): split by rows, each thread's call repacks all of rhs; split
/// by columns, each repacks its own columns, and each sees all m rows. The lm_head's logits,
/// 166 × 128 · 128 × 50,304: `tiny50k` f32 1.5-16% faster in 4 interleaved pairs (AMD Zen 4,
/// 2 threads), values bitwise unchanged (each element is the same k-long dot product).
pub(crate) fn matmul_by_columns(
    (m, n, k): (usize, usize, usize),
    dst: &mut [f32],
    lhs: Matrix,
    rhs: Matrix,
) -> Result<()> {
    let threads = rayon::current_num_threads();
    let Some(dnnl) = super::onednn::onednn() else {
        return matmul((m, n, k), dst, lhs, rhs, None, false);
    };
    // What `matmul` sends to gemm, and what it has no split to make.
    if lhs.goes_to_gemm() || threads < 2 || m == 0 || k == 0 || n < 2 * COLUMN_BLOCK {
        return matmul((m, n, k), dst, lhs, rhs, None, false);
    }
    if dst.len() < m * n || !lhs.covers(m, k) || !rhs.covers(k, n) {
        bail!("CPU matmul ({m}×{k} · {k}×{n}): an operand is smaller than its view");
    }
    let cols = n.div_ceil(threads).next_multiple_of(COLUMN_BLOCK);
    let dst = SharedPtr(dst.as_mut_ptr());
    use rayon::prelude::*;
    (0..n.div_ceil(cols)).into_par_iter().try_for_each(|i| {
        let (c0, width) = (i * cols, cols.min(n - i * cols));
        // SAFETY: the views lie inside their slices (checked above, and this task's columns of
        // rhs are inside rhs); each task writes its own columns of dst, which overlaps no input.
        unsafe {
            dnnl.matmul(
                (m, width, k),
                (dst.get().add(c0), n),
                lhs.operand(),
                rhs.cols_from(c0).operand(),
                None,
                false,
                1,
            )
        }
    })
}

/// lhs (m×k) · rhs (k×n) [+ bias on every row] in a new row-major m×n buffer, as [`matmul`],
/// without clearing the buffer first where oneDNN writes all of it.
pub(crate) fn matmul_new(
    (m, n, k): (usize, usize, usize),
    lhs: Matrix,
    rhs: Matrix,
    bias: Option<&[f32]>,
) -> Result<Vec<f32>> {
    if super::onednn::onednn().is_none() || lhs.goes_to_gemm() {
        let mut dst = vec![0f32; m * n];
        matmul((m, n, k), &mut dst, lhs, rhs, bias, false)?;
        return Ok(dst);
    }
    let mut result = Ok(());
    // SAFETY: oneDNN writes every element of the m×n result (or the k = 0 fill does); on an
    // error the vector is dropped unread.
    let dst = unsafe {
        written_vec(m * n, |dst| {
            result = matmul_uninit((m, n, k), dst, lhs, rhs, bias, false)
        })
    };
    result.map(|()| dst)
}

/// [`matmul`] into a destination that need not be initialised unless `accumulate` (oneDNN and
/// the k = 0 fill write every element; gemm is given initialised memory by `matmul_new`, which
/// must send here exactly the calls that go to gemm).
fn matmul_uninit(
    (m, n, k): (usize, usize, usize),
    dst: &mut [MaybeUninit<f32>],
    lhs: Matrix,
    rhs: Matrix,
    bias: Option<&[f32]>,
    accumulate: bool,
) -> Result<()> {
    if dst.len() < m * n
        || !lhs.covers(m, k)
        || !rhs.covers(k, n)
        || bias.is_some_and(|b| b.len() < n)
    {
        bail!("CPU matmul ({m}×{k} · {k}×{n}): an operand is smaller than its view");
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    let dst = &mut dst[..m * n];
    if k == 0 {
        for (i, y) in dst.iter_mut().enumerate() {
            // SAFETY: with `accumulate` the caller initialised dst.
            let before = if accumulate {
                unsafe { y.assume_init() }
            } else {
                0.0
            };
            y.write(before + bias.map_or(0.0, |b| b[i % n]));
        }
        return Ok(());
    }
    let threads = rayon::current_num_threads();
    if let (Some(dnnl), false) = (super::onednn::onednn(), lhs.goes_to_gemm()) {
        // dst's rows split over rayon's threads, one single-threaded oneDNN call each: one
        // thread pool (OpenMP's and rayon's idle threads spinning against each other cost a
        // third of a step on 2 cores).
        let tasks = threads.min(m.div_ceil(MIN_ROWS_PER_TASK)).max(1);
        let rows = m.div_ceil(tasks);
        use rayon::prelude::*;
        return dst
            .par_chunks_mut(rows * n)
            .enumerate()
            .try_for_each(|(i, dst)| {
                let lhs = lhs.rows_from(i * rows);
                // SAFETY: the views were checked to lie inside their slices (this task's rows
                // of lhs are inside lhs), and dst, borrowed mutably, overlaps none of them.
                unsafe {
                    dnnl.matmul(
                        (dst.len() / n, n, k),
                        (dst.as_mut_ptr().cast(), n),
                        lhs.operand(),
                        rhs.operand(),
                        bias.map(|b| b.as_ptr()),
                        accumulate,
                        1,
                    )
                }
            });
    }
    // bf16 operands reach here only where oneDNN has no bf16 kernel, and `Operand` widens
    // those to f32 once, when it is made.
    let ((l, lrs, lcs), (r, rrs, rcs)) = match (lhs, rhs) {
        (Matrix::F32(l, lrs, lcs), Matrix::F32(r, rrs, rcs)) => ((l, lrs, lcs), (r, rrs, rcs)),
        _ => bail!("CPU matmul ({m}×{k} · {k}×{n}): gemm takes f32 operands only"),
    };
    let parallelism = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: as above; gemm reads dst only with `accumulate`, when the caller initialised it.
    unsafe {
        strided_matmul(
            (m, n, k),
            (dst.as_mut_ptr().cast(), n as isize, 1),
            (l.as_ptr(), lrs, lcs),
            (r.as_ptr(), rrs, rcs),
            accumulate,
            parallelism,
        )
    };
    if let Some(bias) = bias {
        for row in dst.chunks_exact_mut(n) {
            for (y, b) in row.iter_mut().zip(bias) {
                // SAFETY: gemm wrote every element.
                y.write(unsafe { y.assume_init() } + b);
            }
        }
    }
    Ok(())
}

/// Source rows per task of [`transposed`]: 64 rows of GPT-2's 768 f32 columns are 192 KB, inside
/// L2, and each task's writes are runs of 64 elements.
const TRANSPOSE_ROWS: usize = 64;

/// The row-major (cols × rows) transpose of the row-major (rows × cols) `src`, on rayon's
/// threads, each task a block of source rows (read once, in L2) to a block of columns.
pub(crate) fn transposed<E: Copy + Send + Sync>(
    src: &[E],
    rows: usize,
    cols: usize,
) -> Result<Vec<E>> {
    if src.len() != rows * cols {
        bail!("transpose: {} elements are not {rows} × {cols}", src.len());
    }
    use rayon::prelude::*;
    // SAFETY: the tasks' blocks of columns together cover every one of the cols × rows
    // elements, each written once.
    Ok(unsafe {
        written_vec(rows * cols, |dst| {
            let dst = SharedPtr(dst.as_mut_ptr());
            src.par_chunks(TRANSPOSE_ROWS * cols.max(1))
                .enumerate()
                .for_each(|(block, src)| {
                    let r0 = block * TRANSPOSE_ROWS;
                    for j in 0..cols {
                        // SAFETY: row j of the result, columns r0..r0 + this block's rows:
                        // inside it, and no other task's.
                        let out = dst.get().add(j * rows + r0);
                        for (i, row) in src.chunks_exact(cols).enumerate() {
                            (*out.add(i)).write(row[j]);
                        }
                    }
                });
        })
    })
}

/// A matrix in the precision its matmuls want: f32 borrowed, f32 rounded to bf16 once for all
/// the matmuls that read it, or bf16 borrowed from a tensor its producer stored rounded already
/// (or either one's transposed copy, [`Operand::transposed`]).
pub(crate) enum Operand<'a> {
    F32(Cow<'a, [f32]>),
    Bf16(Cow<'a, [u16]>),
}

impl<'a> Operand<'a> {
    pub(crate) fn new(values: &'a [f32], precision: Precision) -> Self {
        match precision {
            Precision::F32 => Operand::F32(Cow::Borrowed(values)),
            Precision::Bf16 => Operand::bf16(Cow::Owned(super::simd::to_bf16_parallel(values))),
        }
    }

    /// bf16 values as an operand: as they are where oneDNN multiplies bf16, else widened to
    /// the f32 values they stand for (exact), once for every matmul that reads them.
    pub(crate) fn bf16(bits: Cow<'a, [u16]>) -> Self {
        if super::onednn::bf16_kernels() {
            Operand::Bf16(bits)
        } else {
            Operand::F32(Cow::Owned(widen_bf16(&bits)))
        }
    }

    /// The operand held in contiguous CPU storage: f32 in `precision`, or bf16 as it is (bf16
    /// storage only with bf16 precision: rounding is not undone).
    pub(crate) fn of_storage(
        storage: &'a CpuStorage,
        layout: &Layout,
        precision: Precision,
        what: &str,
    ) -> Result<Self> {
        use half::slice::HalfFloatSliceExt;
        match (storage, precision) {
            (CpuStorage::F32(v), _) => Ok(Operand::new(contiguous(v, layout, what)?, precision)),
            (CpuStorage::BF16(v), Precision::Bf16) => Ok(Operand::bf16(Cow::Borrowed(
                contiguous(v, layout, what)?.reinterpret_cast(),
            ))),
            (s, _) => bail!(
                "CPU matmul: {what} is {:?}, which {precision:?} matmuls do not take",
                s.dtype()
            ),
        }
    }

    /// The rounded copy, when there is one (f32 and stored bf16 operands only borrow).
    pub(crate) fn into_owned(self) -> Option<Operand<'static>> {
        match self {
            Operand::Bf16(Cow::Owned(v)) => Some(Operand::Bf16(Cow::Owned(v))),
            Operand::F32(Cow::Owned(v)) => Some(Operand::F32(Cow::Owned(v))),
            Operand::F32(Cow::Borrowed(_)) | Operand::Bf16(Cow::Borrowed(_)) => None,
        }
    }

    /// The row-major (cols × rows) transpose of this row-major (rows × cols) matrix, copied.
    pub(crate) fn transposed(&self, rows: usize, cols: usize) -> Result<Operand<'static>> {
        Ok(match self {
            Operand::F32(v) => Operand::F32(Cow::Owned(transposed(v, rows, cols)?)),
            Operand::Bf16(v) => Operand::Bf16(Cow::Owned(transposed(v, rows, cols)?)),
        })
    }

    /// The matrix starting at element 0 with these strides.
    pub(crate) fn view(&self, row_stride: usize, col_stride: usize) -> Matrix<'_> {
        self.view_at(0, row_stride, col_stride)
    }

    /// The matrix starting at element `offset` with these strides.
    pub(crate) fn view_at(
        &self,
        offset: usize,
        row_stride: usize,
        col_stride: usize,
    ) -> Matrix<'_> {
        let (rs, cs) = (row_stride as isize, col_stride as isize);
        match self {
            Operand::F32(v) => Matrix::F32(&v[offset..], rs, cs),
            Operand::Bf16(v) => Matrix::Bf16(&v[offset..], rs, cs),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{on_worker_thread, on_worker_thread_if_cpu, transposed};

    #[test]
    fn transposed_moves_element_r_c_to_c_r_across_row_blocks() {
        // 2×3 by hand.
        assert_eq!(
            transposed(&[1, 2, 3, 4, 5, 6], 2, 3).unwrap(),
            vec![1, 4, 2, 5, 3, 6]
        );
        // 150 rows: two full 64-row blocks and a partial one; element (r, c) holds 1000r + c.
        let (rows, cols) = (150usize, 7usize);
        let src: Vec<u32> = (0..rows * cols)
            .map(|i| (1000 * (i / cols) + i % cols) as u32)
            .collect();
        let t = transposed(&src, rows, cols).unwrap();
        for c in 0..cols {
            for r in 0..rows {
                assert_eq!(t[c * rows + r], (1000 * r + c) as u32, "({r}, {c})");
            }
        }
        assert!(transposed(&src, rows, cols + 1).is_err());
    }

    #[test]
    fn on_worker_thread_runs_on_a_pool_worker_and_inline_from_one() {
        assert!(
            rayon::current_thread_index().is_none(),
            "tests run outside the pool"
        );
        let (index, caller) = on_worker_thread(|| {
            let index = rayon::current_thread_index();
            let caller = std::thread::current().id();
            // From a worker, the nested call runs on the same thread, not handed off again.
            let nested = on_worker_thread(|| std::thread::current().id());
            assert_eq!(nested, caller);
            (index, caller)
        });
        assert!(index.is_some(), "the closure ran outside rayon's pool");
        assert_ne!(caller, std::thread::current().id());
        assert_eq!(on_worker_thread(|| 6 * 7), 42);
        let on_cpu =
            on_worker_thread_if_cpu(&candle_core::Device::Cpu, rayon::current_thread_index);
        assert!(on_cpu.is_some(), "CPU work ran outside rayon's pool");
    }
}
