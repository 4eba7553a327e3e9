//! The fused optimizer step on CUDA: one kernel launch per parameter tensor reads θ, g, m and v
//! once and writes θ, m and v in place (src/optim/optim.cu, compiled to PTX by build.rs). The
//! state stays on the device; nothing is copied to the host.

use super::update::Update;
use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDType, CudaDevice, CudaStorage};
use candle_core::{bail, CpuStorage, DType, InplaceOp2, Layout, Result, Storage, Tensor};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/optim.ptx"));
const MODULE: &str = "gpt_pretrain_optim";
const THREADS: u32 = 256;
/// Enough blocks to fill any current GPU several times over; the kernels loop over the rest.
const MAX_BLOCKS: usize = 8192;

/// The in-place op on θ (the destination) with g (the source); m and v are this parameter's own
/// state tensors, contiguous from offset 0 and never shared (their readers get copies), so the
/// kernel may write them while candle holds only read locks on them.
pub(crate) struct CudaFusedStep<'a> {
    pub update: Update,
    pub m: &'a Tensor,
    pub v: &'a Tensor,
}

fn cuda_err(e: impl std::error::Error + Send + Sync + 'static) -> candle_core::Error {
    candle_core::Error::Cuda(Box::new(e))
}

impl InplaceOp2 for CudaFusedStep<'_> {
    fn name(&self) -> &'static str {
        "fused-optimizer-step-cuda"
    }

    fn cpu_fwd(&self, _: &mut CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<()> {
        bail!("the CUDA optimizer step was given CPU tensors")
    }

    fn cuda_fwd(
        &self,
        theta: &mut CudaStorage,
        theta_layout: &Layout,
        grad: &CudaStorage,
        grad_layout: &Layout,
    ) -> Result<()> {
        let Some(theta_range) = theta_layout.contiguous_offsets() else {
            bail!("fused optimizer step: parameter is not contiguous")
        };
        let Some(grad_range) = grad_layout.contiguous_offsets() else {
            bail!("fused optimizer step: gradient is not contiguous")
        };
        let (m_storage, _) = self.m.storage_and_layout();
        let (v_storage, _) = self.v.storage_and_layout();
        let (Storage::Cuda(m), Storage::Cuda(v)) = (&*m_storage, &*v_storage) else {
            bail!("fused optimizer step: state is not on the CUDA device")
        };
        let ranges = (theta_range, grad_range);
        match (self.m.dtype(), self.v.dtype()) {
            (DType::F32, DType::F32) => {
                launch::<f32>(&self.update, theta, grad, m, v, ranges, "f32")
            }
            (DType::F64, DType::F64) => {
                launch::<f64>(&self.update, theta, grad, m, v, ranges, "f64")
            }
            (m, v) => bail!("fused optimizer step: no CUDA kernel for state dtypes {m:?}/{v:?}"),
        }
    }
}

type Ranges = ((usize, usize), (usize, usize));

fn launch<T>(
    update: &Update,
    theta: &mut CudaStorage,
    grad: &CudaStorage,
    m: &CudaStorage,
    v: &CudaStorage,
    ((theta_start, theta_end), (grad_start, grad_end)): Ranges,
    suffix: &str,
) -> Result<()>
where
    T: CudaDType + DeviceRepr + num_traits::Float,
{
    let n = theta_end - theta_start;
    if grad_end - grad_start != n {
        bail!("fused optimizer step: gradient and parameter sizes differ");
    }
    if n == 0 {
        return Ok(());
    }
    let device: CudaDevice = theta.device.clone();
    let mut theta = theta
        .as_cuda_slice_mut::<T>()?
        .slice_mut(theta_start..theta_end);
    let grad = grad.as_cuda_slice::<T>()?.slice(grad_start..grad_end);
    let (m, v) = (m.as_cuda_slice::<T>()?, v.as_cuda_slice::<T>()?);
    if m.len() != n || v.len() != n {
        bail!("fused optimizer step: state and parameter sizes differ");
    }
    let c = |x: f64| T::from(x).expect("finite coefficient");
    let flag = |on: bool| on as i32;
    let blocks = n.div_ceil(THREADS as usize).min(MAX_BLOCKS) as u32;
    let cfg = LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
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
            let func =
                device.get_or_load_custom_func(&format!("adam_step_{suffix}"), MODULE, PTX)?;
            let coefficients = [
                c(1.0 - beta1),
                c(beta2),
                c(1.0 - beta2),
                c(eps),
                c(coupled_wd),
                c(decay),
                c(step_size),
                c(bias_correction2_sqrt),
            ];
            let flags = [flag(coupled_wd != 0.0), flag(c(decay) != T::one())];
            let mut b = func.builder();
            b.arg(&mut theta).arg(&grad).arg(m).arg(v).arg(&n);
            for x in &coefficients {
                b.arg(x);
            }
            for x in &flags {
                b.arg(x);
            }
            // SAFETY: the argument list matches adam_step_{f32,f64} in optim.cu, and every
            // buffer holds n elements of T.
            unsafe { b.launch(cfg) }.map_err(cuda_err)?;
        }
        Update::AdoptInit {
            coupled_wd,
            decay_alpha,
        } => {
            let func =
                device.get_or_load_custom_func(&format!("adopt_init_{suffix}"), MODULE, PTX)?;
            let coefficients = [c(coupled_wd), c(decay_alpha)];
            let flags = [flag(coupled_wd != 0.0), flag(decay_alpha != 0.0)];
            let mut b = func.builder();
            b.arg(&mut theta).arg(&grad).arg(v).arg(&n);
            for x in &coefficients {
                b.arg(x);
            }
            for x in &flags {
                b.arg(x);
            }
            // SAFETY: as above, for adopt_init_{f32,f64}.
            unsafe { b.launch(cfg) }.map_err(cuda_err)?;
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
            let func =
                device.get_or_load_custom_func(&format!("adopt_step_{suffix}"), MODULE, PTX)?;
            let coefficients = [
                c(1.0 - beta1),
                c(beta2),
                c(1.0 - beta2),
                c(eps),
                c(coupled_wd),
                c(decay_alpha),
                c(lr),
                c(clip.unwrap_or(0.0)),
            ];
            let flags = [
                flag(coupled_wd != 0.0),
                flag(decay_alpha != 0.0),
                flag(clip.is_some()),
            ];
            let mut b = func.builder();
            b.arg(&mut theta).arg(&grad).arg(m).arg(v).arg(&n);
            for x in &coefficients {
                b.arg(x);
            }
            for x in &flags {
                b.arg(x);
            }
            // SAFETY: as above, for adopt_step_{f32,f64}.
            unsafe { b.launch(cfg) }.map_err(cuda_err)?;
        }
    }
    Ok(())
}
