//! CUDA twins of the fused model kernels (src/ops/cuda/kernels.cu): the causal attention softmax with its
//! backward, and per-block sums of squares for the gradient norm. Each takes contiguous f32, bf16
//! or f16 input and computes in f32 (f64 for the sums).

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::CudaStorage;
use candle_core::{bail, CpuStorage, CustomOp1, DType, Layout, Result, Shape};

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

/// The causal softmax forward on CUDA (the CUDA half of `kernels::CausalSoftmax`): for x of
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

/// The softmax backward on CUDA (the CUDA half of `kernels::SoftmaxGrad`):
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
        let func = dev.get_or_load_custom_func(&format!("softmax_bwd_{suffix}"), MODULE, PTX)?;
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

/// Threads for an elementwise grid-stride kernel over `n` elements.
fn elementwise_config(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n.div_ceil(THREADS as usize).clamp(1, 65_535) as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// The tanh-GELU forward on CUDA (the CUDA half of `kernels::Gelu`).
pub(crate) fn gelu_fwd(s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
    let (start, end) = contiguous_range(l, "gelu input")?;
    let n = end - start;
    let dev = s.device.clone();
    let out = by_dtype!(s.dtype(), |T, suffix| {
        let x = s.as_cuda_slice::<T>()?.slice(start..end);
        // SAFETY: the kernel writes every element.
        let mut y = unsafe { dev.alloc::<T>(n) }?;
        let func = dev.get_or_load_custom_func(&format!("gelu_fwd_{suffix}"), MODULE, PTX)?;
        let mut b = func.builder();
        b.arg(&x).arg(&mut y).arg(&n);
        // SAFETY: arguments match gelu_fwd_* in kernels.cu; x and y hold n elements.
        unsafe { b.launch(elementwise_config(n)) }.map_err(cuda_err)?;
        CudaStorage::wrap_cuda_slice(y, dev.clone())
    });
    Ok((out, l.shape().clone()))
}

/// The tanh-GELU backward on CUDA: gelu'(x) · dy (the CUDA half of `kernels::GeluGrad`).
pub(crate) fn gelu_bwd(
    x: &CudaStorage,
    xl: &Layout,
    dy: &CudaStorage,
    dyl: &Layout,
) -> Result<(CudaStorage, Shape)> {
    let (xs, xe) = contiguous_range(xl, "gelu input")?;
    let (gs, ge) = contiguous_range(dyl, "gelu gradient")?;
    if xe - xs != ge - gs || x.dtype() != dy.dtype() {
        bail!("gelu gradient: input and gradient differ in size or dtype");
    }
    let n = xe - xs;
    let dev = x.device.clone();
    let out = by_dtype!(x.dtype(), |T, suffix| {
        let xv = x.as_cuda_slice::<T>()?.slice(xs..xe);
        let dyv = dy.as_cuda_slice::<T>()?.slice(gs..ge);
        // SAFETY: the kernel writes every element.
        let mut dx = unsafe { dev.alloc::<T>(n) }?;
        let func = dev.get_or_load_custom_func(&format!("gelu_bwd_{suffix}"), MODULE, PTX)?;
        let mut b = func.builder();
        b.arg(&xv).arg(&dyv).arg(&mut dx).arg(&n);
        // SAFETY: arguments match gelu_bwd_* in kernels.cu; all buffers hold n elements.
        unsafe { b.launch(elementwise_config(n)) }.map_err(cuda_err)?;
        CudaStorage::wrap_cuda_slice(dx, dev.clone())
    });
    Ok((out, xl.shape().clone()))
}

/// Rows of a LayerNorm input: (rows, width) from its layout, checked contiguous.
fn rows_of(l: &Layout) -> Result<(usize, usize)> {
    let (start, end) = contiguous_range(l, "layer norm input")?;
    let c = l.shape().dims().last().copied().unwrap_or(0);
    if c == 0 {
        bail!("layer norm over an empty dimension");
    }
    Ok(((end - start) / c, c))
}

fn f32_slice<'a>(
    s: &'a CudaStorage,
    l: &Layout,
    what: &str,
) -> Result<candle_core::cuda_backend::cudarc::driver::CudaView<'a, f32>> {
    let (start, end) = contiguous_range(l, what)?;
    Ok(s.as_cuda_slice::<f32>()?.slice(start..end))
}

/// LayerNorm forward on CUDA for f32 (the CUDA half of `kernels::LayerNorm`).
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

/// LayerNorm's input gradient on CUDA (the CUDA half of `kernels::LayerNormGradInput`).
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
/// half of `kernels::LayerNormGradParams`).
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

/// The mean cross-entropy forward on CUDA (the CUDA half of `kernels::CrossEntropy`): per-row
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
            let func =
                dev.get_or_load_custom_func(&format!("cross_entropy_grad_{suffix}"), MODULE, PTX)?;
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
