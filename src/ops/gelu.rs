//! GPT-2's tanh-approximated GELU with its backward, fused (CPU and CUDA).

use super::cpu::{by_float, contiguous};
use super::simd::written_vec;
use super::simd::{multiversioned, rounded_by_chunks};
use candle_core::{bail, CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};
use num_traits::Float;
use rayon::prelude::*;
use std::mem::MaybeUninit;

/// √(2/π), GPT-2's tanh-GELU constant, computed as the composed version computes it.
fn gelu_c() -> f64 {
    (2.0 / std::f64::consts::PI).sqrt()
}
const GELU_A: f64 = 0.044715;

/// GPT-2's tanh-approximated GELU, fused: one pass forward, one pass backward (the composed
/// version makes about eight temporaries each way over the 4·C-wide MLP activations).
struct Gelu {
    /// Store the output in bf16, rounded (CPU, f32 input): see [`fused_gelu_tanh_rounded`].
    rounded: bool,
}

/// Elements per chunk of the rounded output: their f32 values stay in L1 until rounded.
const ROUNDED_CHUNK: usize = 1 << 12;

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
    /// vectorizes, where libm's tanhf (through expm1f) is a call per element.
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

multiversioned! {
    /// out[i] = gelu(x[i]) (`grad` None) or gelu'(x[i])·grad[i], with the widest vector
    /// instructions this CPU has (the loop is the same code in every version).
    fn gelu_slices<T: GeluFloat>(x: &[T], grad: Option<&[T]>, out: &mut [MaybeUninit<T>]) {
        let n = out.len();
        let x = &x[..n];
        match grad {
            None => {
                for i in 0..n {
                    out[i].write(gelu_value(x[i]));
                }
            }
            Some(g) => {
                let g = &g[..n];
                for i in 0..n {
                    out[i].write(gelu_derivative(x[i]) * g[i]);
                }
            }
        }
    }
}

/// [`gelu_slices`] over chunks in parallel.
fn gelu_parallel<T: GeluFloat>(x: &[T], grad: Option<&[T]>) -> Vec<T> {
    const CHUNK: usize = 1 << 14;
    // SAFETY: the chunks cover every element, and gelu_slices writes each of its chunk's.
    unsafe {
        written_vec(x.len(), |out| match grad {
            None => out
                .par_chunks_mut(CHUNK)
                .zip(x.par_chunks(CHUNK))
                .for_each(|(o, x)| gelu_slices(x, None, o)),
            Some(g) => out
                .par_chunks_mut(CHUNK)
                .zip(x.par_chunks(CHUNK).zip(g.par_chunks(CHUNK)))
                .for_each(|(o, (x, g))| gelu_slices(x, Some(g), o)),
        })
    }
}

impl candle_core::CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "fused-gelu-tanh"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let out = match s {
            CpuStorage::F32(x) if self.rounded => {
                let x = contiguous(x, l, "input")?;
                // SAFETY: gelu_slices writes every element of its output.
                CpuStorage::BF16(unsafe {
                    rounded_by_chunks(x.len(), ROUNDED_CHUNK, |start, out| {
                        gelu_slices(&x[start..start + out.len()], None, out)
                    })
                })
            }
            _ if self.rounded => bail!("fused gelu: a rounded output needs f32 input on CPU"),
            _ => by_float!("fused gelu: input must be f32 or f64";
                x = s, l, "input" => gelu_parallel(x, None)),
        };
        Ok((out, l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        if self.rounded {
            bail!("fused gelu: a rounded output needs f32 input on CPU");
        }
        cuda_kernels::gelu_fwd(s, l)
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
        let out = by_float!("fused gelu: input and gradient must both be f32 or f64";
            x = s1, l1, "input"; g = s2, l2, "gradient" => gelu_parallel(x, Some(g)));
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
        cuda_kernels::gelu_bwd(s1, l1, s2, l2)
    }
}

/// GPT-2's tanh-GELU with the fused kernel (CPU f32/f64; CUDA f32/bf16/f16).
pub fn fused_gelu_tanh(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Gelu { rounded: false })
}

/// [`fused_gelu_tanh`] of a CPU f32 tensor, for an output that only a bf16 matmul reads
/// ([`crate::ops::linear::fused_linear_takes_bf16`]): stored in bf16, each value rounded as the
/// matmul would round the f32 output, so the matmul's result is the same. The backward pass is
/// the same as `fused_gelu_tanh`'s, in f32 (the gradient arriving at the output is f32).
pub fn fused_gelu_tanh_rounded(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Gelu { rounded: true })
}

/// Whether [`fused_gelu_tanh`] serves this tensor.
pub fn fused_gelu_applies(x: &Tensor) -> bool {
    (x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64))
        || (cfg!(feature = "cuda")
            && x.device().is_cuda()
            && matches!(x.dtype(), DType::F32 | DType::BF16 | DType::F16))
}

/// GELU with the tanh approximation GPT-2 uses: the fused kernel on CPU, candle ops elsewhere
/// (candle's own `gelu` backward uses 6-digit constants, which finite-difference checks notice).
pub fn gelu_tanh(x: &Tensor) -> Result<Tensor> {
    if fused_gelu_applies(x) {
        return fused_gelu_tanh(x);
    }
    gelu_tanh_ops(x)
}

/// [`gelu_tanh`] from plain candle ops (the reference the fused kernel is tested against).
pub fn gelu_tanh_ops(x: &Tensor) -> Result<Tensor> {
    let sqrt_2_over_pi = (2.0 / std::f64::consts::PI).sqrt();
    let inner = ((x.sqr()? * 0.044715)? + 1.0)?.mul(x)?;
    let tanh = (inner * sqrt_2_over_pi)?.tanh()?;
    ((tanh + 1.0)? * 0.5)?.mul(x)
}

/// The CUDA side: launchers of kernels.cu's gelu_fwd_* and gelu_bwd_*.
#[cfg(feature = "cuda")]
mod cuda_kernels {
    use crate::ops::cuda::{by_dtype, contiguous_range, cuda_err, elementwise_config, MODULE, PTX};
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
    use candle_core::cuda_backend::CudaStorage;
    use candle_core::{bail, DType, Layout, Result, Shape};

    /// The tanh-GELU forward on CUDA (the CUDA half of [`super::Gelu`]).
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

    /// The tanh-GELU backward on CUDA: gelu'(x) · dy (the CUDA half of [`super::GeluGrad`]).
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
}
