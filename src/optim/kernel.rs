//! The per-element update rules shared by Adam and ADOPT, and the ways to apply them: a fused CPU
//! kernel (one pass over θ, g, m, v, parallel over chunks, no temporaries), its CUDA twin
//! (cuda.rs, same rules and operation order), and plain candle tensor ops (other dtypes, and the
//! reference the fused kernels are tested against).

use candle_core::{bail, CpuStorage, DType, InplaceOp2, Layout, Result, Tensor, Var};
use num_traits::Float;
use rayon::prelude::*;
use std::sync::Mutex;

use super::update::Update;

/// `torch.lerp` as PyTorch's CPU kernel computes it, so f64 results match PyTorch to the last bits.
#[inline(always)]
fn lerp<T: Float>(start: T, end: T, weight: T, half: T) -> T {
    if weight < half {
        start + weight * (end - start)
    } else {
        end - (end - start) * (T::one() - weight)
    }
}

/// `x` clamped to `[lo, hi]` (NaN stays NaN, as in `torch.clamp`), written as comparisons so it
/// vectorizes to min/max instructions.
#[inline(always)]
fn clamp<T: Float>(x: T, lo: T, hi: T) -> T {
    if x < lo {
        lo
    } else if x > hi {
        hi
    } else {
        x
    }
}

crate::ops::simd::multiversioned! {
    /// Applies `update` to contiguous slices of one parameter, with the widest vector
    /// instructions this CPU has. The rule is the same code in every version and LLVM neither
    /// fuses nor reorders floating-point operations, so every version gives bitwise the same
    /// result.
    fn apply_slices<T: Float>(update: &Update, theta: &mut [T], g: &[T], m: &mut [T], v: &mut [T]) {
        apply_slices_portable(update, theta, g, m, v)
    }
}

#[inline(always)]
fn apply_slices_portable<T: Float>(
    update: &Update,
    theta: &mut [T],
    g: &[T],
    m: &mut [T],
    v: &mut [T],
) {
    // Equal lengths, stated to the compiler: no bounds checks in the loops, so they vectorize.
    let n = theta.len();
    let (g, m, v) = (&g[..n], &mut m[..n], &mut v[..n]);
    let c = |x: f64| T::from(x).expect("finite coefficient");
    let half = c(0.5);
    match *update {
        Update::Adam {
            beta1,
            beta2,
            eps,
            coupled_wd,
            decay,
            step_size,
            bias_correction2_sqrt,
        } => {
            let (w, b2, one_b2, eps, wd, decay, step_size, bc2) = (
                c(1.0 - beta1),
                c(beta2),
                c(1.0 - beta2),
                c(eps),
                c(coupled_wd),
                c(decay),
                c(step_size),
                c(bias_correction2_sqrt),
            );
            for i in 0..theta.len() {
                let mut th = theta[i];
                let mut gi = g[i];
                if coupled_wd != 0.0 {
                    gi = gi + wd * th;
                }
                if decay != T::one() {
                    th = th * decay;
                }
                let mi = lerp(m[i], gi, w, half);
                let vi = v[i] * b2 + one_b2 * gi * gi;
                let denom = vi.sqrt() / bc2 + eps;
                theta[i] = th - step_size * mi / denom;
                m[i] = mi;
                v[i] = vi;
            }
        }
        Update::AdoptInit {
            coupled_wd,
            decay_alpha,
        } => {
            let (wd, alpha) = (c(coupled_wd), c(decay_alpha));
            for i in 0..theta.len() {
                let th = theta[i];
                let mut gi = g[i];
                if coupled_wd != 0.0 {
                    gi = gi + wd * th;
                }
                if decay_alpha != 0.0 {
                    theta[i] = th + alpha * th;
                }
                v[i] = gi * gi;
            }
        }
        Update::Adopt {
            beta1,
            beta2,
            eps,
            coupled_wd,
            decay_alpha,
            lr,
            clip,
        } => {
            let (w, b2, one_b2, eps, wd, alpha, lr) = (
                c(1.0 - beta1),
                c(beta2),
                c(1.0 - beta2),
                c(eps),
                c(coupled_wd),
                c(decay_alpha),
                c(lr),
            );
            let clip = clip.map(c);
            for i in 0..theta.len() {
                let mut th = theta[i];
                let mut gi = g[i];
                if coupled_wd != 0.0 {
                    gi = gi + wd * th;
                }
                if decay_alpha != 0.0 {
                    th = th + alpha * th;
                }
                let sqrt_v = v[i].sqrt();
                let mut normed = gi / if sqrt_v < eps { eps } else { sqrt_v };
                if let Some(clip) = clip {
                    normed = clamp(normed, -clip, clip);
                }
                let mi = lerp(m[i], normed, w, half);
                theta[i] = th - lr * mi;
                m[i] = mi;
                v[i] = v[i] * b2 + one_b2 * gi * gi;
            }
        }
    }
}

/// Elements per parallel task: large enough to amortise scheduling, small enough to balance.
const CHUNK: usize = 1 << 15;

fn apply_parallel<T: Float + Send + Sync>(
    update: &Update,
    theta: &mut [T],
    g: &[T],
    m: &mut [T],
    v: &mut [T],
) {
    if theta.len() <= CHUNK {
        return apply_slices(update, theta, g, m, v);
    }
    theta
        .par_chunks_mut(CHUNK)
        .zip(g.par_chunks(CHUNK))
        .zip(m.par_chunks_mut(CHUNK))
        .zip(v.par_chunks_mut(CHUNK))
        .for_each(|(((t, g), m), v)| apply_slices(update, t, g, m, v));
}

/// Host-side moment buffers of one parameter.
pub(crate) enum HostMoments {
    F32 { m: Vec<f32>, v: Vec<f32> },
    F64 { m: Vec<f64>, v: Vec<f64> },
}

/// The in-place op: θ is the destination candle hands us; g is the source; m and v are our own
/// buffers, lent for the duration of the call.
struct FusedStep<'a> {
    update: Update,
    moments: Mutex<&'a mut HostMoments>,
}

fn contiguous<'s, T>(slice: &'s [T], layout: &Layout, what: &str) -> Result<&'s [T]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&slice[start..end]),
        None => bail!("fused optimizer step: {what} is not contiguous"),
    }
}

impl InplaceOp2 for FusedStep<'_> {
    fn name(&self) -> &'static str {
        "fused-optimizer-step"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<()> {
        let (start, end) = match l1.contiguous_offsets() {
            Some(o) => o,
            None => bail!("fused optimizer step: parameter is not contiguous"),
        };
        let mut moments = self.moments.lock().expect("uncontended");
        match (s1, s2, &mut **moments) {
            (CpuStorage::F32(theta), CpuStorage::F32(g), HostMoments::F32 { m, v }) => {
                let g = contiguous(g, l2, "gradient")?;
                apply_parallel(&self.update, &mut theta[start..end], g, m, v)
            }
            (CpuStorage::F64(theta), CpuStorage::F64(g), HostMoments::F64 { m, v }) => {
                let g = contiguous(g, l2, "gradient")?;
                apply_parallel(&self.update, &mut theta[start..end], g, m, v)
            }
            _ => bail!("fused optimizer step: parameter, gradient and state dtypes differ"),
        }
        Ok(())
    }
}

/// The optimizer state of one parameter: exactly m and v, on the host for the fused CPU kernel,
/// on the GPU for the fused CUDA kernel, or as tensors on the parameter's device for candle ops.
pub(crate) enum Moments {
    Host(HostMoments),
    /// Owned by this parameter alone (readers get copies), updated in place by the CUDA kernel.
    #[cfg(feature = "cuda")]
    Cuda {
        m: Tensor,
        v: Tensor,
    },
    Tensors {
        m: Tensor,
        v: Tensor,
    },
}

impl Moments {
    /// Zeroed state; host buffers when the fused kernel can serve this parameter.
    pub fn zeros(var: &Var, fused: bool) -> Result<Self> {
        let n = var.elem_count();
        let host = fused && var.device().is_cpu() && var.is_contiguous();
        #[cfg(feature = "cuda")]
        if fused
            && var.device().is_cuda()
            && var.is_contiguous()
            && matches!(var.dtype(), DType::F32 | DType::F64)
        {
            return Ok(Self::Cuda {
                m: var.zeros_like()?,
                v: var.zeros_like()?,
            });
        }
        Ok(match var.dtype() {
            DType::F32 if host => Self::Host(HostMoments::F32 {
                m: vec![0.0; n],
                v: vec![0.0; n],
            }),
            DType::F64 if host => Self::Host(HostMoments::F64 {
                m: vec![0.0; n],
                v: vec![0.0; n],
            }),
            _ => Self::Tensors {
                m: var.zeros_like()?,
                v: var.zeros_like()?,
            },
        })
    }

    /// (m, v) as tensors shaped like `var` (a copy for host state).
    pub fn to_tensors(&self, var: &Var) -> Result<(Tensor, Tensor)> {
        let (shape, device) = (var.shape(), var.device());
        Ok(match self {
            Self::Host(HostMoments::F32 { m, v }) => (
                Tensor::from_slice(m, shape, device)?,
                Tensor::from_slice(v, shape, device)?,
            ),
            Self::Host(HostMoments::F64 { m, v }) => (
                Tensor::from_slice(m, shape, device)?,
                Tensor::from_slice(v, shape, device)?,
            ),
            #[cfg(feature = "cuda")]
            Self::Cuda { m, v } => (m.copy()?, v.copy()?),
            Self::Tensors { m, v } => (m.clone(), v.clone()),
        })
    }

    /// Replaces the state with saved tensors (converted to this state's dtype and device).
    pub fn load(&mut self, var: &Var, m_new: &Tensor, v_new: &Tensor) -> Result<()> {
        let flat = |t: &Tensor| -> Result<Tensor> { t.to_dtype(var.dtype())?.flatten_all() };
        match self {
            Self::Host(HostMoments::F32 { m, v }) => {
                *m = flat(m_new)?.to_vec1()?;
                *v = flat(v_new)?.to_vec1()?;
            }
            Self::Host(HostMoments::F64 { m, v }) => {
                *m = flat(m_new)?.to_vec1()?;
                *v = flat(v_new)?.to_vec1()?;
            }
            #[cfg(feature = "cuda")]
            Self::Cuda { m, v } => {
                // Fresh contiguous storage that nothing else holds: the kernel writes it in place.
                let own = |t: &Tensor| -> Result<Tensor> {
                    t.to_dtype(var.dtype())?
                        .to_device(var.device())?
                        .reshape(var.shape())?
                        .copy()
                };
                *m = own(m_new)?;
                *v = own(v_new)?;
            }
            Self::Tensors { m, v } => {
                *m = m_new.to_dtype(var.dtype())?.to_device(var.device())?;
                *v = v_new.to_dtype(var.dtype())?.to_device(var.device())?;
            }
        }
        Ok(())
    }

    /// Applies `update` to `var` given its gradient.
    pub fn apply(&mut self, update: &Update, var: &Var, grad: &Tensor) -> Result<()> {
        match self {
            Self::Host(host) => {
                let grad = if grad.is_contiguous() {
                    grad.clone()
                } else {
                    grad.contiguous()?
                };
                let op = FusedStep {
                    update: *update,
                    moments: Mutex::new(host),
                };
                var.as_tensor().inplace_op2(&grad, &op)
            }
            #[cfg(feature = "cuda")]
            Self::Cuda { m, v } => {
                let grad = if grad.is_contiguous() {
                    grad.clone()
                } else {
                    grad.contiguous()?
                };
                let op = super::cuda::CudaFusedStep {
                    update: *update,
                    m,
                    v,
                };
                var.as_tensor().inplace_op2(&grad, &op)
            }
            Self::Tensors { m, v } => apply_tensor_ops(update, var, grad, m, v),
        }
    }
}

/// `torch.lerp` on tensors, same branch rule as [`lerp`].
pub(crate) fn lerp_tensors(start: &Tensor, end: &Tensor, weight: f64) -> Result<Tensor> {
    let diff = (end - start)?;
    if weight < 0.5 {
        start + (diff * weight)?
    } else {
        end - (diff * (1.0 - weight))?
    }
}

/// The same rules as [`apply_slices`] with candle ops: stays on the tensors' device (no host
/// round trips on CUDA), at the cost of a temporary per op.
fn apply_tensor_ops(
    update: &Update,
    var: &Var,
    grad: &Tensor,
    m: &mut Tensor,
    v: &mut Tensor,
) -> Result<()> {
    // Detached: ops on a variable record a backward graph, and m and v would then keep every
    // earlier step's tensors alive.
    let theta = &var.as_tensor().detach();
    let grad = &grad.detach();
    match *update {
        Update::Adam {
            beta1,
            beta2,
            eps,
            coupled_wd,
            decay,
            step_size,
            bias_correction2_sqrt,
        } => {
            let g = if coupled_wd != 0.0 {
                (grad + (theta * coupled_wd)?)?
            } else {
                grad.clone()
            };
            let th = if decay != 1.0 {
                (theta * decay)?
            } else {
                theta.clone()
            };
            *m = lerp_tensors(m, &g, 1.0 - beta1)?;
            *v = ((&*v * beta2)? + (g.sqr()? * (1.0 - beta2))?)?;
            let denom = ((v.sqrt()? / bias_correction2_sqrt)? + eps)?;
            var.set(&(th - ((&*m * step_size)? / denom)?)?)
        }
        Update::AdoptInit {
            coupled_wd,
            decay_alpha,
        } => {
            let g = if coupled_wd != 0.0 {
                (grad + (theta * coupled_wd)?)?
            } else {
                grad.clone()
            };
            *v = g.sqr()?;
            if decay_alpha != 0.0 {
                var.set(&(theta + (theta * decay_alpha)?)?)?;
            }
            Ok(())
        }
        Update::Adopt {
            beta1,
            beta2,
            eps,
            coupled_wd,
            decay_alpha,
            lr,
            clip,
        } => {
            let g = if coupled_wd != 0.0 {
                (grad + (theta * coupled_wd)?)?
            } else {
                grad.clone()
            };
            let th = if decay_alpha != 0.0 {
                (theta + (theta * decay_alpha)?)?
            } else {
                theta.clone()
            };
            let mut normed = (&g / v.sqrt()?.maximum(eps)?)?;
            if let Some(clip) = clip {
                normed = normed.clamp(-clip, clip)?;
            }
            *m = lerp_tensors(m, &normed, 1.0 - beta1)?;
            var.set(&(th - (&*m * lr)?)?)?;
            *v = ((&*v * beta2)? + (g.sqr()? * (1.0 - beta2))?)?;
            Ok(())
        }
    }
}
