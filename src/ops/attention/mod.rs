//! Fused causal self-attention for the CPU: the packed `(B, T, 3C)` output of `c_attn` in, the
//! `(B, T, C)` input of `c_proj` out, with its own backward, as a candle custom op.
//!
//! The composed version splits q, k and v with three strided copies, materialises the
//! `B·H·T·T` scores and probabilities, and copies the heads back together; its backward pads each
//! of the three narrows' gradients with zeros and adds them up. Here one task per (batch, head)
//! reads q, k and v in place through gemm's strides, keeps the `T×T` block of one head in a
//! per-thread scratch buffer (in L2 for T = 256), skips the blocks above the diagonal, and writes
//! its head's columns of the output directly.
//!
//! When gradients are wanted and all heads' `T×T` probabilities of a call fit in
//! 16 MB, the forward writes them there instead of the scratch buffer
//! and the backward reads them. Above that (long contexts), the backward recomputes them (as
//! flash attention does), so the graph holds only `qkv`: one extra `Q·Kᵀ` and softmax per head.
//! Both give the same gradients bit for bit. Keeping them pays where they stay in cache (`tiny`,
//! T = 128) and not where they are read back from memory (`baby`, T = 256, 12.6 MB a layer; see
//! docs/performance.md). The f32 softmax uses [`FastExp`], vectorized.
//!
//! Three kernels compute the six products: on CPUs with AVX-512, f32 runs register tiles of FMAs
//! (`avx512`) instead of gemm; with bf16 precision on CPUs with AVX512-BF16, bf16
//! operands go through `vdpbf16ps` (`bf16`); gemm serves f64 (the tests' reference)
//! and f32 elsewhere. The tiles keep the probabilities with rows padded to 16.

use candle_core::{
    backend::BackendStorage, bail, CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape,
    Tensor, WithDType, D,
};
use gemm::Parallelism;
use num_traits::Float;
use rayon::prelude::*;
use std::sync::Mutex;

use super::cpu::{contiguous, strided_matmul, SharedPtr, View};
use super::simd::{multiversioned, FastExp, LANES};
pub use super::Precision;
use head::{causal_softmax_row, softmax_grad_row, Dims};
#[cfg(target_arch = "x86_64")]
use head::{head_parts, head_parts_mut};

#[cfg(target_arch = "x86_64")]
mod avx512;
#[cfg(target_arch = "x86_64")]
mod bf16;
mod head;
#[cfg(target_arch = "x86_64")]
mod tiles;

/// Query rows per block. The blocks above the diagonal are skipped: at T = 256 the scores cost
/// 10/16 of the full square instead of 1.
const BLOCK: usize = 64;

/// dst (m×n) = lhs (m×k) · rhs (k×n) on this thread (see [`strided_matmul`]).
///
/// # Safety
/// As [`strided_matmul`].
#[inline]
unsafe fn matmul<T: Float + 'static>(
    dims: (usize, usize, usize),
    dst: (*mut T, isize, isize),
    lhs: View<T>,
    rhs: View<T>,
) {
    strided_matmul(dims, dst, lhs, rhs, false, Parallelism::None)
}

multiversioned! {
    /// Rows `r0..r1` of the scores `p` (row stride t) into probabilities, in place.
    fn causal_softmax_rows<T: FastExp>(p: &mut [T], t: usize, r0: usize, r1: usize, scale: T) {
        for i in r0..r1 {
            causal_softmax_row(&mut p[i * t..i * t + r1], i + 1, scale);
        }
    }
}

multiversioned! {
    /// Rows `r0..r1` of dP (in `ds`, row stride t) into dS ([`softmax_grad_row`]), with zeros
    /// above the diagonal. As in the forward, the loops run over whole lane chunks.
    fn softmax_grad_rows<T: FastExp>(p: &[T], ds: &mut [T], t: usize, r0: usize, r1: usize, scale: T) {
        for i in r0..r1 {
            let span = (i + 1).next_multiple_of(LANES).min(r1);
            let dr = &mut ds[i * t..i * t + r1];
            softmax_grad_row(&p[i * t..i * t + span], &mut dr[..span], scale);
            dr[span..].fill(T::zero());
        }
    }
}

/// Rows `r0..r1` of one head's probabilities into `p` (row stride T), columns `0..r1`.
///
/// # Safety
/// `q` and `k` point at the head's first query and key of its batch row in `qkv`.
unsafe fn probabilities_block<T: FastExp>(
    p: &mut [T],
    (q, k): (*const T, *const T),
    (r0, r1): (usize, usize),
    d: &Dims,
    scale: T,
) {
    let (t, qkv_rs) = (d.t, 3 * d.c as isize);
    matmul(
        (r1 - r0, r1, d.head_dim),
        (p.as_mut_ptr().add(r0 * t), t as isize, 1),
        (q.add(r0 * 3 * d.c), qkv_rs, 1),
        (k, 1, qkv_rs),
    );
    causal_softmax_rows(p, t, r0, r1, scale);
}

/// The row blocks of a sequence of length t.
fn blocks(t: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..t)
        .step_by(BLOCK)
        .map(move |r0| (r0, (r0 + BLOCK).min(t)))
}

/// The attention's output and, with `keep_probabilities`, every head's probabilities (B·H
/// blocks of T×T, row stride T; entries above each row's query block are not written).
fn attention_forward<T: FastExp>(
    qkv: &[T],
    d: Dims,
    keep_probabilities: bool,
) -> (Vec<T>, Option<Vec<T>>) {
    let scale = T::from(d.scale()).expect("finite scale");
    let (t, c) = (d.t, d.c);
    let mut y = vec![T::zero(); d.batch * t * c];
    let y_ptr = SharedPtr(y.as_mut_ptr());
    let mut kept = keep_probabilities.then(|| vec![T::zero(); d.batch * d.n_head * t * t]);
    let kept_ptr = kept.as_mut().map(|p| SharedPtr(p.as_mut_ptr()));
    (0..d.batch * d.n_head).into_par_iter().for_each_init(
        || {
            if kept_ptr.is_some() {
                Vec::new()
            } else {
                vec![T::zero(); t * t]
            }
        },
        |scratch, task| {
            let (at_qkv, at_out) = d.head_offsets(task);
            // SAFETY: q, k and v of the task's head lie inside qkv; this task writes only rows
            // of its batch row and the columns of its head of y, and only its own T×T block of
            // the kept probabilities, which no other task writes.
            unsafe {
                let p = match kept_ptr {
                    Some(kept) => {
                        std::slice::from_raw_parts_mut(kept.get().add(task * t * t), t * t)
                    }
                    None => scratch.as_mut_slice(),
                };
                let [q, k, v] = head_parts(qkv.as_ptr(), at_qkv, c);
                let y = y_ptr.get().add(at_out);
                for (r0, r1) in blocks(t) {
                    probabilities_block(p, (q, k), (r0, r1), &d, scale);
                    matmul(
                        (r1 - r0, d.head_dim, r1),
                        (y.add(r0 * c), c as isize, 1),
                        (p.as_ptr().add(r0 * t), t as isize, 1),
                        (v, 3 * c as isize, 1),
                    );
                }
            }
        },
    );
    (y, kept)
}

/// dqkv from (qkv, dy), with the forward's probabilities when it kept them (`kept`, as
/// [`attention_forward`] returns them), else recomputing them block by block.
fn attention_backward<T: FastExp>(qkv: &[T], dy: &[T], d: Dims, kept: Option<&[T]>) -> Vec<T> {
    let scale = T::from(d.scale()).expect("finite scale");
    let (t, c, hd) = (d.t, d.c, d.head_dim);
    let (qkv_rs, t_rs) = (3 * c as isize, t as isize);
    let mut dqkv = vec![T::zero(); qkv.len()];
    let dqkv_ptr = SharedPtr(dqkv.as_mut_ptr());
    (0..d.batch * d.n_head).into_par_iter().for_each_init(
        || {
            let p = if kept.is_some() {
                Vec::new()
            } else {
                vec![T::zero(); t * t]
            };
            (p, vec![T::zero(); t * t])
        },
        |(scratch, ds), task| {
            let (at_qkv, at_out) = d.head_offsets(task);
            // SAFETY: as in the forward; this task writes only rows of its batch row and the
            // columns of its head in each of dq, dk and dv.
            unsafe {
                let [q, k, v] = head_parts(qkv.as_ptr(), at_qkv, c);
                let dy = dy.as_ptr().add(at_out);
                let [dq, dk, dv] = head_parts_mut(dqkv_ptr.get(), at_qkv, c);
                let p: &[T] = match kept {
                    Some(kept) => &kept[task * t * t..(task + 1) * t * t],
                    None => {
                        for (r0, r1) in blocks(t) {
                            probabilities_block(scratch, (q, k), (r0, r1), &d, scale);
                        }
                        scratch
                    }
                };
                for (r0, r1) in blocks(t) {
                    // dP = dY·Vᵀ, then dS = scale · P ⊙ (dP − Σⱼ P ⊙ dP) in place.
                    matmul(
                        (r1 - r0, r1, hd),
                        (ds.as_mut_ptr().add(r0 * t), t_rs, 1),
                        (dy.add(r0 * c), c as isize, 1),
                        (v, 1, qkv_rs),
                    );
                    softmax_grad_rows(p, ds, t, r0, r1, scale);
                    // dQ = dS·K over the keys this block sees.
                    matmul(
                        (r1 - r0, hd, r1),
                        (dq.add(r0 * 3 * c), qkv_rs, 1),
                        (ds.as_ptr().add(r0 * t), t_rs, 1),
                        (k, qkv_rs, 1),
                    );
                }
                // dK = dSᵀ·Q and dV = Pᵀ·dY, by key block over the queries at or after it: the
                // rows read were all written above (their blocks reach at least this far), and
                // their entries above the diagonal are zero.
                for (c0, c1) in blocks(t) {
                    let (m, kk) = (c1 - c0, t - c0);
                    matmul(
                        (m, hd, kk),
                        (dk.add(c0 * 3 * c), qkv_rs, 1),
                        (ds.as_ptr().add(c0 * t + c0), 1, t_rs),
                        (q.add(c0 * 3 * c), qkv_rs, 1),
                    );
                    matmul(
                        (m, hd, kk),
                        (dv.add(c0 * 3 * c), qkv_rs, 1),
                        (p.as_ptr().add(c0 * t + c0), 1, t_rs),
                        (dy.add(c0 * c), c as isize, 1),
                    );
                }
            }
        },
    );
    dqkv
}

/// The forward's probabilities are kept for the backward when all heads' T×T blocks of one call
/// take at most this many bytes: `tiny` 4 MB and `baby` 12.6 MB a layer are kept; GPT-2 small at
/// 1 × 1024 (50 MB a layer) recomputes them. So keeping adds at most 16 MB a layer to a step's
/// memory, and to an evaluation's (parameters are variables there too, so the forward cannot tell
/// that no backward will come).
const KEEP_PROBABILITIES_MAX_BYTES: usize = 16 << 20;

/// Which kernels compute a call's six products.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kernel {
    /// gemm, per block of [`BLOCK`] query rows: f64, and f32 on CPUs without AVX-512.
    Gemm,
    /// f32 register tiles of FMAs (`avx512`), on CPUs with AVX-512F.
    F32Tiles,
    /// bf16 operands and `vdpbf16ps` (`bf16`), on CPUs with AVX512-BF16.
    Bf16,
}

impl Kernel {
    /// The kernel for qkv of this dtype with products in `precision`, on this CPU.
    fn choose(dtype: DType, precision: Precision) -> Result<Self> {
        #[cfg(target_arch = "x86_64")]
        {
            if precision == Precision::Bf16 && bf16::available() {
                if dtype != DType::F32 {
                    bail!("fused attention with bf16 products: qkv must be f32, not {dtype:?}");
                }
                return Ok(Kernel::Bf16);
            }
            if dtype == DType::F32 && avx512::available() {
                return Ok(Kernel::F32Tiles);
            }
        }
        let _ = (dtype, precision);
        Ok(Kernel::Gemm)
    }

    /// The row stride of the probabilities it keeps: T, or for the tiles T rounded up to a
    /// whole panel of 16.
    fn probability_row_stride(self, t: usize) -> usize {
        match self {
            Kernel::Gemm => t,
            Kernel::F32Tiles | Kernel::Bf16 => t.next_multiple_of(16),
        }
    }
}

/// softmax(q·kᵀ/√head_dim + causal mask)·v per head, from packed qkv.
struct CausalAttention {
    n_head: usize,
    kernel: Kernel,
    /// Whether to keep the probabilities for the backward (gradients wanted, and small enough).
    keep_probabilities: bool,
    /// The probabilities the forward kept (f32 or f64, as qkv), taken by the backward.
    kept: Mutex<Option<CpuStorage>>,
}

/// Its backward: dqkv from (qkv, dy), and the forward's probabilities when it kept them.
struct CausalAttentionGrad {
    n_head: usize,
    kernel: Kernel,
    kept: Option<CpuStorage>,
}

/// [`attention_forward`] on CPU storage of element type T: the output and the kept
/// probabilities, as storage.
fn forward_storage<T: FastExp + WithDType>(
    s: &CpuStorage,
    l: &Layout,
    d: Dims,
    keep_probabilities: bool,
) -> Result<(CpuStorage, Option<CpuStorage>)> {
    let qkv = contiguous(T::cpu_storage_as_slice(s)?, l, "qkv")?;
    let (y, kept) = attention_forward(qkv, d, keep_probabilities);
    Ok((
        T::to_cpu_storage_owned(y),
        kept.map(T::to_cpu_storage_owned),
    ))
}

/// [`attention_backward`] on CPU storage of element type T (the kept probabilities, when there
/// are, are of the same type, as the forward made them).
fn backward_storage<T: FastExp + WithDType>(
    (qkv, l_qkv): (&CpuStorage, &Layout),
    (dy, l_dy): (&CpuStorage, &Layout),
    d: Dims,
    kept: &Option<CpuStorage>,
) -> Result<CpuStorage> {
    let kept = kept.as_ref().map(T::cpu_storage_as_slice).transpose()?;
    Ok(T::to_cpu_storage_owned(attention_backward(
        contiguous(T::cpu_storage_as_slice(qkv)?, l_qkv, "qkv")?,
        contiguous(T::cpu_storage_as_slice(dy)?, l_dy, "dy")?,
        d,
        kept,
    )))
}

impl CustomOp1 for CausalAttention {
    fn name(&self) -> &'static str {
        "fused-causal-attention"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let d = Dims::of_qkv(l, self.n_head)?;
        #[cfg(target_arch = "x86_64")]
        if self.kernel != Kernel::Gemm {
            let qkv = contiguous(f32::cpu_storage_as_slice(s)?, l, "qkv")?;
            let keep = self.keep_probabilities;
            // SAFETY: the kernel was chosen for this CPU's instructions; qkv has d's shape.
            let (y, kept) = unsafe {
                match self.kernel {
                    Kernel::Bf16 => bf16::forward(qkv, d, keep),
                    _ => avx512::forward(qkv, d, keep),
                }
            };
            *self.kept.lock().expect("attention probabilities") = kept.map(CpuStorage::F32);
            return Ok((CpuStorage::F32(y), Shape::from((d.batch, d.t, d.c))));
        }
        let (out, kept) = match s.dtype() {
            DType::F32 => forward_storage::<f32>(s, l, d, self.keep_probabilities)?,
            DType::F64 => forward_storage::<f64>(s, l, d, self.keep_probabilities)?,
            _ => bail!("fused attention on CPU: qkv must be f32 or f64"),
        };
        *self.kept.lock().expect("attention probabilities") = kept;
        Ok((out, Shape::from((d.batch, d.t, d.c))))
    }

    fn bwd(&self, qkv: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let grad = CausalAttentionGrad {
            n_head: self.n_head,
            kernel: self.kernel,
            kept: self.kept.lock().expect("attention probabilities").take(),
        };
        Ok(Some(qkv.apply_op2_no_bwd(&grad_res.contiguous()?, &grad)?))
    }
}

impl CustomOp2 for CausalAttentionGrad {
    fn name(&self) -> &'static str {
        "fused-causal-attention-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let d = Dims::of_qkv(l1, self.n_head)?;
        if l2.shape().dims() != [d.batch, d.t, d.c] {
            bail!(
                "fused attention gradient: dy has shape {:?}, expected {:?}",
                l2.shape().dims(),
                [d.batch, d.t, d.c]
            );
        }
        #[cfg(target_arch = "x86_64")]
        if self.kernel != Kernel::Gemm {
            let qkv = contiguous(f32::cpu_storage_as_slice(s1)?, l1, "qkv")?;
            let dy = contiguous(f32::cpu_storage_as_slice(s2)?, l2, "dy")?;
            let kept = match &self.kept {
                Some(kept) => {
                    let kept = f32::cpu_storage_as_slice(kept)?;
                    let expected =
                        d.batch * d.n_head * d.t * self.kernel.probability_row_stride(d.t);
                    if kept.len() != expected {
                        bail!(
                            "fused attention gradient: {} kept probabilities, expected {expected}",
                            kept.len()
                        );
                    }
                    Some(kept)
                }
                None => None,
            };
            // SAFETY: as in the forward; dy's shape was checked above, the kept probabilities'
            // length just now.
            let dqkv = unsafe {
                match self.kernel {
                    Kernel::Bf16 => bf16::backward(qkv, dy, d, kept),
                    _ => avx512::backward(qkv, dy, d, kept),
                }
            };
            return Ok((CpuStorage::F32(dqkv), l1.shape().clone()));
        }
        let out = match (s1.dtype(), s2.dtype()) {
            (DType::F32, DType::F32) => backward_storage::<f32>((s1, l1), (s2, l2), d, &self.kept)?,
            (DType::F64, DType::F64) => backward_storage::<f64>((s1, l1), (s2, l2), d, &self.kept)?,
            _ => bail!("fused attention gradient on CPU: qkv and dy must both be f32 or f64"),
        };
        Ok((out, l1.shape().clone()))
    }
}

/// Causal multi-head self-attention from the packed projections `qkv` (B, T, 3C) — queries,
/// keys and values side by side, each C = n_head · head_dim wide, as `c_attn` produces them —
/// to the heads' outputs side by side (B, T, C): for each head,
/// softmax(q·kᵀ/√head_dim + causal mask)·v. CPU f32/f64, differentiable; see the module docs.
///
/// When gradients are tracked and the probabilities of the call's heads fit in 16 MB, the forward
/// keeps them for the backward, which otherwise recomputes them (as flash attention does); the
/// gradients are the same either way, bit for bit.
pub fn fused_causal_attention(qkv: &Tensor, n_head: usize) -> Result<Tensor> {
    fused_causal_attention_in(qkv, n_head, Precision::F32)
}

/// Whether this CPU runs [`fused_causal_attention_in`]'s bf16 products (AVX512-BF16).
pub fn bf16_attention_supported() -> bool {
    #[cfg(target_arch = "x86_64")]
    return bf16::available();
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// [`fused_causal_attention`] with its six products (Q·Kᵀ and P·V, and the four of the backward)
/// in `precision`. In bf16 their operands are rounded to bf16 and multiplied with f32 sums
/// (AVX512-BF16), while the softmax, its statistics, the probabilities and every output stay f32,
/// as under PyTorch's CPU autocast; qkv must be f32. Where the CPU lacks AVX512-BF16
/// ([`bf16_attention_supported`]) the products stay f32.
pub fn fused_causal_attention_in(
    qkv: &Tensor,
    n_head: usize,
    precision: Precision,
) -> Result<Tensor> {
    let (batch, t, _) = qkv.dims3()?;
    let kernel = Kernel::choose(qkv.dtype(), precision)?;
    let probability_bytes =
        batch * n_head * t * kernel.probability_row_stride(t) * qkv.dtype().size_in_bytes();
    qkv.contiguous()?.apply_op1(CausalAttention {
        n_head,
        kernel,
        keep_probabilities: qkv.track_op() && probability_bytes <= KEEP_PROBABILITIES_MAX_BYTES,
        kept: Mutex::new(None),
    })
}

/// Whether [`fused_causal_attention`] serves this qkv tensor: CPU, f32 or f64, rank 3.
pub fn fused_causal_attention_applies(qkv: &Tensor) -> bool {
    qkv.device().is_cpu() && matches!(qkv.dtype(), DType::F32 | DType::F64) && qkv.rank() == 3
}

/// Causal self-attention of packed qkv (B, T, 3C) over `n_head` heads, heads merged back to
/// (B, T, C): the fused kernel where it applies and no attention dropout is asked for (it has
/// none), else composed of candle ops, scores and probabilities materialised, with `dropout` on
/// the probabilities (its mask drawn as the composed path always drew it). `mask` is the additive
/// causal mask (T, T) the composed path uses.
pub fn causal_attention(
    qkv: &Tensor,
    n_head: usize,
    precision: Precision,
    mask: &Tensor,
    dropout: f64,
    rng: Option<&mut rand_chacha::ChaCha8Rng>,
) -> Result<Tensor> {
    let attention_dropout = dropout > 0.0 && rng.is_some();
    if !attention_dropout && fused_causal_attention_applies(qkv) {
        return fused_causal_attention_in(qkv, n_head, precision);
    }
    let (b, t, c3) = qkv.dims3()?;
    let (c, head_dim) = (c3 / 3, c3 / 3 / n_head);
    // (B, T, C) → (B, n_head, T, head_dim)
    let split = |i: usize| -> Result<Tensor> {
        qkv.narrow(D::Minus1, i * c, c)?
            .reshape((b, t, n_head, head_dim))?
            .transpose(1, 2)?
            .contiguous()
    };
    let (q, k, v) = (split(0)?, split(1)?, split(2)?);
    let scores = q.matmul(&k.t()?)?;
    let att = super::softmax::causal_softmax(&scores, 1.0 / (head_dim as f64).sqrt(), mask)?;
    let att = super::dropout::dropout(&att, dropout, rng)?;
    // (B, n_head, T, head_dim) → (B, T, C)
    att.matmul(&v)?.transpose(1, 2)?.reshape((b, t, c))
}

#[cfg(test)]
mod tests {
    use super::{attention_backward, attention_forward, Dims, Kernel};
    use rand::{Rng, SeedableRng};

    /// (y, dqkv) of one kernel, keeping the probabilities or recomputing them.
    fn run(kernel: Kernel, qkv: &[f32], dy: &[f32], d: Dims, keep: bool) -> (Vec<f32>, Vec<f32>) {
        match kernel {
            Kernel::Gemm => {
                let (y, kept) = attention_forward(qkv, d, keep);
                assert_eq!(kept.is_some(), keep);
                (y, attention_backward(qkv, dy, d, kept.as_deref()))
            }
            #[cfg(target_arch = "x86_64")]
            Kernel::F32Tiles => unsafe {
                let (y, kept) = super::avx512::forward(qkv, d, keep);
                assert_eq!(kept.is_some(), keep);
                let dqkv = super::avx512::backward(qkv, dy, d, kept.as_deref());
                (y, dqkv)
            },
            #[cfg(target_arch = "x86_64")]
            Kernel::Bf16 => unsafe {
                let (y, kept) = super::bf16::forward(qkv, d, keep);
                assert_eq!(kept.is_some(), keep);
                let dqkv = super::bf16::backward(qkv, dy, d, kept.as_deref());
                (y, dqkv)
            },
            #[allow(unreachable_patterns)]
            _ => unreachable!("{kernel:?} is x86-64 only"),
        }
    }

    #[test]
    fn every_kernel_gives_the_same_gradients_kept_or_recomputed_and_f32_ones_match_f64() {
        let mut kernels = vec![Kernel::Gemm];
        #[cfg(target_arch = "x86_64")]
        {
            if super::avx512::available() {
                kernels.push(Kernel::F32Tiles);
            }
            if super::bf16::available() {
                kernels.push(Kernel::Bf16);
            }
        }
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        // A partial last block and key panel; several heads over one short block; a head width
        // that is not a whole panel.
        for (batch, t, n_head, head_dim) in [(2, 150, 2, 16), (1, 40, 3, 8), (2, 33, 2, 20)] {
            let c = n_head * head_dim;
            let d = Dims {
                batch,
                t,
                c,
                n_head,
                head_dim,
            };
            let qkv: Vec<f32> = (0..batch * t * 3 * c)
                .map(|_| rng.random_range(-2.0..2.0))
                .collect();
            let dy: Vec<f32> = (0..batch * t * c)
                .map(|_| rng.random_range(-1.0..1.0))
                .collect();
            let wide = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<f64>>();
            let (y64, kept64) = attention_forward(&wide(&qkv), d, true);
            let dqkv64 = attention_backward(&wide(&qkv), &wide(&dy), d, kept64.as_deref());
            for &kernel in &kernels {
                let (y, dqkv) = run(kernel, &qkv, &dy, d, true);
                let (y_again, dqkv_again) = run(kernel, &qkv, &dy, d, false);
                assert_eq!(y, y_again, "{kernel:?}");
                assert_eq!(dqkv, dqkv_again, "{kernel:?}: kept and recomputed differ");
                if kernel == Kernel::Bf16 {
                    continue;
                }
                for (name, ours, reference) in [("y", &y, &y64), ("dqkv", &dqkv, &dqkv64)] {
                    let scale = reference.iter().fold(1.0f64, |m, x| m.max(x.abs()));
                    let worst = ours
                        .iter()
                        .zip(reference.iter())
                        .map(|(&a, &b)| (a as f64 - b).abs())
                        .fold(0.0, f64::max);
                    assert!(
                        worst < 2e-5 * scale,
                        "{kernel:?} {name}: {worst:e} off (of {scale:e})"
                    );
                }
            }
        }
    }
}
