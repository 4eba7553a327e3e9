//! GPU gradients summed by NCCL (the `nccl` feature): one communicator per rank on its own GPU,
//! its unique id made by rank 0 and broadcast over MPI, as llm.c does.

use anyhow::{anyhow, Result};
use candle_core::cuda_backend::cudarc::nccl::safe::{Comm, Id, ReduceOp};
use candle_core::cuda_backend::{CudaDevice, CudaStorage};
use candle_core::{CpuStorage, InplaceOp1, Layout, Tensor};
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;
use std::ffi::c_char;

/// This rank's NCCL communicator, on the stream candle's kernels run on (so the all-reduce is
/// ordered after the backward pass without an explicit synchronisation).
pub(super) struct GpuComm(Comm);

/// Joins the NCCL communicator of all ranks of `comm`, this one on `device`.
pub(super) fn connect(comm: &SimpleCommunicator, device: &CudaDevice) -> Result<GpuComm> {
    let (rank, size) = (comm.rank() as usize, comm.size() as usize);
    let mut bytes = [0u8; 128];
    if rank == 0 {
        let id = Id::new().map_err(|e| anyhow!("NCCL could not create its unique id: {e:?}"))?;
        for (b, c) in bytes.iter_mut().zip(id.internal()) {
            *b = *c as u8;
        }
    }
    comm.process_at_rank(0).broadcast_into(&mut bytes[..]);
    let id = Id::uninit(bytes.map(|b| b as c_char));
    let nccl = Comm::from_rank(device.cuda_stream(), rank, size, id)
        .map_err(|e| anyhow!("NCCL could not join rank {rank} of {size}: {e:?}"))?;
    Ok(GpuComm(nccl))
}

impl GpuComm {
    /// Replaces `flat` (f32, contiguous, on this rank's GPU) by its sum over ranks.
    pub(super) fn sum_in_place(&self, flat: &Tensor) -> Result<()> {
        flat.inplace_op1(&SumInPlace(&self.0))?;
        Ok(())
    }
}

struct SumInPlace<'a>(&'a Comm);

impl InplaceOp1 for SumInPlace<'_> {
    fn name(&self) -> &'static str {
        "nccl-all-reduce-sum"
    }

    fn cpu_fwd(&self, _: &mut CpuStorage, _: &Layout) -> candle_core::Result<()> {
        candle_core::bail!("NCCL sums GPU tensors; this one is on the CPU")
    }

    fn cuda_fwd(&self, storage: &mut CudaStorage, layout: &Layout) -> candle_core::Result<()> {
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("NCCL all-reduce: the gradient buffer is not contiguous")
        };
        let mut slice = storage.as_cuda_slice_mut::<f32>()?.slice_mut(start..end);
        self.0
            .all_reduce_in_place(&mut slice, &ReduceOp::Sum)
            .map_err(|e| candle_core::Error::Msg(format!("NCCL all-reduce failed: {e:?}")))?;
        Ok(())
    }
}
