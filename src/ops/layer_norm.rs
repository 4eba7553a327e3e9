//! LayerNorm over the last dimension with its backward, fused (CPU f32/f64, CUDA f32).

use super::cpu::{by_float, contiguous};
use super::simd::written_vec;
use super::simd::{
    dot_lanes, multiversioned, reduce_lanes, rounded_by_chunks, sum_lanes, sum_zip_lanes, LANES,
};
use candle_core::{bail, CpuStorage, DType, Layout, Result, Shape, Tensor, D};
use num_traits::Float;
use rayon::prelude::*;
use std::mem::MaybeUninit;

/// LayerNorm over the last dimension of x with weight w and bias b (zeros when the model has
/// none), as `torch.nn.LayerNorm`: y = (x − mean) / sqrt(var + eps) · w + b.
struct LayerNorm {
    eps: f64,
    /// Store the output in bf16, rounded (CPU, f32): see [`fused_layer_norm_rounded`].
    rounded: bool,
}

/// The backward of [`LayerNorm`] on CPU, from (x, w, dy) in one pass over them: dx =
/// (g − mean(g) − x̂·mean(g·x̂)) / std with g = dy·w, and per-chunk column sums (Σ dy·x̂, Σ dy),
/// summed over chunks afterwards, in order, so the result is the same on every run. One flat
/// output: dx (rows·c) then the sums (2, chunks, c).
struct LayerNormGrad {
    eps: f64,
}

/// dx of [`LayerNorm`] on CUDA, as [`LayerNormGrad`].
#[cfg(feature = "cuda")]
struct LayerNormGradInput {
    eps: f64,
}

/// The per-chunk column sums of [`LayerNorm`] on CUDA, as [`LayerNormGrad`], shape (2, chunks, c).
#[cfg(feature = "cuda")]
struct LayerNormGradParams {
    eps: f64,
}

/// Rows per chunk of the weight/bias gradient sums.
const LAYER_NORM_ROWS_PER_CHUNK: usize = 64;

/// Rows per parallel task of the forward and the input gradient: one row of a narrow model
/// (C = 128) is too little work to be worth a task of its own.
const LAYER_NORM_ROWS_PER_TASK: usize = 16;

/// Mean and 1/sqrt(var + eps) of a row (the variance of the centred values, as the composed
/// version computes it).
#[inline(always)]
fn row_mean_rstd<T: Float>(row: &[T], eps: T) -> (T, T) {
    let c = T::from(row.len()).expect("row length");
    let mean = sum_lanes(row) / c;
    let var = sum_zip_lanes(row, row, |x, _| (x - mean) * (x - mean)) / c;
    (mean, T::one() / (var + eps).sqrt())
}

multiversioned! {
    /// y = (x − mean)·rstd·w + b for whole rows of x and y.
    fn layer_norm_row_group<T: Float>(x: &[T], w: &[T], b: &[T], y: &mut [MaybeUninit<T>], eps: T) {
        let c = w.len();
        for (yr, xr) in y.chunks_exact_mut(c).zip(x.chunks_exact(c)) {
            let (mean, rstd) = row_mean_rstd(xr, eps);
            for ((y, &x), (&w, &b)) in yr.iter_mut().zip(xr).zip(w.iter().zip(b)) {
                y.write((x - mean) * rstd * w + b);
            }
        }
    }
}

multiversioned! {
    /// The backward for a chunk of whole rows: their dx rows, and their column sums Σ dy·x̂ into
    /// `dw` and Σ dy into `db`, row by row in order. dx = (g − mean(g) − x̂·mean(g·x̂))·rstd with
    /// g = dy·w.
    fn layer_norm_grad_rows<T: Float>(
        x: &[T],
        w: &[T],
        dy: &[T],
        dx: &mut [MaybeUninit<T>],
        dw: &mut [T],
        db: &mut [T],
        eps: T,
    ) {
        let c = w.len();
        let n = T::from(c).expect("width");
        for ((dxr, xr), dyr) in dx.chunks_exact_mut(c).zip(x.chunks_exact(c)).zip(dy.chunks_exact(c)) {
            let (mean, rstd) = row_mean_rstd(xr, eps);
            let mean_g = dot_lanes(dyr, w) / n;
            // Σ g·x̂ = rstd · Σ g·(x − mean); w is the third factor, taken from the first sum.
            let mut acc = [T::zero(); LANES];
            let split = c - c % LANES;
            for ((d, x), w) in dyr[..split]
                .chunks_exact(LANES)
                .zip(xr[..split].chunks_exact(LANES))
                .zip(w[..split].chunks_exact(LANES))
            {
                for j in 0..LANES {
                    acc[j] = acc[j] + d[j] * w[j] * (x[j] - mean);
                }
            }
            let sum_gx = (split..c).fold(reduce_lanes(acc, |a, b| a + b), |s, j| {
                s + dyr[j] * w[j] * (xr[j] - mean)
            });
            let mean_gx = sum_gx * rstd / n;
            for (((dx, &x), &dy), &w) in dxr.iter_mut().zip(xr).zip(dyr).zip(w) {
                let xhat = (x - mean) * rstd;
                dx.write((dy * w - mean_g - xhat * mean_gx) * rstd);
            }
            for (((dw, db), &x), &dy) in dw.iter_mut().zip(db.iter_mut()).zip(xr).zip(dyr) {
                *dw = *dw + dy * ((x - mean) * rstd);
                *db = *db + dy;
            }
        }
    }
}

fn layer_norm_rows<T: Float + Send + Sync>(x: &[T], w: &[T], b: &[T], eps: f64) -> Vec<T> {
    let (c, eps) = (w.len(), T::from(eps).expect("finite eps"));
    let rows = LAYER_NORM_ROWS_PER_TASK * c;
    // SAFETY: the groups cover every row, and each group writes all of its rows.
    unsafe {
        written_vec(x.len(), |y| {
            y.par_chunks_mut(rows)
                .zip(x.par_chunks(rows))
                .for_each(|(y, x)| layer_norm_row_group(x, w, b, y, eps))
        })
    }
}

/// Chunks of rows of the weight and bias gradients' sums, for n values of rows c wide.
fn grad_chunks(n: usize, c: usize) -> usize {
    n.div_ceil(LAYER_NORM_ROWS_PER_CHUNK * c.max(1)).max(1)
}

/// [`LayerNormGrad`] of rows of width c: dx, then the per-chunk sums (2, chunks, c), in one
/// buffer.
fn layer_norm_grad<T: Float + Send + Sync>(x: &[T], w: &[T], dy: &[T], eps: f64) -> Vec<T> {
    let (c, eps) = (w.len(), T::from(eps).expect("finite eps"));
    let chunk = LAYER_NORM_ROWS_PER_CHUNK * c;
    let chunks = grad_chunks(x.len(), c);
    let mut out = Vec::with_capacity(x.len() + 2 * chunks * c);
    let (dx, sums) = out.spare_capacity_mut()[..x.len() + 2 * chunks * c].split_at_mut(x.len());
    let (dw, db) = sums.split_at_mut(chunks * c);
    // Zeros to add each chunk's rows to.
    for s in dw.iter_mut().chain(db.iter_mut()) {
        s.write(T::zero());
    }
    // SAFETY: written just above; MaybeUninit<T> has T's layout.
    let init = |s: &mut [MaybeUninit<T>]| unsafe { &mut *(s as *mut [MaybeUninit<T>] as *mut [T]) };
    let (dw, db) = (init(dw), init(db));
    dx.par_chunks_mut(chunk)
        .zip(x.par_chunks(chunk).zip(dy.par_chunks(chunk)))
        .zip(dw.par_chunks_mut(c).zip(db.par_chunks_mut(c)))
        .for_each(|((dx, (x, dy)), (dw, db))| layer_norm_grad_rows(x, w, dy, dx, dw, db, eps));
    // SAFETY: the chunks cover every row of dx, each writing all of its rows; the sums were
    // written above.
    unsafe { out.set_len(x.len() + 2 * chunks * c) };
    out
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
            (CpuStorage::F32(x), CpuStorage::F32(w), CpuStorage::F32(b)) if self.rounded => {
                let (x, w, b) = (
                    contiguous(x, l1, "input")?,
                    contiguous(w, l2, "weight")?,
                    contiguous(b, l3, "bias")?,
                );
                let eps = self.eps as f32;
                // SAFETY: whole groups of rows, each of which layer_norm_row_group writes.
                CpuStorage::BF16(unsafe {
                    rounded_by_chunks(x.len(), LAYER_NORM_ROWS_PER_TASK * w.len(), |start, y| {
                        layer_norm_row_group(&x[start..start + y.len()], w, b, y, eps)
                    })
                })
            }
            _ if self.rounded => bail!("fused layer norm: a rounded output needs f32 on CPU"),
            _ => {
                by_float!("fused layer norm on CPU: input, weight and bias must all be f32 or f64";
                x = s1, l1, "input"; w = s2, l2, "weight"; b = s3, l3, "bias"
                => layer_norm_rows(x, w, b, self.eps))
            }
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
        if self.rounded {
            bail!("fused layer norm: a rounded output needs f32 on CPU");
        }
        cuda_kernels::layer_norm_fwd(s1, l1, s2, l2, s3, l3, self.eps as f32)
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
        let (dx, partials) = if x.device().is_cpu() {
            let (n, c) = (x.elem_count(), w.elem_count());
            let out = x.apply_op3_no_bwd(w, &dy, &LayerNormGrad { eps: self.eps })?;
            let chunks = grad_chunks(n, c);
            (
                out.narrow(0, 0, n)?.reshape(x.shape())?,
                out.narrow(0, n, 2 * chunks * c)?.reshape((2, chunks, c))?,
            )
        } else {
            self.cuda_grads(x, w, &dy)?
        };
        let sums = partials.sum(1)?; // (2, c)
        Ok((Some(dx), Some(sums.get(0)?), Some(sums.get(1)?)))
    }
}

impl candle_core::CustomOp3 for LayerNormGrad {
    fn name(&self) -> &'static str {
        "fused-layer-norm-grad"
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
        let out = by_float!("fused layer norm gradient on CPU: all must be f32 or f64";
            x = s1, l1, "input"; w = s2, l2, "weight"; g = s3, l3, "gradient"
            => layer_norm_grad(x, w, g, self.eps));
        let (n, c) = (l1.shape().elem_count(), l2.shape().elem_count());
        Ok((out, Shape::from(n + 2 * grad_chunks(n, c) * c)))
    }
}

impl LayerNorm {
    /// (dx, the per-chunk sums) on CUDA, by [`LayerNormGradInput`] and [`LayerNormGradParams`].
    #[cfg(feature = "cuda")]
    fn cuda_grads(&self, x: &Tensor, w: &Tensor, dy: &Tensor) -> Result<(Tensor, Tensor)> {
        let dx = x.apply_op3_no_bwd(w, dy, &LayerNormGradInput { eps: self.eps })?;
        let partials = x.apply_op2_no_bwd(dy, &LayerNormGradParams { eps: self.eps })?;
        Ok((dx, partials))
    }

    #[cfg(not(feature = "cuda"))]
    fn cuda_grads(&self, x: &Tensor, _: &Tensor, _: &Tensor) -> Result<(Tensor, Tensor)> {
        bail!(
            "fused layer norm backward on {:?}: CPU or CUDA only",
            x.device()
        )
    }
}

#[cfg(feature = "cuda")]
impl candle_core::CustomOp3 for LayerNormGradInput {
    fn name(&self) -> &'static str {
        "fused-layer-norm-grad-input"
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
        bail!("fused layer norm: the CPU backward is one op (LayerNormGrad)")
    }

    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda_kernels::layer_norm_grad_input(s1, l1, s2, l2, s3, l3, self.eps as f32)
    }
}

#[cfg(feature = "cuda")]
impl candle_core::CustomOp2 for LayerNormGradParams {
    fn name(&self) -> &'static str {
        "fused-layer-norm-grad-params"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        bail!("fused layer norm: the CPU backward is one op (LayerNormGrad)")
    }

    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda_kernels::layer_norm_grad_params(
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
    layer_norm_op(
        x,
        weight,
        bias,
        LayerNorm {
            eps,
            rounded: false,
        },
    )
}

/// [`fused_layer_norm`] of CPU f32 tensors, for an output that only a bf16 matmul reads
/// ([`crate::ops::linear::fused_linear_takes_bf16`]): stored in bf16, each value rounded as the
/// matmul would round the f32 output, so the matmul's result is the same. The backward pass is
/// the same as `fused_layer_norm`'s, in f32 (it reads x, not the output).
pub fn fused_layer_norm_rounded(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    eps: f64,
) -> Result<Tensor> {
    layer_norm_op(x, weight, bias, LayerNorm { eps, rounded: true })
}

fn layer_norm_op(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    op: LayerNorm,
) -> Result<Tensor> {
    let zeros;
    let bias = match bias {
        Some(b) => b,
        None => {
            zeros = weight.zeros_like()?;
            &zeros
        }
    };
    x.contiguous()?
        .apply_op3(&weight.contiguous()?, &bias.contiguous()?, op)
}

/// Whether [`fused_layer_norm`] serves this input and weight: CPU f32/f64, CUDA f32.
pub fn fused_layer_norm_applies(x: &Tensor, weight: &Tensor) -> bool {
    let same = x.dtype() == weight.dtype();
    let on_cpu = x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64);
    let on_cuda = cfg!(feature = "cuda") && x.device().is_cuda() && x.dtype() == DType::F32;
    same && (on_cpu || on_cuda)
}

/// LayerNorm over the last dimension, `torch.nn.LayerNorm`'s formula: the fused kernel where it
/// applies ([`fused_layer_norm_applies`]), else [`layer_norm_ops`].
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, eps: f64) -> Result<Tensor> {
    if fused_layer_norm_applies(x, weight) {
        return fused_layer_norm(x, weight, bias, eps);
    }
    layer_norm_ops(x, weight, bias, eps)
}

/// [`layer_norm`] composed of candle ops, in any dtype and on any device.
pub fn layer_norm_ops(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    eps: f64,
) -> Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let centered = x.broadcast_sub(&mean)?;
    let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = centered.broadcast_div(&(var + eps)?.sqrt()?)?;
    let y = normed.broadcast_mul(weight)?;
    match bias {
        Some(b) => y.broadcast_add(b),
        None => Ok(y),
    }
}

/// The CUDA side: launchers of kernels.cu's layernorm_* kernels (f32).
#[cfg(feature = "cuda")]
mod cuda_kernels {
    use crate::ops::cuda::{
        contiguous_range, cuda_err, f32_slice, rows_config, MODULE, PTX, THREADS,
    };
    use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::CudaStorage;
    use candle_core::{bail, Layout, Result, Shape};

    /// Rows of a LayerNorm input: (rows, width) from its layout, checked contiguous.
    fn rows_of(l: &Layout) -> Result<(usize, usize)> {
        let (start, end) = contiguous_range(l, "layer norm input")?;
        let c = l.shape().dims().last().copied().unwrap_or(0);
        if c == 0 {
            bail!("layer norm over an empty dimension");
        }
        Ok(((end - start) / c, c))
    }

    /// LayerNorm forward on CUDA for f32 (the CUDA half of [`super::LayerNorm`]).
    pub(crate) fn layer_norm_fwd(
        x: &CudaStorage,
        xl: &Layout,
        w: &CudaStorage,
        wl: &Layout,
        b: &CudaStorage,
        bl: &Layout,
        eps: f32,
    ) -> Result<(CudaStorage, Shape)> {
        let (rows, c) = rows_of(xl)?;
        let (xv, wv, bv) = (
            f32_slice(x, xl, "layer norm input")?,
            f32_slice(w, wl, "layer norm weight")?,
            f32_slice(b, bl, "layer norm bias")?,
        );
        if wv.len() != c || bv.len() != c {
            bail!("layer norm: weight and bias must have {c} elements");
        }
        let dev = x.device.clone();
        // SAFETY: the kernel writes every element.
        let mut y = unsafe { dev.alloc::<f32>(rows * c) }?;
        let func = dev.get_or_load_custom_func("layernorm_fwd_f32", MODULE, PTX)?;
        let ci = c as i32;
        let mut launch = func.builder();
        launch
            .arg(&xv)
            .arg(&wv)
            .arg(&bv)
            .arg(&mut y)
            .arg(&rows)
            .arg(&ci)
            .arg(&eps);
        // SAFETY: arguments match layernorm_fwd_f32; x and y hold rows·c, w and b hold c.
        unsafe { launch.launch(rows_config(rows)) }.map_err(cuda_err)?;
        Ok((CudaStorage::wrap_cuda_slice(y, dev), xl.shape().clone()))
    }

    /// LayerNorm's input gradient on CUDA (the CUDA half of [`super::LayerNormGradInput`]).
    pub(crate) fn layer_norm_grad_input(
        x: &CudaStorage,
        xl: &Layout,
        w: &CudaStorage,
        wl: &Layout,
        dy: &CudaStorage,
        dyl: &Layout,
        eps: f32,
    ) -> Result<(CudaStorage, Shape)> {
        let (rows, c) = rows_of(xl)?;
        let xv = f32_slice(x, xl, "layer norm input")?;
        let wv = f32_slice(w, wl, "layer norm weight")?;
        let dyv = f32_slice(dy, dyl, "layer norm gradient")?;
        if dyv.len() != rows * c || wv.len() != c {
            bail!("layer norm gradient: shapes differ");
        }
        let dev = x.device.clone();
        // SAFETY: the kernel writes every element.
        let mut dx = unsafe { dev.alloc::<f32>(rows * c) }?;
        let func = dev.get_or_load_custom_func("layernorm_bwd_dx_f32", MODULE, PTX)?;
        let ci = c as i32;
        let mut launch = func.builder();
        launch
            .arg(&xv)
            .arg(&wv)
            .arg(&dyv)
            .arg(&mut dx)
            .arg(&rows)
            .arg(&ci)
            .arg(&eps);
        // SAFETY: arguments match layernorm_bwd_dx_f32.
        unsafe { launch.launch(rows_config(rows)) }.map_err(cuda_err)?;
        Ok((CudaStorage::wrap_cuda_slice(dx, dev), xl.shape().clone()))
    }

    /// LayerNorm's per-chunk weight and bias gradient sums on CUDA, shape (2, chunks, c) (the CUDA
    /// half of [`super::LayerNormGradParams`]).
    pub(crate) fn layer_norm_grad_params(
        x: &CudaStorage,
        xl: &Layout,
        dy: &CudaStorage,
        dyl: &Layout,
        eps: f32,
        rows_per_chunk: usize,
    ) -> Result<(CudaStorage, Shape)> {
        let (rows, c) = rows_of(xl)?;
        let xv = f32_slice(x, xl, "layer norm input")?;
        let dyv = f32_slice(dy, dyl, "layer norm gradient")?;
        if dyv.len() != rows * c {
            bail!("layer norm gradient: shapes differ");
        }
        let dev = x.device.clone();
        let ci = c as i32;
        // SAFETY: layernorm_stats_f32 writes 2 floats for every row.
        let mut stats = unsafe { dev.alloc::<f32>(2 * rows) }?;
        let func = dev.get_or_load_custom_func("layernorm_stats_f32", MODULE, PTX)?;
        let mut launch = func.builder();
        launch
            .arg(&xv)
            .arg(&mut stats)
            .arg(&rows)
            .arg(&ci)
            .arg(&eps);
        // SAFETY: arguments match layernorm_stats_f32.
        unsafe { launch.launch(rows_config(rows)) }.map_err(cuda_err)?;

        let chunks = rows.div_ceil(rows_per_chunk).max(1);
        // SAFETY: every (chunk, column) pair is written, for both sums.
        let mut partials = unsafe { dev.alloc::<f32>(2 * chunks * c) }?;
        let func = dev.get_or_load_custom_func("layernorm_bwd_params_f32", MODULE, PTX)?;
        let rows_per_chunk = rows_per_chunk as i32;
        let mut launch = func.builder();
        launch
            .arg(&xv)
            .arg(&dyv)
            .arg(&stats)
            .arg(&mut partials)
            .arg(&rows)
            .arg(&ci)
            .arg(&rows_per_chunk);
        let cfg = LaunchConfig {
            grid_dim: (c.div_ceil(THREADS as usize) as u32, chunks as u32, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: arguments match layernorm_bwd_params_f32; the grid covers c × chunks.
        unsafe { launch.launch(cfg) }.map_err(cuda_err)?;
        Ok((
            CudaStorage::wrap_cuda_slice(partials, dev),
            Shape::from((2, chunks, c)),
        ))
    }
}
