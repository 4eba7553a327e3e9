//! Softmax cross-entropy of logits against integer targets, fused: with GPT-2's 50,304-token
//! vocabulary the logits are the largest tensor of a step; the composed version makes about eight
//! full-size temporaries forward and as many backward. The fused one reads the logits twice forward
//! (max, then log-sum-exp and the target) and writes the gradient in one pass backward, in parallel
//! over rows, deterministically. On CPU the model goes further and fuses the lm_head into it
//! ([`super::lm_head_loss`]); this kernel serves CUDA and callers with logits in hand.

use super::cpu::{by_float, contiguous};
use super::simd::{max_lanes, multiversioned, reduce_lanes, sum_lanes, FastExp, LANES};
use candle_core::{bail, CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

/// Mean cross-entropy of integer `targets` (N,) under `logits` (N, V).
struct CrossEntropy;

/// Its gradient with respect to the logits: (softmax − one-hot) · scale.
struct CrossEntropyGrad {
    scale: f64,
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
    let total = reduce_lanes(acc, |a, b| a + b);
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
    let sum_exp = exp_shifted_in_place(row, max);
    scale_minus_one_hot(row, sum_exp, target, scale);
}

/// A row of logits, in place, to e^(logit − max); returns their sum.
#[inline(always)]
fn exp_shifted_in_place<T: FastExp>(row: &mut [T], max: T) -> T {
    for x in row.iter_mut() {
        *x = (*x - max).fast_exp();
    }
    sum_lanes(row)
}

/// A row of e^(logit − max) with sum `sum_exp`, in place, to (softmax − one-hot(target)) · scale.
#[inline(always)]
fn scale_minus_one_hot<T: FastExp>(row: &mut [T], sum_exp: T, target: usize, scale: T) {
    scale_softmax_minus_one_hot(row, sum_exp, target, scale, scale);
}

/// A row of e^(logit − max) with sum `sum_exp`, in place, to
/// softmax · softmax_scale − one-hot(target) · scale.
#[inline(always)]
fn scale_softmax_minus_one_hot<T: FastExp>(
    row: &mut [T],
    sum_exp: T,
    target: usize,
    softmax_scale: T,
    scale: T,
) {
    let k = softmax_scale / sum_exp;
    for x in row.iter_mut() {
        *x = *x * k;
    }
    row[target] = row[target] - scale;
}

/// A row of logits' loss (log-sum-exp − the target's logit), and the row, in place, turned
/// into its gradient (softmax − one-hot(target)) · scale: each exponential computed once, where
/// [`max_and_log_sum_exp`] then [`softmax_minus_one_hot`] compute it twice. Both results are
/// bitwise theirs: the sums add the same values in the same lanes and order.
#[inline(always)]
pub(crate) fn loss_and_gradient_in_place<T: FastExp>(row: &mut [T], target: usize, scale: T) -> T {
    let max = max_lanes(row);
    let target_logit = row[target];
    let sum_exp = exp_shifted_in_place(row, max);
    scale_minus_one_hot(row, sum_exp, target, scale);
    max + sum_exp.ln() - target_logit
}

/// [`loss_and_gradient_in_place`] with PaLM's z-loss: the row's objective is its cross-entropy
/// plus `z_loss` · log²Z (Z the softmax's normaliser, log Z the row's log-sum-exp), whose gradient
/// is 2 · `z_loss` · log Z · softmax. The row turns into (softmax · (1 + 2 · z_loss · log Z) −
/// one-hot(target)) · scale; returns the cross-entropy and log Z.
#[inline(always)]
pub(crate) fn loss_and_z_gradient_in_place<T: FastExp>(
    row: &mut [T],
    target: usize,
    scale: T,
    z_loss: T,
) -> (T, T) {
    let max = max_lanes(row);
    let target_logit = row[target];
    let sum_exp = exp_shifted_in_place(row, max);
    let log_z = max + sum_exp.ln();
    let two = T::one() + T::one();
    let softmax_scale = scale * (T::one() + two * z_loss * log_z);
    scale_softmax_minus_one_hot(row, sum_exp, target, softmax_scale, scale);
    (log_z - target_logit, log_z)
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
        cuda_kernels::cross_entropy_fwd(s1, l1, s2, l2)
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
                logits.apply_op3_no_bwd(targets, &upstream, &cuda_kernels::CrossEntropyGrad)?;
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
        let out = by_float!("fused cross-entropy: logits must be f32 or f64";
            x = s1, l1, "logits" => backward(x, targets, v, self.scale));
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

/// Mean negative log-likelihood of `targets` (N,) under `logits` (N, V): the fused kernel on
/// CPU, candle ops elsewhere.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    if fused_cross_entropy_applies(logits) {
        return fused_cross_entropy(logits, targets);
    }
    cross_entropy_ops(logits, targets)
}

/// [`cross_entropy`] from plain candle ops (the reference the fused kernel is tested against).
pub fn cross_entropy_ops(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let max = logits.max_keepdim(D::Minus1)?.detach();
    let shifted = logits.broadcast_sub(&max)?;
    let log_z = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    let log_probs = shifted.broadcast_sub(&log_z)?;
    let picked = log_probs.gather(&targets.unsqueeze(1)?, 1)?;
    picked.mean_all()?.neg()
}

/// The CUDA side: launchers of kernels.cu's cross-entropy kernels.
#[cfg(feature = "cuda")]
mod cuda_kernels {
    use crate::ops::cuda::{by_dtype, contiguous_range, cuda_err, MODULE, PTX, THREADS};
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::CudaStorage;
    use candle_core::{bail, CpuStorage, DType, Layout, Result, Shape};

    /// The mean cross-entropy forward on CUDA (the CUDA half of [`super::CrossEntropy`]): per-row
    /// losses by one block per row, then their mean in row order; an f32 scalar for any logits dtype.
    pub(crate) fn cross_entropy_fwd(
        logits: &CudaStorage,
        ll: &Layout,
        targets: &CudaStorage,
        tl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (n, v) = ll.shape().dims2()?;
        let (ls, le) = contiguous_range(ll, "logits")?;
        let (ts, te) = contiguous_range(tl, "targets")?;
        if te - ts != n {
            bail!("fused cross-entropy: {n} rows but {} targets", te - ts);
        }
        let dev = logits.device.clone();
        let t = targets.as_cuda_slice::<u32>()?.slice(ts..te);
        // SAFETY: one loss per row, each written by its block.
        let mut losses = unsafe { dev.alloc::<f32>(n) }?;
        by_dtype!(logits.dtype(), |T, suffix| {
            let x = logits.as_cuda_slice::<T>()?.slice(ls..le);
            let func =
                dev.get_or_load_custom_func(&format!("cross_entropy_rows_{suffix}"), MODULE, PTX)?;
            let vi = v as i32;
            let mut b = func.builder();
            b.arg(&x).arg(&t).arg(&mut losses).arg(&vi);
            let cfg = LaunchConfig {
                grid_dim: (n as u32, 1, 1),
                block_dim: (THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: arguments match cross_entropy_rows_*; one block per row of v logits.
            unsafe { b.launch(cfg) }.map_err(cuda_err)?;
        });
        // SAFETY: mean_f32 writes its one output.
        let mut mean = unsafe { dev.alloc::<f32>(1) }?;
        let func = dev.get_or_load_custom_func("mean_f32", MODULE, PTX)?;
        let mut b = func.builder();
        b.arg(&losses).arg(&n).arg(&mut mean);
        // SAFETY: arguments match mean_f32 (a single thread reads n losses).
        unsafe { b.launch(LaunchConfig::for_num_elems(1)) }.map_err(cuda_err)?;
        Ok((CudaStorage::wrap_cuda_slice(mean, dev), Shape::from(())))
    }

    /// dlogits = (softmax − one-hot) · upstream / N from (logits, targets, upstream scalar), on the
    /// device: no transfer of the upstream gradient to the host.
    pub(crate) struct CrossEntropyGrad;

    impl candle_core::CustomOp3 for CrossEntropyGrad {
        fn name(&self) -> &'static str {
            "fused-cross-entropy-grad-cuda"
        }

        fn cpu_fwd(
            &self,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
        ) -> Result<(CpuStorage, Shape)> {
            bail!("this cross-entropy gradient runs on CUDA only")
        }

        fn cuda_fwd(
            &self,
            logits: &CudaStorage,
            ll: &Layout,
            targets: &CudaStorage,
            tl: &Layout,
            upstream: &CudaStorage,
            ul: &Layout,
        ) -> Result<(CudaStorage, Shape)> {
            let (n, v) = ll.shape().dims2()?;
            let (ls, le) = contiguous_range(ll, "logits")?;
            let (ts, te) = contiguous_range(tl, "targets")?;
            let (us, ue) = contiguous_range(ul, "upstream gradient")?;
            if te - ts != n || ue - us != 1 {
                bail!("fused cross-entropy gradient: shapes differ");
            }
            let dev = logits.device.clone();
            let t = targets.as_cuda_slice::<u32>()?.slice(ts..te);
            let up = upstream.as_cuda_slice::<f32>()?.slice(us..ue);
            let out = by_dtype!(logits.dtype(), |T, suffix| {
                let x = logits.as_cuda_slice::<T>()?.slice(ls..le);
                // SAFETY: every element is written.
                let mut grad = unsafe { dev.alloc::<T>(n * v) }?;
                let func = dev.get_or_load_custom_func(
                    &format!("cross_entropy_grad_{suffix}"),
                    MODULE,
                    PTX,
                )?;
                let vi = v as i32;
                let mut b = func.builder();
                b.arg(&x).arg(&t).arg(&up).arg(&mut grad).arg(&n).arg(&vi);
                let cfg = LaunchConfig {
                    grid_dim: (n as u32, 1, 1),
                    block_dim: (THREADS, 1, 1),
                    shared_mem_bytes: 0,
                };
                // SAFETY: arguments match cross_entropy_grad_*; one block per row.
                unsafe { b.launch(cfg) }.map_err(cuda_err)?;
                CudaStorage::wrap_cuda_slice(grad, dev.clone())
            });
            Ok((out, ll.shape().clone()))
        }
    }
}
