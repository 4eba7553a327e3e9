//! Fused kernels for the model, as candle custom ops with their own backward pass. Each has a
//! plain candle-op twin (used where the kernel does not apply) and is tested against it, values
//! and gradients.
//!
//! - Softmax cross-entropy: with GPT-2's 50,304-token vocabulary the logits are the largest tensor
//!   of a step; the composed version makes about eight full-size temporaries forward and as many
//!   backward. The fused one reads the logits twice forward (max, then log-sum-exp and the target)
//!   and writes the gradient in one pass backward, in parallel over rows, deterministically. On
//!   CPU the model goes further and fuses the lm_head into it ([`crate::ops::lm_head_loss`]);
//!   this kernel serves CUDA and callers with logits in hand.
//! - The CPU loops share a vectorizable f32 exp ([`FastExp`]), lane-wise reductions and run-time
//!   AVX-512/AVX2 dispatch (`multiversioned!`); the CPU attention is in [`crate::ops::attention`].

//! - Causal attention softmax (CUDA, src/ops/cuda/kernels.cu): scale, causal mask and softmax of the
//!   B·H·T·T scores in one read and one write, in f32 whatever the storage dtype; candle's ops take
//!   about 14 ms per GPT-2 layer for this at batch 8 × 1024 on an H100 (seven full passes, the
//!   broadcasting ones slow), more than all the layer's matmuls together.
//! - On CUDA the cross-entropy (one block per row), LayerNorm and GELU have kernels too
//!   (src/ops/cuda/kernels.cu, src/ops/cuda/kernels.cuda.rs).

pub mod attention;
#[cfg(feature = "cuda")]
mod cuda;
pub mod lm_head_loss;

use candle_core::{bail, CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};
use num_traits::Float;
use rayon::prelude::*;

/// Mean cross-entropy of integer `targets` (N,) under `logits` (N, V).
struct CrossEntropy;

/// Its gradient with respect to the logits: (softmax − one-hot) · scale.
struct CrossEntropyGrad {
    scale: f64,
}

/// The elements of a contiguous tensor's storage; `what` names the tensor in the error (every
/// fused kernel's wrapper makes its inputs contiguous, so this is a guard).
pub(crate) fn contiguous<'a, T>(s: &'a [T], l: &Layout, what: &str) -> Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&s[a..b]),
        None => bail!("fused kernel: its {what} must be contiguous"),
    }
}

fn targets_of<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [u32]> {
    match s {
        CpuStorage::U32(t) => contiguous(t, l, "targets"),
        _ => bail!("fused cross-entropy: targets must be u32"),
    }
}

/// Σ e^(x − shift) over a row, with [`LANES`] independent partial sums (vectorizable).
#[inline(always)]
fn sum_exp_lanes<T: FastExp>(row: &[T], shift: T) -> T {
    let mut acc = [T::zero(); LANES];
    let chunks = row.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for j in 0..LANES {
            acc[j] = acc[j] + (c[j] - shift).fast_exp();
        }
    }
    let total = acc.iter().fold(T::zero(), |s, &a| s + a);
    rest.iter().fold(total, |s, &x| s + (x - shift).fast_exp())
}

/// Rows per parallel task of the cross-entropy: about 64K logits, at least one row.
pub(crate) fn ce_rows_per_task(v: usize) -> usize {
    (1usize << 16).div_ceil(v.max(1)).max(1)
}

/// A row's max and log-sum-exp (the max subtracted before exponentiating).
#[inline(always)]
pub(crate) fn max_and_log_sum_exp<T: FastExp>(row: &[T]) -> (T, T) {
    let max = max_lanes(row);
    (max, max + sum_exp_lanes(row, max).ln())
}

/// A row of logits with maximum `max`, in place, to (softmax(row) − one-hot(target)) · scale:
/// the cross-entropy's gradient with respect to the row.
#[inline(always)]
pub(crate) fn softmax_minus_one_hot<T: FastExp>(row: &mut [T], max: T, target: usize, scale: T) {
    for x in row.iter_mut() {
        *x = (*x - max).fast_exp();
    }
    let k = scale / sum_lanes(row);
    for x in row.iter_mut() {
        *x = *x * k;
    }
    row[target] = row[target] - scale;
}

multiversioned! {
    /// Per row of `logits` (rows of length v): log-sum-exp of the row − the target's logit.
    fn ce_row_losses<T: FastExp>(logits: &[T], targets: &[u32], v: usize, losses: &mut [f64]) {
        for ((row, &t), loss) in logits.chunks(v).zip(targets).zip(losses.iter_mut()) {
            let (_, lse) = max_and_log_sum_exp(row);
            *loss = (lse - row[t as usize]).to_f64().unwrap_or(f64::NAN);
        }
    }
}

multiversioned! {
    /// Rows of logits (length v each), in place, to their gradients (softmax − one-hot) · scale.
    fn ce_row_grads<T: FastExp>(rows: &mut [T], targets: &[u32], v: usize, scale: T) {
        for (row, &t) in rows.chunks_mut(v).zip(targets) {
            let max = max_lanes(row);
            softmax_minus_one_hot(row, max, t as usize, scale);
        }
    }
}

fn forward<T: FastExp>(logits: &[T], targets: &[u32], v: usize) -> Result<f64> {
    if let Some(&bad) = targets.iter().find(|&&t| t as usize >= v) {
        bail!("cross-entropy target {bad} is outside the vocabulary of {v}");
    }
    let rows = ce_rows_per_task(v);
    let mut per_row = vec![0f64; targets.len()];
    per_row
        .par_chunks_mut(rows)
        .zip(logits.par_chunks(rows * v).zip(targets.par_chunks(rows)))
        .for_each(|(losses, (x, t))| ce_row_losses(x, t, v, losses));
    // Per-row losses in row order, summed sequentially: the same result on every run.
    Ok(per_row.iter().sum::<f64>() / per_row.len() as f64)
}

fn backward<T: FastExp>(logits: &[T], targets: &[u32], v: usize, scale: f64) -> Vec<T> {
    let scale = T::from(scale).expect("finite scale");
    let rows = ce_rows_per_task(v);
    // The gradient is computed in place over a copy of the logits (a copy costs what zeroing did).
    let mut grad = logits.to_vec();
    grad.par_chunks_mut(rows * v)
        .zip(targets.par_chunks(rows))
        .for_each(|(g, t)| ce_row_grads(g, t, v, scale));
    grad
}

impl CustomOp2 for CrossEntropy {
    fn name(&self) -> &'static str {
        "fused-cross-entropy"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, v) = l1.shape().dims2()?;
        let targets = targets_of(s2, l2)?;
        if targets.len() != n {
            bail!(
                "fused cross-entropy: {n} rows but {} targets",
                targets.len()
            );
        }
        let mean = match s1 {
            CpuStorage::F32(x) => forward(contiguous(x, l1, "logits")?, targets, v)?,
            CpuStorage::F64(x) => forward(contiguous(x, l1, "logits")?, targets, v)?,
            _ => bail!("fused cross-entropy: logits must be f32 or f64"),
        };
        let out = match s1 {
            CpuStorage::F32(_) => CpuStorage::F32(vec![mean as f32]),
            _ => CpuStorage::F64(vec![mean]),
        };
        Ok((out, Shape::from(())))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::ops::cuda::cross_entropy_fwd(s1, l1, s2, l2)
    }

    fn bwd(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        #[cfg(feature = "cuda")]
        if logits.device().is_cuda() {
            let upstream = grad_res.to_dtype(DType::F32)?.contiguous()?;
            let grad =
                logits.apply_op3_no_bwd(targets, &upstream, &crate::ops::cuda::CrossEntropyGrad)?;
            return Ok((Some(grad), None));
        }
        let n = logits.dim(0)?;
        let upstream = grad_res.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        let grad = logits.apply_op2_no_bwd(
            targets,
            &CrossEntropyGrad {
                scale: upstream / n as f64,
            },
        )?;
        Ok((Some(grad), None))
    }
}

impl CustomOp2 for CrossEntropyGrad {
    fn name(&self) -> &'static str {
        "fused-cross-entropy-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (_, v) = l1.shape().dims2()?;
        let targets = targets_of(s2, l2)?;
        let out = match s1 {
            CpuStorage::F32(x) => CpuStorage::F32(backward(
                contiguous(x, l1, "logits")?,
                targets,
                v,
                self.scale,
            )),
            CpuStorage::F64(x) => CpuStorage::F64(backward(
                contiguous(x, l1, "logits")?,
                targets,
                v,
                self.scale,
            )),
            _ => bail!("fused cross-entropy: logits must be f32 or f64"),
        };
        Ok((out, l1.shape().clone()))
    }
}

/// Mean cross-entropy with the fused kernel (CPU f32/f64; CUDA f32/bf16/f16 logits, f32 loss).
pub fn fused_cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let logits = logits.contiguous()?;
    let targets = targets.contiguous()?;
    logits.apply_op2(&targets, CrossEntropy)
}

/// Whether [`fused_cross_entropy`] serves these logits.
pub fn fused_cross_entropy_applies(logits: &Tensor) -> bool {
    let on_cpu = logits.device().is_cpu() && matches!(logits.dtype(), DType::F32 | DType::F64);
    let on_cuda = cfg!(feature = "cuda")
        && logits.device().is_cuda()
        && matches!(logits.dtype(), DType::F32 | DType::BF16 | DType::F16);
    (on_cpu || on_cuda) && logits.rank() == 2
}

/// softmax(scale · x) over the last dimension with a causal mask: for x of shape (…, Tq, Tk),
/// query i sees keys j ≤ i + Tk − Tq (the rest get probability 0).
struct CausalSoftmax {
    scale: f64,
}

/// Its backward from the output y: dx = scale · y ⊙ (dy − Σ dy ⊙ y) per row.
struct SoftmaxGrad {
    scale: f64,
}

/// (Tq, Tk) of a causal softmax input, checked.
fn causal_dims(l: &Layout) -> Result<(usize, usize)> {
    let dims = l.shape().dims();
    if dims.len() < 2 {
        bail!("causal softmax needs at least 2 dimensions, got {dims:?}");
    }
    let (tq, tk) = (dims[dims.len() - 2], dims[dims.len() - 1]);
    if tq > tk || tk == 0 {
        bail!("causal softmax needs Tq <= Tk, got {tq} and {tk}");
    }
    Ok((tq, tk))
}

fn causal_softmax_rows<T: Float + Send + Sync>(
    x: &[T],
    tq: usize,
    tk: usize,
    scale: f64,
) -> Vec<T> {
    let scale = T::from(scale).expect("finite scale");
    let mut y = vec![T::zero(); x.len()];
    y.par_chunks_mut(tk)
        .zip(x.par_chunks(tk))
        .enumerate()
        .for_each(|(row, (yr, xr))| {
            let visible = row % tq + (tk - tq) + 1;
            let (yr, xr) = (&mut yr[..visible], &xr[..visible]);
            let max = xr.iter().fold(T::neg_infinity(), |m, &v| m.max(v * scale));
            let mut sum = T::zero();
            for (y, &v) in yr.iter_mut().zip(xr) {
                *y = (v * scale - max).exp();
                sum = sum + *y;
            }
            for y in yr.iter_mut() {
                *y = *y / sum;
            }
        });
    y
}

fn softmax_grad_rows<T: Float + Send + Sync>(y: &[T], dy: &[T], n: usize, scale: f64) -> Vec<T> {
    let scale = T::from(scale).expect("finite scale");
    let mut dx = vec![T::zero(); y.len()];
    dx.par_chunks_mut(n)
        .zip(y.par_chunks(n).zip(dy.par_chunks(n)))
        .for_each(|(dxr, (yr, dyr))| {
            let dot = yr
                .iter()
                .zip(dyr)
                .fold(T::zero(), |acc, (&y, &g)| acc + y * g);
            for ((dx, &y), &g) in dxr.iter_mut().zip(yr).zip(dyr) {
                *dx = scale * y * (g - dot);
            }
        });
    dx
}

impl candle_core::CustomOp1 for CausalSoftmax {
    fn name(&self) -> &'static str {
        "fused-causal-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (tq, tk) = causal_dims(l)?;
        let out = match s {
            CpuStorage::F32(x) => CpuStorage::F32(causal_softmax_rows(
                contiguous(x, l, "input")?,
                tq,
                tk,
                self.scale,
            )),
            CpuStorage::F64(x) => CpuStorage::F64(causal_softmax_rows(
                contiguous(x, l, "input")?,
                tq,
                tk,
                self.scale,
            )),
            _ => bail!("fused causal softmax on CPU: input must be f32 or f64"),
        };
        Ok((out, l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (tq, tk) = causal_dims(l)?;
        crate::ops::cuda::causal_softmax_fwd(s, l, tq, tk, self.scale as f32)
    }

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let grad = grad_res.to_dtype(res.dtype())?.contiguous()?;
        Ok(Some(res.apply_op2_no_bwd(
            &grad,
            &SoftmaxGrad { scale: self.scale },
        )?))
    }
}

impl CustomOp2 for SoftmaxGrad {
    fn name(&self) -> &'static str {
        "fused-softmax-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let n = l1.shape().dims().last().copied().unwrap_or(1).max(1);
        let out = match (s1, s2) {
            (CpuStorage::F32(y), CpuStorage::F32(g)) => CpuStorage::F32(softmax_grad_rows(
                contiguous(y, l1, "softmax output")?,
                contiguous(g, l2, "softmax gradient")?,
                n,
                self.scale,
            )),
            (CpuStorage::F64(y), CpuStorage::F64(g)) => CpuStorage::F64(softmax_grad_rows(
                contiguous(y, l1, "softmax output")?,
                contiguous(g, l2, "softmax gradient")?,
                n,
                self.scale,
            )),
            _ => bail!("fused softmax gradient on CPU: both must be f32 or f64"),
        };
        Ok((out, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::ops::cuda::softmax_grad(s1, l1, s2, l2, self.scale as f32)
    }
}

/// softmax(scale · x) over the last dimension with a causal mask (for x of shape (…, Tq, Tk),
/// query i sees keys j ≤ i + Tk − Tq), fused, with its backward: one pass forward and one
/// backward instead of scale, mask add, max, subtract, exp, sum and divide and their backward.
/// CPU f32/f64 (arithmetic in the input's dtype), CUDA f32/bf16/f16 (arithmetic in f32); the
/// output has x's dtype.
pub fn fused_causal_softmax(x: &Tensor, scale: f64) -> Result<Tensor> {
    x.contiguous()?.apply_op1(CausalSoftmax { scale })
}

/// Whether [`fused_causal_softmax`] serves this tensor.
pub fn fused_causal_softmax_applies(x: &Tensor) -> bool {
    let on_cpu = x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64);
    let on_cuda = cfg!(feature = "cuda")
        && x.device().is_cuda()
        && matches!(x.dtype(), DType::F32 | DType::BF16 | DType::F16);
    (on_cpu || on_cuda) && x.rank() >= 2
}

/// Σx² as a scalar f64 tensor on x's device (no transfer to the host): on CUDA from per-block f64
/// partial sums, elsewhere from candle ops.
pub fn sum_of_squares_on_device(t: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if t.device().is_cuda() && matches!(t.dtype(), DType::F32 | DType::BF16 | DType::F16) {
        return t
            .contiguous()?
            .apply_op1_no_bwd(&crate::ops::cuda::SumSquaresPartials)?
            .sum_all();
    }
    t.to_dtype(DType::F64)?.sqr()?.sum_all()
}

/// Σx² of a tensor in f64, summed in element order (the same result on every run). On CPU for
/// contiguous f32/f64 it reads the storage directly instead of materialising x² and an f64 copy.
pub fn sum_of_squares(t: &Tensor) -> Result<f64> {
    if t.device().is_cpu() && t.is_contiguous() {
        let (storage, layout) = t.storage_and_layout();
        if let candle_core::Storage::Cpu(cpu) = &*storage {
            match cpu {
                CpuStorage::F32(v) => {
                    let v = contiguous(v, layout, "tensor")?;
                    return Ok(v.iter().map(|&x| (x as f64) * (x as f64)).sum());
                }
                CpuStorage::F64(v) => {
                    let v = contiguous(v, layout, "tensor")?;
                    return Ok(v.iter().map(|&x| x * x).sum());
                }
                _ => {}
            }
        }
    }
    t.to_dtype(DType::F64)?.sqr()?.sum_all()?.to_scalar::<f64>()
}

/// Element types with an exp that vectorizes: for f32 a polynomial (libm's `expf` is a call per
/// element, which no loop around it can vectorize; it was 4.5% of a 2-thread `tiny` step inside
/// attention alone), for f64 libm's.
pub trait FastExp: Float + Send + Sync + 'static {
    /// e^x for x ≤ 88; NaN stays NaN.
    fn fast_exp(self) -> Self;
}

impl FastExp for f64 {
    #[inline(always)]
    fn fast_exp(self) -> f64 {
        self.exp()
    }
}

impl FastExp for f32 {
    /// e^x as Cephes' `expf` computes it: x = n·ln 2 + r with |r| ≤ ln 2 / 2 (ln 2 split in two
    /// for an exact product), a degree-7 polynomial for e^r, and 2^n written into the exponent
    /// bits. Within 2 ulp of e^x for normal results; x below ln(f32::MIN_POSITIVE) gives
    /// f32::MIN_POSITIVE (1.2e-38) where libm gives subnormals and then 0.
    #[inline(always)]
    fn fast_exp(self) -> f32 {
        let x = self.clamp(-87.336_55, 88.0);
        // Round to nearest by adding and subtracting 1.5·2²³ (no call to floor, which the
        // baseline x86-64 instruction set lacks). The sum's low mantissa bits hold 2²² + n.
        const ROUND: f32 = 12_582_912.0;
        let shifted = x * std::f32::consts::LOG2_E + ROUND;
        let n = shifted - ROUND;
        let r = x - n * 0.693_359_4 - n * -2.121_944_4e-4;
        let mut p = 1.987_569_1e-4_f32;
        p = p * r + 1.398_199_9e-3;
        p = p * r + 8.333_452e-3;
        p = p * r + 4.166_579_6e-2;
        p = p * r + 1.666_666_5e-1;
        p = p * r + 0.5;
        let e_r = p * r * r + r + 1.0;
        // 2ⁿ from those bits: shifted left by 23, 2²² + n + 127 leaves n + 127 (in [1, 254] for
        // n in [-126, 127]) in the exponent field, with integer ops only (a float-to-int `as`
        // saturates, which does not vectorize). A NaN x makes e_r NaN whatever the power.
        e_r * f32::from_bits(shifted.to_bits().wrapping_add(127) << 23)
    }
}

/// Defines a function that runs its body compiled for AVX-512F, else AVX2 with FMA, else the
/// baseline, chosen at run time. The kernels' loops are plain Rust, which LLVM vectorizes for the
/// instructions enabled where it compiles them (a closure passed to such a wrapper is not
/// inlined into it, and so is not).
macro_rules! multiversioned {
    ($(#[$meta:meta])* $vis:vis fn $name:ident<$t:ident: $bound:path>($($arg:ident: $ty:ty),* $(,)?) $body:block) => {
        $(#[$meta])*
        $vis fn $name<$t: $bound>($($arg: $ty),*) {
            #[inline(always)]
            fn portable<$t: $bound>($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f")]
                unsafe fn avx512<$t: $bound>($($arg: $ty),*) {
                    portable($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2<$t: $bound>($($arg: $ty),*) {
                    portable($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU supports AVX-512F, checked just above.
                    return unsafe { avx512($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: the CPU supports AVX2 and FMA, checked just above.
                    return unsafe { avx2($($arg),*) };
                }
            }
            portable($($arg),*)
        }
    };
}
pub(crate) use multiversioned;

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

/// Lanes of the partial sums below: one AVX-512 register of f32.
const LANES: usize = 16;

/// Σ xs with [`LANES`] independent partial sums, which vectorize (one running sum cannot: its
/// order of additions is fixed). The result is the same on every run.
#[inline(always)]
pub(crate) fn sum_lanes<T: Float>(xs: &[T]) -> T {
    let mut acc = [T::zero(); LANES];
    let chunks = xs.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for j in 0..LANES {
            acc[j] = acc[j] + c[j];
        }
    }
    let total = acc.iter().fold(T::zero(), |s, &a| s + a);
    rest.iter().fold(total, |s, &r| s + r)
}

/// Σ xs·ys with [`LANES`] independent partial sums, as [`sum_lanes`].
#[inline(always)]
pub(crate) fn dot_lanes<T: Float>(xs: &[T], ys: &[T]) -> T {
    let n = xs.len().min(ys.len());
    let (xs, ys) = (&xs[..n], &ys[..n]);
    let mut acc = [T::zero(); LANES];
    let split = n - n % LANES;
    for (c, d) in xs[..split]
        .chunks_exact(LANES)
        .zip(ys[..split].chunks_exact(LANES))
    {
        for j in 0..LANES {
            acc[j] = acc[j] + c[j] * d[j];
        }
    }
    let total = acc.iter().fold(T::zero(), |s, &a| s + a);
    xs[split..]
        .iter()
        .zip(&ys[split..])
        .fold(total, |s, (&x, &y)| s + x * y)
}

/// max(xs) (−∞ when empty) with [`LANES`] independent partial maxima.
#[inline(always)]
pub(crate) fn max_lanes<T: Float>(xs: &[T]) -> T {
    let mut acc = [T::neg_infinity(); LANES];
    let chunks = xs.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for j in 0..LANES {
            acc[j] = acc[j].max(c[j]);
        }
    }
    let m = acc.iter().fold(T::neg_infinity(), |m, &a| m.max(a));
    rest.iter().fold(m, |m, &r| m.max(r))
}

/// √(2/π), GPT-2's tanh-GELU constant, computed as the composed version computes it.
fn gelu_c() -> f64 {
    (2.0 / std::f64::consts::PI).sqrt()
}
const GELU_A: f64 = 0.044715;

/// GPT-2's tanh-approximated GELU, fused: one pass forward, one pass backward (the composed
/// version makes about eight temporaries each way over the 4·C-wide MLP activations).
struct Gelu;

/// Its backward: grad_in = gelu'(x) · grad_out.
struct GeluGrad;

/// The element types of the CPU GELU kernel, with the tanh each uses.
trait GeluFloat: Float + Send + Sync {
    fn gelu_tanh_of(self) -> Self;
}

impl GeluFloat for f64 {
    #[inline(always)]
    fn gelu_tanh_of(self) -> f64 {
        self.tanh()
    }
}

impl GeluFloat for f32 {
    /// tanh as Eigen's `ptanh_float` computes it: a [13/6] rational approximation on [−7.9, 7.9]
    /// (|x| < 4e-4 returns x), within a few 1e-7 of libm's tanhf. Unlike libm's call, it
    /// vectorizes: libm's tanhf (through expm1f) was 24% of a `tiny` training step.
    #[inline(always)]
    fn gelu_tanh_of(self) -> f32 {
        const CLAMP: f32 = 7.905_311;
        let x = self.clamp(-CLAMP, CLAMP);
        let x2 = x * x;
        let mut p = x2 * -2.760_768_5e-16 + 2.000_188e-13;
        p = x2 * p + -8.604_672e-11;
        p = x2 * p + 5.122_297e-8;
        p = x2 * p + 1.485_722_4e-5;
        p = x2 * p + 6.372_619_3e-4;
        p = x2 * p + 4.893_524_6e-3;
        p *= x;
        let mut q = x2 * 1.198_258_4e-6 + 1.185_347_1e-4;
        q = x2 * q + 2.268_434_6e-3;
        q = x2 * q + 4.893_525e-3;
        if self.abs() < 4e-4 {
            self
        } else {
            p / q
        }
    }
}

#[inline(always)]
fn gelu_value<T: GeluFloat>(x: T) -> T {
    let (c, a, half) = (
        T::from(gelu_c()).unwrap(),
        T::from(GELU_A).unwrap(),
        T::from(0.5).unwrap(),
    );
    // The same operation order as the composed version: ((tanh(c·(a·x² + 1)·x) + 1)·½)·x.
    ((((x * x * a + T::one()) * x * c).gelu_tanh_of() + T::one()) * half) * x
}

#[inline(always)]
fn gelu_derivative<T: GeluFloat>(x: T) -> T {
    let (c, a, half) = (
        T::from(gelu_c()).unwrap(),
        T::from(GELU_A).unwrap(),
        T::from(0.5).unwrap(),
    );
    let three = T::from(3.0).unwrap();
    let t = (c * (x + a * x * x * x)).gelu_tanh_of();
    half * (T::one() + t) + half * x * (T::one() - t * t) * c * (T::one() + three * a * x * x)
}

/// out[i] = gelu(x[i]) (`grad` None) or gelu'(x[i])·grad[i], with the widest vector
/// instructions this CPU has (the loop is the same code in every version).
fn gelu_slices<T: GeluFloat>(x: &[T], grad: Option<&[T]>, out: &mut [T]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports AVX-512F, checked just above.
            return unsafe { gelu_slices_avx512(x, grad, out) };
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU supports AVX2 and FMA, checked just above.
            return unsafe { gelu_slices_avx2(x, grad, out) };
        }
    }
    gelu_slices_portable(x, grad, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn gelu_slices_avx512<T: GeluFloat>(x: &[T], grad: Option<&[T]>, out: &mut [T]) {
    gelu_slices_portable(x, grad, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn gelu_slices_avx2<T: GeluFloat>(x: &[T], grad: Option<&[T]>, out: &mut [T]) {
    gelu_slices_portable(x, grad, out)
}

#[inline(always)]
fn gelu_slices_portable<T: GeluFloat>(x: &[T], grad: Option<&[T]>, out: &mut [T]) {
    let n = out.len();
    let x = &x[..n];
    match grad {
        None => {
            for i in 0..n {
                out[i] = gelu_value(x[i]);
            }
        }
        Some(g) => {
            let g = &g[..n];
            for i in 0..n {
                out[i] = gelu_derivative(x[i]) * g[i];
            }
        }
    }
}

/// [`gelu_slices`] over chunks in parallel.
fn gelu_parallel<T: GeluFloat>(x: &[T], grad: Option<&[T]>) -> Vec<T> {
    const CHUNK: usize = 1 << 14;
    let mut out = vec![T::zero(); x.len()];
    match grad {
        None => out
            .par_chunks_mut(CHUNK)
            .zip(x.par_chunks(CHUNK))
            .for_each(|(o, x)| gelu_slices(x, None, o)),
        Some(g) => out
            .par_chunks_mut(CHUNK)
            .zip(x.par_chunks(CHUNK).zip(g.par_chunks(CHUNK)))
            .for_each(|(o, (x, g))| gelu_slices(x, Some(g), o)),
    }
    out
}

impl candle_core::CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "fused-gelu-tanh"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let out = match s {
            CpuStorage::F32(x) => CpuStorage::F32(gelu_parallel(contiguous(x, l, "input")?, None)),
            CpuStorage::F64(x) => CpuStorage::F64(gelu_parallel(contiguous(x, l, "input")?, None)),
            _ => bail!("fused gelu: input must be f32 or f64"),
        };
        Ok((out, l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::ops::cuda::gelu_fwd(s, l)
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(
            arg.apply_op2_no_bwd(&grad_res.contiguous()?, &GeluGrad)?,
        ))
    }
}

impl CustomOp2 for GeluGrad {
    fn name(&self) -> &'static str {
        "fused-gelu-tanh-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        fn both<T: GeluFloat>(x: &[T], g: &[T]) -> Vec<T> {
            gelu_parallel(x, Some(g))
        }
        let out = match (s1, s2) {
            (CpuStorage::F32(x), CpuStorage::F32(g)) => CpuStorage::F32(both(
                contiguous(x, l1, "input")?,
                contiguous(g, l2, "gradient")?,
            )),
            (CpuStorage::F64(x), CpuStorage::F64(g)) => CpuStorage::F64(both(
                contiguous(x, l1, "input")?,
                contiguous(g, l2, "gradient")?,
            )),
            _ => bail!("fused gelu: input and gradient must both be f32 or f64"),
        };
        Ok((out, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::ops::cuda::gelu_bwd(s1, l1, s2, l2)
    }
}

/// GPT-2's tanh-GELU with the fused kernel (CPU f32/f64; CUDA f32/bf16/f16).
pub fn fused_gelu_tanh(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Gelu)
}

/// Whether [`fused_gelu_tanh`] serves this tensor.
pub fn fused_gelu_applies(x: &Tensor) -> bool {
    (x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64))
        || (cfg!(feature = "cuda")
            && x.device().is_cuda()
            && matches!(x.dtype(), DType::F32 | DType::BF16 | DType::F16))
}

/// LayerNorm over the last dimension of x with weight w and bias b (zeros when the model has
/// none), as `torch.nn.LayerNorm`: y = (x − mean) / sqrt(var + eps) · w + b.
struct LayerNorm {
    eps: f64,
}

/// dx of [`LayerNorm`] from (x, w, dy): (g − mean(g) − x̂·mean(g·x̂)) / std with g = dy·w.
struct LayerNormGradInput {
    eps: f64,
}

/// Per-chunk column sums (Σ dy·x̂, Σ dy) of [`LayerNorm`] from (x, dy), shape (2, chunks, c):
/// summed over chunks afterwards, in order, so the result is the same on every run.
struct LayerNormGradParams {
    eps: f64,
}

/// Rows per chunk of the weight/bias gradient sums.
const LAYER_NORM_ROWS_PER_CHUNK: usize = 64;

/// Mean and standard deviation sqrt(var + eps) of a row, as the composed version computes them.
#[inline]
fn row_mean_std<T: Float>(row: &[T], eps: T) -> (T, T) {
    let c = T::from(row.len()).expect("row length");
    let mean = row.iter().fold(T::zero(), |a, &v| a + v) / c;
    let var = row
        .iter()
        .fold(T::zero(), |a, &v| a + (v - mean) * (v - mean))
        / c;
    (mean, (var + eps).sqrt())
}

fn layer_norm_rows<T: Float + Send + Sync>(x: &[T], w: &[T], b: &[T], eps: f64) -> Vec<T> {
    let (c, eps) = (w.len(), T::from(eps).expect("finite eps"));
    let mut y = vec![T::zero(); x.len()];
    y.par_chunks_mut(c)
        .zip(x.par_chunks(c))
        .for_each(|(yr, xr)| {
            let (mean, std) = row_mean_std(xr, eps);
            for j in 0..c {
                yr[j] = (xr[j] - mean) / std * w[j] + b[j];
            }
        });
    y
}

fn layer_norm_grad_input_rows<T: Float + Send + Sync>(
    x: &[T],
    w: &[T],
    dy: &[T],
    eps: f64,
) -> Vec<T> {
    let (c, eps) = (w.len(), T::from(eps).expect("finite eps"));
    let n = T::from(c).expect("width");
    let mut dx = vec![T::zero(); x.len()];
    dx.par_chunks_mut(c)
        .zip(x.par_chunks(c).zip(dy.par_chunks(c)))
        .for_each(|(dxr, (xr, dyr))| {
            let (mean, std) = row_mean_std(xr, eps);
            let (mut sum_g, mut sum_gx) = (T::zero(), T::zero());
            for j in 0..c {
                let g = dyr[j] * w[j];
                sum_g = sum_g + g;
                sum_gx = sum_gx + g * (xr[j] - mean) / std;
            }
            let (mean_g, mean_gx) = (sum_g / n, sum_gx / n);
            for j in 0..c {
                let xhat = (xr[j] - mean) / std;
                dxr[j] = (dyr[j] * w[j] - mean_g - xhat * mean_gx) / std;
            }
        });
    dx
}

fn layer_norm_grad_params_rows<T: Float + Send + Sync>(
    x: &[T],
    dy: &[T],
    c: usize,
    eps: f64,
) -> (Vec<T>, usize) {
    let eps = T::from(eps).expect("finite eps");
    let chunk = LAYER_NORM_ROWS_PER_CHUNK * c;
    let chunks = x.len().div_ceil(chunk).max(1);
    // [chunk][0: Σ dy·x̂, 1: Σ dy][column], rearranged below to (2, chunks, c).
    let mut partials = vec![T::zero(); 2 * chunks * c];
    partials
        .par_chunks_mut(2 * c)
        .zip(x.par_chunks(chunk).zip(dy.par_chunks(chunk)))
        .for_each(|(out, (xs, dys))| {
            let (dw, db) = out.split_at_mut(c);
            for (xr, dyr) in xs.chunks(c).zip(dys.chunks(c)) {
                let (mean, std) = row_mean_std(xr, eps);
                for j in 0..c {
                    dw[j] = dw[j] + dyr[j] * ((xr[j] - mean) / std);
                    db[j] = db[j] + dyr[j];
                }
            }
        });
    let mut out = vec![T::zero(); 2 * chunks * c];
    for k in 0..chunks {
        for which in 0..2 {
            let src = &partials[(2 * k + which) * c..(2 * k + which + 1) * c];
            out[(which * chunks + k) * c..(which * chunks + k + 1) * c].copy_from_slice(src);
        }
    }
    (out, chunks)
}

impl candle_core::CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        "fused-layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let out = match (s1, s2, s3) {
            (CpuStorage::F32(x), CpuStorage::F32(w), CpuStorage::F32(b)) => {
                CpuStorage::F32(layer_norm_rows(
                    contiguous(x, l1, "input")?,
                    contiguous(w, l2, "weight")?,
                    contiguous(b, l3, "bias")?,
                    self.eps,
                ))
            }
            (CpuStorage::F64(x), CpuStorage::F64(w), CpuStorage::F64(b)) => {
                CpuStorage::F64(layer_norm_rows(
                    contiguous(x, l1, "input")?,
                    contiguous(w, l2, "weight")?,
                    contiguous(b, l3, "bias")?,
                    self.eps,
                ))
            }
            _ => bail!("fused layer norm on CPU: input, weight and bias must all be f32 or f64"),
        };
        Ok((out, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::ops::cuda::layer_norm_fwd(s1, l1, s2, l2, s3, l3, self.eps as f32)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dy = grad_res.contiguous()?;
        let dx = x.apply_op3_no_bwd(w, &dy, &LayerNormGradInput { eps: self.eps })?;
        let partials = x.apply_op2_no_bwd(&dy, &LayerNormGradParams { eps: self.eps })?;
        let sums = partials.sum(1)?; // (2, c)
        Ok((Some(dx), Some(sums.get(0)?), Some(sums.get(1)?)))
    }
}

impl candle_core::CustomOp3 for LayerNormGradInput {
    fn name(&self) -> &'static str {
        "fused-layer-norm-grad-input"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let out = match (s1, s2, s3) {
            (CpuStorage::F32(x), CpuStorage::F32(w), CpuStorage::F32(g)) => {
                CpuStorage::F32(layer_norm_grad_input_rows(
                    contiguous(x, l1, "input")?,
                    contiguous(w, l2, "weight")?,
                    contiguous(g, l3, "gradient")?,
                    self.eps,
                ))
            }
            (CpuStorage::F64(x), CpuStorage::F64(w), CpuStorage::F64(g)) => {
                CpuStorage::F64(layer_norm_grad_input_rows(
                    contiguous(x, l1, "input")?,
                    contiguous(w, l2, "weight")?,
                    contiguous(g, l3, "gradient")?,
                    self.eps,
                ))
            }
            _ => bail!("fused layer norm gradient on CPU: all must be f32 or f64"),
        };
        Ok((out, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::ops::cuda::layer_norm_grad_input(s1, l1, s2, l2, s3, l3, self.eps as f32)
    }
}

impl CustomOp2 for LayerNormGradParams {
    fn name(&self) -> &'static str {
        "fused-layer-norm-grad-params"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let c = l1.shape().dims().last().copied().unwrap_or(1).max(1);
        let (out, chunks) = match (s1, s2) {
            (CpuStorage::F32(x), CpuStorage::F32(g)) => {
                let (v, k) = layer_norm_grad_params_rows(
                    contiguous(x, l1, "input")?,
                    contiguous(g, l2, "gradient")?,
                    c,
                    self.eps,
                );
                (CpuStorage::F32(v), k)
            }
            (CpuStorage::F64(x), CpuStorage::F64(g)) => {
                let (v, k) = layer_norm_grad_params_rows(
                    contiguous(x, l1, "input")?,
                    contiguous(g, l2, "gradient")?,
                    c,
                    self.eps,
                );
                (CpuStorage::F64(v), k)
            }
            _ => bail!("fused layer norm gradient on CPU: both must be f32 or f64"),
        };
        Ok((out, Shape::from((2, chunks, c))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::ops::cuda::layer_norm_grad_params(
            s1,
            l1,
            s2,
            l2,
            self.eps as f32,
            LAYER_NORM_ROWS_PER_CHUNK,
        )
    }
}

/// LayerNorm over the last dimension, fused: y = (x − mean)/sqrt(var + eps)·w + b in one pass
/// forward and two backward (input gradient; weight and bias gradients as per-chunk column sums,
/// deterministic), instead of about nine candle ops forward and twenty backward. CPU f32/f64,
/// CUDA f32. `bias` None is a LayerNorm without bias.
pub fn fused_layer_norm(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    eps: f64,
) -> Result<Tensor> {
    let zeros;
    let bias = match bias {
        Some(b) => b,
        None => {
            zeros = weight.zeros_like()?;
            &zeros
        }
    };
    x.contiguous()?.apply_op3(
        &weight.contiguous()?,
        &bias.contiguous()?,
        LayerNorm { eps },
    )
}

/// Whether [`fused_layer_norm`] serves this input and weight: CPU f32/f64, CUDA f32.
pub fn fused_layer_norm_applies(x: &Tensor, weight: &Tensor) -> bool {
    let same = x.dtype() == weight.dtype();
    let on_cpu = x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64);
    let on_cuda = cfg!(feature = "cuda") && x.device().is_cuda() && x.dtype() == DType::F32;
    same && (on_cpu || on_cuda)
}
