//! The causal attention softmax with its backward, fused (the composed path's: CUDA, and the CPU
//! when attention dropout is on). On CUDA (kernels.cu) it does scale, causal mask and softmax of
//! the B·H·T·T scores in one read and one write, in f32 whatever the storage dtype; candle's ops take
//! about 14 ms per GPT-2 layer for this at batch 8 × 1024 on an H100 (seven full passes, the
//! broadcasting ones slow), more than all the layer's matmuls together.

use super::cpu::by_float;
use candle_core::{bail, CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor, D};
use num_traits::Float;
use rayon::prelude::*;

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
        let out = by_float!("fused causal softmax on CPU: input must be f32 or f64";
            x = s, l, "input" => causal_softmax_rows(x, tq, tk, self.scale));
        Ok((out, l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (tq, tk) = causal_dims(l)?;
        cuda_kernels::causal_softmax_fwd(s, l, tq, tk, self.scale as f32)
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
        let out = by_float!("fused softmax gradient on CPU: both must be f32 or f64";
            y = s1, l1, "softmax output"; g = s2, l2, "softmax gradient"
            => softmax_grad_rows(y, g, n, self.scale));
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
        cuda_kernels::softmax_grad(s1, l1, s2, l2, self.scale as f32)
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

/// Softmax over the last dimension, composed of candle ops. The max is detached: subtracting it
/// only prevents overflow, and carries no gradient.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let exp = x.broadcast_sub(&max)?.exp()?;
    exp.broadcast_div(&exp.sum_keepdim(D::Minus1)?)
}

/// Attention probabilities softmax(scale · scores + mask) for scores (…, T, T): the fused causal
/// kernel where it applies (it masks by itself), else composed, the mask added and the softmax
/// taken in the mask's dtype (f32 under bf16 autocast, as flash attention keeps its softmax
/// statistics in f32) and the probabilities returned in the scores' dtype.
pub fn causal_softmax(scores: &Tensor, scale: f64, mask: &Tensor) -> Result<Tensor> {
    if fused_causal_softmax_applies(scores) {
        return fused_causal_softmax(scores, scale);
    }
    let masked = (scores * scale)?
        .to_dtype(mask.dtype())?
        .broadcast_add(mask)?;
    softmax_last_dim(&masked)?.to_dtype(scores.dtype())
}

/// The CUDA side: launchers of kernels.cu's causal_softmax_fwd_* and softmax_bwd_*.
#[cfg(feature = "cuda")]
mod cuda_kernels {
    use crate::ops::cuda::{by_dtype, contiguous_range, cuda_err, rows_config, MODULE, PTX};
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
    use candle_core::cuda_backend::CudaStorage;
    use candle_core::{bail, DType, Layout, Result, Shape};

    /// The causal softmax forward on CUDA (the CUDA half of [`super::CausalSoftmax`]): for x of
    /// shape (…, Tq, Tk) (Tq ≤ Tk, checked by the caller), query i sees keys j ≤ i + Tk − Tq.
    pub(crate) fn causal_softmax_fwd(
        s: &CudaStorage,
        l: &Layout,
        tq: usize,
        tk: usize,
        scale: f32,
    ) -> Result<(CudaStorage, Shape)> {
        let (start, end) = contiguous_range(l, "causal softmax input")?;
        let rows = (end - start) / tk;
        let dev = s.device.clone();
        let out = by_dtype!(s.dtype(), |T, suffix| {
            let x = s.as_cuda_slice::<T>()?.slice(start..end);
            // SAFETY: the kernel writes every element.
            let mut y = unsafe { dev.alloc::<T>(end - start) }?;
            let func =
                dev.get_or_load_custom_func(&format!("causal_softmax_fwd_{suffix}"), MODULE, PTX)?;
            let (tq, tk) = (tq as i32, tk as i32);
            let mut b = func.builder();
            b.arg(&x)
                .arg(&mut y)
                .arg(&rows)
                .arg(&tq)
                .arg(&tk)
                .arg(&scale);
            // SAFETY: arguments match causal_softmax_fwd_* in kernels.cu; x and y hold rows·tk.
            unsafe { b.launch(rows_config(rows)) }.map_err(cuda_err)?;
            CudaStorage::wrap_cuda_slice(y, dev.clone())
        });
        Ok((out, l.shape().clone()))
    }

    /// The softmax backward on CUDA (the CUDA half of [`super::SoftmaxGrad`]):
    /// dx = scale · y ⊙ (dy − Σ dy ⊙ y) per row.
    pub(crate) fn softmax_grad(
        y: &CudaStorage,
        yl: &Layout,
        dy: &CudaStorage,
        dyl: &Layout,
        scale: f32,
    ) -> Result<(CudaStorage, Shape)> {
        let n = yl.shape().dims().last().copied().unwrap_or(1).max(1);
        let (ys, ye) = contiguous_range(yl, "softmax output")?;
        let (gs, ge) = contiguous_range(dyl, "softmax gradient")?;
        if ye - ys != ge - gs || y.dtype() != dy.dtype() {
            bail!("softmax gradient: output and gradient differ in size or dtype");
        }
        let rows = (ye - ys) / n;
        let dev = y.device.clone();
        let out = by_dtype!(y.dtype(), |T, suffix| {
            let yv = y.as_cuda_slice::<T>()?.slice(ys..ye);
            let dyv = dy.as_cuda_slice::<T>()?.slice(gs..ge);
            // SAFETY: the kernel writes every element.
            let mut dx = unsafe { dev.alloc::<T>(ye - ys) }?;
            let func =
                dev.get_or_load_custom_func(&format!("softmax_bwd_{suffix}"), MODULE, PTX)?;
            let n = n as i32;
            let mut b = func.builder();
            b.arg(&yv)
                .arg(&dyv)
                .arg(&mut dx)
                .arg(&rows)
                .arg(&n)
                .arg(&scale);
            // SAFETY: arguments match softmax_bwd_* in kernels.cu; all buffers hold rows·n.
            unsafe { b.launch(rows_config(rows)) }.map_err(cuda_err)?;
            CudaStorage::wrap_cuda_slice(dx, dev.clone())
        });
        Ok((out, yl.shape().clone()))
    }
}
