//! The processes one run is spread over (data parallel), and the collectives the trainer needs.
//!
//! A run started by an MPI launcher (`mpirun -np N`, `srun`) is one rank of N; any other run is
//! the single rank of a world of one, and every collective here is then the identity. MPI (the
//! `mpi` cargo feature, OpenMPI or MPICH through the `mpi` crate) starts and names the ranks and
//! carries the CPU gradients. A build without the feature refuses to start under a launcher that
//! asks for several ranks, rather than train N unrelated copies of the run.
//!
//! Every collective that feeds the model is ordered so the result does not depend on timing: the
//! gradient sum runs as a chain in rank order ([`World::sum_in_rank_order`]), which is what makes N
//! ranks bitwise equal to one process accumulating N times as many micro-batches.
//!
//! On GPUs (the `nccl` feature, with `cuda` and `mpi`) each rank drives the GPU of its local rank
//! and NCCL all-reduces the gradients on the device: deterministic for a given world size, but not
//! bitwise equal to one process, since NCCL adds in its own order.

pub mod gradients;
#[cfg(feature = "nccl")]
mod nccl;

use anyhow::{bail, Result};
use candle_core::{Device, Tensor};

/// Environment variables through which launchers announce a world's size.
const SIZE_VARS: [&str; 2] = ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE"];

/// The ranks of a run, and this process's place among them.
pub struct World {
    rank: usize,
    size: usize,
    #[cfg(feature = "mpi")]
    mpi: Option<MpiWorld>,
    /// Set by [`World::attach_device`] when gradients live on a GPU.
    #[cfg(feature = "nccl")]
    gpu: std::cell::OnceCell<nccl::GpuComm>,
}

#[cfg(feature = "mpi")]
struct MpiWorld {
    // Dropping the universe finalizes MPI: it must outlive every use of `comm`.
    comm: mpi::topology::SimpleCommunicator,
    _universe: mpi::environment::Universe,
}

/// The world size a launcher announced in the environment, if any. `srun` with PMIx sets only
/// `PMIX_RANK` beside SLURM's task count.
pub fn launcher_world_size() -> Option<usize> {
    let read = |name: &str| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
    };
    SIZE_VARS.iter().find_map(|v| read(v)).or_else(|| {
        std::env::var_os("PMIX_RANK").map(|_| read("SLURM_NTASKS").unwrap_or(usize::MAX))
    })
}

impl World {
    /// A world of one process.
    pub fn single() -> Self {
        World {
            rank: 0,
            size: 1,
            #[cfg(feature = "mpi")]
            mpi: None,
            #[cfg(feature = "nccl")]
            gpu: Default::default(),
        }
    }

    /// The world this process was launched into: MPI's when a launcher started it (and the build
    /// has the `mpi` feature), otherwise a world of one.
    pub fn from_launcher() -> Result<Self> {
        let announced = launcher_world_size();
        #[cfg(feature = "mpi")]
        if announced.is_some() {
            use mpi::topology::Communicator;
            let Some(universe) = mpi::initialize() else {
                bail!("MPI was already initialized in this process");
            };
            let comm = universe.world();
            return Ok(World {
                rank: comm.rank() as usize,
                size: comm.size() as usize,
                mpi: Some(MpiWorld {
                    comm,
                    _universe: universe,
                }),
                #[cfg(feature = "nccl")]
                gpu: Default::default(),
            });
        }
        if let Some(n) = announced.filter(|&n| n > 1) {
            let n = match n {
                usize::MAX => "several".to_string(),
                n => n.to_string(),
            };
            bail!(
                "started by an MPI launcher with {n} ranks, but this build has no MPI support; \
                 rebuild with `cargo build --release --features mpi` (every rank would otherwise \
                 train its own copy of the run)"
            );
        }
        Ok(Self::single())
    }

    /// This process's rank, 0-based.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// How many ranks the run has.
    pub fn size(&self) -> usize {
        self.size
    }

    /// Whether this rank writes the run directory (rank 0).
    pub fn is_root(&self) -> bool {
        self.rank == 0
    }

    /// This rank's index among the ranks on its machine, as the launcher announced it (0 when
    /// none did): the GPU a rank drives.
    pub fn local_rank(&self) -> usize {
        [
            "OMPI_COMM_WORLD_LOCAL_RANK",
            "MPI_LOCALRANKID",
            "SLURM_LOCALID",
        ]
        .iter()
        .find_map(|v| std::env::var(v).ok().and_then(|s| s.parse().ok()))
        .unwrap_or(0)
    }

    /// The device string this rank trains on: with several ranks, `cuda` names the GPU of the
    /// rank's local index (NCCL cannot put two ranks on one GPU); one rank keeps `spec`.
    pub fn device_spec(&self, spec: &str) -> Result<String> {
        if self.size == 1 || spec == "cpu" {
            return Ok(spec.to_string());
        }
        if spec != "cuda" {
            bail!(
                "device = \"{spec}\" with {} ranks: use device = \"cuda\", and each rank takes \
                 the GPU of its local rank",
                self.size
            );
        }
        Ok(format!("cuda:{}", self.local_rank()))
    }

    /// Connects this rank's GPU to the other ranks' through NCCL when the run was launched by MPI
    /// and trains on a GPU (a world of one too, so one rank exercises the same path); otherwise
    /// does nothing. A build without NCCL refuses GPU ranks.
    pub fn attach_device(&self, device: &Device) -> Result<()> {
        if device.is_cpu() {
            return Ok(());
        }
        #[cfg(feature = "nccl")]
        if let (Some(comm), Device::Cuda(cuda)) = (self.comm(), device) {
            if self.gpu.get().is_none() {
                let _ = self.gpu.set(nccl::connect(comm, cuda)?);
            }
            return Ok(());
        }
        if self.size > 1 {
            bail!(
                "data-parallel training on GPUs ({} ranks) needs NCCL: build with --features \
                 cuda,mpi,nccl",
                self.size
            );
        }
        Ok(())
    }

    /// Whether gradients are summed on the GPU by NCCL ([`World::attach_device`] connected it).
    pub fn sums_on_device(&self) -> bool {
        #[cfg(feature = "nccl")]
        if self.gpu.get().is_some() {
            return true;
        }
        false
    }

    /// Replaces `flat` (f32, contiguous, on this rank's GPU) by its sum over ranks, through NCCL.
    pub fn sum_on_device(&self, flat: &Tensor) -> Result<()> {
        #[cfg(feature = "nccl")]
        if let Some(gpu) = self.gpu.get() {
            return gpu.sum_in_place(flat);
        }
        let _ = flat;
        bail!("no NCCL communicator: World::attach_device was not called for a GPU")
    }

    #[cfg(feature = "mpi")]
    fn comm(&self) -> Option<&mpi::topology::SimpleCommunicator> {
        self.mpi.as_ref().map(|m| &m.comm)
    }

    /// Every rank's `digest` (in rank order).
    fn gather_digests(&self, digest: &str) -> Vec<String> {
        #[cfg(feature = "mpi")]
        if let Some(comm) = self.comm() {
            use mpi::traits::*;
            // Hex digests of one hash function share a length; pad anyway so a rank holding a
            // different kind of value cannot make the exchange itself fail.
            let mut mine = [0u8; 128];
            let n = digest.len().min(mine.len());
            mine[..n].copy_from_slice(&digest.as_bytes()[..n]);
            let mut all = vec![0u8; 128 * self.size];
            comm.all_gather_into(&mine[..], &mut all[..]);
            return all
                .chunks(128)
                .map(|c| {
                    let end = c.iter().position(|&b| b == 0).unwrap_or(c.len());
                    String::from_utf8_lossy(&c[..end]).into_owned()
                })
                .collect();
        }
        vec![digest.to_string()]
    }

    /// Fails on every rank, naming the first rank whose `digest` of `what` differs from rank 0's.
    /// Ranks must agree on the config, the data and the binary before they train together.
    pub fn require_same(&self, what: &str, digest: &str) -> Result<()> {
        let all = self.gather_digests(digest);
        if let Some((rank, theirs)) = all.iter().enumerate().find(|(_, d)| *d != &all[0]) {
            bail!(
                "rank {rank} has a different {what} than rank 0 ({} against {}); every rank must \
                 start with the same config, data and binary",
                short(theirs),
                short(&all[0])
            );
        }
        Ok(())
    }

    /// The sum, over ranks in order, of each rank's `terms` in order, as one left-to-right f32 sum:
    /// `((r0[0] + r0[1]) + r1[0]) + ...`. Rank r receives the running sum from rank r - 1, adds its
    /// own terms and passes it on; the last rank sends the total to everyone. Slower than a tree
    /// all-reduce by a factor of about N / 2 in latency, and bitwise equal to one process adding
    /// the same terms one after another. `terms` must be non-empty, all of one length on every rank.
    pub fn sum_in_rank_order(&self, terms: Vec<Vec<f32>>) -> Vec<f32> {
        let mut terms = terms.into_iter();
        #[cfg(feature = "mpi")]
        if let Some(comm) = self.comm() {
            use mpi::traits::*;
            let first = terms.next().expect("at least one term");
            let len = first.len();
            let mut sum = if self.rank == 0 {
                first
            } else {
                let mut incoming = vec![0f32; len];
                comm.process_at_rank(self.rank as i32 - 1)
                    .receive_into(&mut incoming[..]);
                add_assign(&mut incoming, &first);
                incoming
            };
            for term in terms {
                add_assign(&mut sum, &term);
            }
            let last = self.size as i32 - 1;
            if (self.rank as i32) < last {
                comm.process_at_rank(self.rank as i32 + 1).send(&sum[..]);
            }
            comm.process_at_rank(last).broadcast_into(&mut sum[..]);
            return sum;
        }
        let mut sum = terms.next().expect("at least one term");
        for term in terms {
            add_assign(&mut sum, &term);
        }
        sum
    }

    /// Overwrites `values` on every rank with rank `root`'s.
    pub fn broadcast_f32(&self, root: usize, values: &mut [f32]) {
        #[cfg(feature = "mpi")]
        if let Some(comm) = self.comm() {
            use mpi::traits::*;
            comm.process_at_rank(root as i32).broadcast_into(values);
        }
        let _ = (root, values);
    }

    /// Rank 0 gets every rank's `bytes` (its own first, then rank 1's, ...); the others get
    /// nothing back. The lengths may differ between ranks.
    pub fn gather_bytes_to_root(&self, bytes: Vec<u8>) -> Option<Vec<Vec<u8>>> {
        #[cfg(feature = "mpi")]
        if let Some(comm) = self.comm() {
            use mpi::traits::*;
            if self.rank != 0 {
                let root = comm.process_at_rank(0);
                root.send(&(bytes.len() as u64));
                root.send(&bytes[..]);
                return None;
            }
            let mut all = vec![bytes];
            for rank in 1..self.size {
                let from = comm.process_at_rank(rank as i32);
                let (len, _) = from.receive::<u64>();
                let mut theirs = vec![0u8; len as usize];
                from.receive_into(&mut theirs[..]);
                all.push(theirs);
            }
            return Some(all);
        }
        Some(vec![bytes])
    }

    /// Every rank's `values` concatenated in rank order; each rank passes the same count.
    pub fn gather_f64(&self, values: &[f64]) -> Vec<f64> {
        #[cfg(feature = "mpi")]
        if let Some(comm) = self.comm() {
            use mpi::traits::*;
            let mut all = vec![0f64; values.len() * self.size];
            comm.all_gather_into(values, &mut all[..]);
            return all;
        }
        values.to_vec()
    }

    /// Element-wise sum over ranks, for vectors in which each element is non-zero on one rank at
    /// most: the sum is then exact whatever order MPI adds in.
    pub fn sum_disjoint_f64(&self, values: &mut [f64]) {
        #[cfg(feature = "mpi")]
        if let Some(comm) = self.comm() {
            use mpi::collective::SystemOperation;
            use mpi::traits::*;
            let mine = values.to_vec();
            comm.all_reduce_into(&mine[..], values, SystemOperation::sum());
        }
        let _ = values;
    }

    /// The largest `value` over ranks: how ranks agree on a stop signal that reached some of them.
    pub fn max_i32(&self, value: i32) -> i32 {
        #[cfg(feature = "mpi")]
        if let Some(comm) = self.comm() {
            use mpi::collective::SystemOperation;
            use mpi::traits::*;
            let mut out = 0i32;
            comm.all_reduce_into(&value, &mut out, SystemOperation::max());
            return out;
        }
        value
    }

    /// Waits until every rank arrives (the others wait here while rank 0 writes a checkpoint).
    pub fn barrier(&self) {
        #[cfg(feature = "mpi")]
        if let Some(comm) = self.comm() {
            use mpi::traits::*;
            comm.barrier();
        }
    }

    /// Ends every rank of the job with `code`: an error on one rank must not leave the others
    /// waiting in a collective forever. Returns only in a world of one.
    pub fn abort(&self, code: i32) {
        #[cfg(feature = "mpi")]
        if let Some(comm) = self.comm() {
            use mpi::traits::*;
            comm.abort(code);
        }
        let _ = code;
    }
}

fn add_assign(sum: &mut [f32], term: &[f32]) {
    assert_eq!(
        sum.len(),
        term.len(),
        "ranks disagree on the gradient's size"
    );
    for (s, t) in sum.iter_mut().zip(term) {
        *s += t;
    }
}

fn short(digest: &str) -> &str {
    &digest[..digest.len().min(12)]
}
