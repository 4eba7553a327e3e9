//! Sums of squares for the global gradient norm: in f64, in a fixed order, so the norm (and the
//! clipping it decides) is the same on every run.

use super::cpu::contiguous;
use candle_core::{CpuStorage, DType, Result, Tensor};

/// Σx² as a scalar f64 tensor on x's device (no transfer to the host): on CUDA from per-block f64
/// partial sums, elsewhere from candle ops.
pub fn sum_of_squares_on_device(t: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if t.device().is_cuda() && matches!(t.dtype(), DType::F32 | DType::BF16 | DType::F16) {
        return t
            .contiguous()?
            .apply_op1_no_bwd(&cuda_kernels::SumSquaresPartials)?
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

/// The CUDA side: launcher of kernels.cu's sum_squares_partials_*.
#[cfg(feature = "cuda")]
mod cuda_kernels {
    use crate::ops::cuda::{by_dtype, contiguous_range, cuda_err, MODULE, PTX, THREADS};
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::CudaStorage;
    use candle_core::{bail, CpuStorage, CustomOp1, DType, Layout, Result, Shape};

    /// Blocks of the sum-of-squares kernel at most: its output has one f64 per block.
    const SUM_BLOCKS: usize = 1024;

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
}
