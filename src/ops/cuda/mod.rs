//! What the CUDA sides of the fused ops share: the PTX module compiled from `kernels.cu` (by
//! build.rs), launch shapes, and dispatch over the storage dtype. Each op's launchers live in its
//! own file (`ops/gelu.rs`, `ops/layer_norm.rs`, …) beside its CPU kernel; they take contiguous
//! f32, bf16 or f16 input and compute in f32 (f64 for the gradient norm's sums).

use candle_core::cuda_backend::cudarc::driver::LaunchConfig;
use candle_core::cuda_backend::CudaStorage;
use candle_core::{bail, Layout, Result};

pub(crate) const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/kernels.ptx"));
pub(crate) const MODULE: &str = "gpt_pretrain_kernels";
/// Threads per block; the row kernels use one warp (32 threads) per row.
pub(crate) const THREADS: u32 = 256;

pub(crate) fn cuda_err(e: impl std::error::Error + Send + Sync + 'static) -> candle_core::Error {
    candle_core::Error::Cuda(Box::new(e))
}

pub(crate) fn contiguous_range(l: &Layout, what: &str) -> Result<(usize, usize)> {
    match l.contiguous_offsets() {
        Some(range) => Ok(range),
        None => bail!("{what} must be contiguous"),
    }
}

/// One warp per row.
pub(crate) fn rows_config(rows: usize) -> LaunchConfig {
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
pub(crate) use by_dtype;

/// Threads for an elementwise grid-stride kernel over `n` elements.
pub(crate) fn elementwise_config(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n.div_ceil(THREADS as usize).clamp(1, 65_535) as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// The f32 elements of a contiguous CUDA tensor; `what` names it in the error.
pub(crate) fn f32_slice<'a>(
    s: &'a CudaStorage,
    l: &Layout,
    what: &str,
) -> Result<candle_core::cuda_backend::cudarc::driver::CudaView<'a, f32>> {
    let (start, end) = contiguous_range(l, what)?;
    Ok(s.as_cuda_slice::<f32>()?.slice(start..end))
}
