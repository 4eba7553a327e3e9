//! CUDA twins of the fused model kernels (src/kernels.cu): the causal attention softmax with its
//! backward, and per-block sums of squares for the gradient norm. Each takes contiguous f32, bf16
//! or f16 input and computes in f32 (f64 for the sums).

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::CudaStorage;
use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/kernels.ptx"));
const MODULE: &str = "gpt_pretrain_kernels";
/// Threads per block; the row kernels use one warp (32 threads) per row.
const THREADS: u32 = 256;
/// Blocks of the sum-of-squares kernel at most: its output has one f64 per block.
const SUM_BLOCKS: usize = 1024;

fn cuda_err(e: impl std::error::Error + Send + Sync + 'static) -> candle_core::Error {
    candle_core::Error::Cuda(Box::new(e))
}

fn contiguous_range(l: &Layout, what: &str) -> Result<(usize, usize)> {
    match l.contiguous_offsets() {
        Some(range) => Ok(range),
        None => bail!("{what} must be contiguous"),
    }
}

/// One warp per row.
fn rows_config(rows: usize) -> LaunchConfig {
    let rows_per_block = (THREADS / 32) as usize;
    LaunchConfig {
        grid_dim: (rows.div_ceil(rows_per_block) as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Dispatches `$body` with `$t` bound to the Rust type of `$dtype` and `$suffix` to the kernel
/// name suffix.
macro_rules! by_dtype {
    ($dtype:expr, |$t:ident, $suffix:ident| $body:expr) => {
        match $dtype {
            DType::F32 => {
                type $t = f32;
                let $suffix = "f32";
                $body
            }
            DType::BF16 => {
                type $t = half::bf16;
                let $suffix = "bf16";
                $body
            }
            DType::F16 => {
                type $t = half::f16;
                let $suffix = "f16";
                $body
            }
            other => bail!("no CUDA kernel for {other:?}"),
        }
    };
}

/// y = softmax(scale · x) over the last dimension with keys after each query masked: for x of
/// shape (…, Tq, Tk), query i sees keys j ≤ i + Tk − Tq.
pub(crate) struct CausalSoftmax {
    pub scale: f32,
}

impl CustomOp1 for CausalSoftmax {
    fn name(&self) -> &'static str {
        "fused-causal-softmax"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        bail!("the fused causal softmax runs on CUDA only")
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        let dims = l.shape().dims();
        if dims.len() < 2 {
            bail!("causal softmax needs at least 2 dimensions, got {dims:?}");
        }
        let (tq, tk) = (dims[dims.len() - 2], dims[dims.len() - 1]);
        if tq > tk || tk == 0 {
            bail!("causal softmax needs Tq <= Tk, got {tq} and {tk}");
        }
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
                .arg(&self.scale);
            // SAFETY: arguments match causal_softmax_fwd_* in kernels.cu; x and y hold rows·tk.
            unsafe { b.launch(rows_config(rows)) }.map_err(cuda_err)?;
            CudaStorage::wrap_cuda_slice(y, dev.clone())
        });
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let grad = grad_res.to_dtype(res.dtype())?.contiguous()?;
        Ok(Some(res.apply_op2_no_bwd(
            &grad,
            &SoftmaxGrad { scale: self.scale },
        )?))
    }
}

/// dx = scale · y ⊙ (dy − Σ dy ⊙ y) per row, from the softmax output y and its gradient dy.
struct SoftmaxGrad {
    scale: f32,
}

impl CustomOp2 for SoftmaxGrad {
    fn name(&self) -> &'static str {
        "fused-softmax-grad"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        bail!("the fused softmax gradient runs on CUDA only")
    }

    fn cuda_fwd(
        &self,
        y: &CudaStorage,
        yl: &Layout,
        dy: &CudaStorage,
        dyl: &Layout,
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
                .arg(&self.scale);
            // SAFETY: arguments match softmax_bwd_* in kernels.cu; all buffers hold rows·n.
            unsafe { b.launch(rows_config(rows)) }.map_err(cuda_err)?;
            CudaStorage::wrap_cuda_slice(dx, dev.clone())
        });
        Ok((out, yl.shape().clone()))
    }
}

/// Partial sums of x² in f64, one per block (at most [`SUM_BLOCKS`]).
pub(crate) struct SumSquaresPartials;

impl CustomOp1 for SumSquaresPartials {
    fn name(&self) -> &'static str {
        "sum-of-squares-partials"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        bail!("the sum-of-squares kernel runs on CUDA only")
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        let (start, end) = contiguous_range(l, "sum of squares input")?;
        let n = end - start;
        let blocks = n.div_ceil(THREADS as usize).clamp(1, SUM_BLOCKS);
        let dev = s.device.clone();
        let out = by_dtype!(s.dtype(), |T, suffix| {
            let x = s.as_cuda_slice::<T>()?.slice(start..end);
            // SAFETY: every block writes its element.
            let mut partials = unsafe { dev.alloc::<f64>(blocks) }?;
            let func = dev.get_or_load_custom_func(
                &format!("sum_squares_partials_{suffix}"),
                MODULE,
                PTX,
            )?;
            let mut b = func.builder();
            b.arg(&x).arg(&n).arg(&mut partials);
            let cfg = LaunchConfig {
                grid_dim: (blocks as u32, 1, 1),
                block_dim: (THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: arguments match sum_squares_partials_* (256 threads, one output per block).
            unsafe { b.launch(cfg) }.map_err(cuda_err)?;
            CudaStorage::wrap_cuda_slice(partials, dev.clone())
        });
        Ok((out, Shape::from(blocks)))
    }
}
