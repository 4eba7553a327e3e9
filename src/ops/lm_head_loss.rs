//! The language-model head and the softmax cross-entropy fused on CPU: the final hidden states
//! `x` (N, C), the tied embedding `w` (V, C) and the targets (N,) in, the mean loss out, without
//! the (N, V) logits ever existing whole.
//!
//! With GPT-2's 50,304-token vocabulary the logits and their gradient are the largest tensors of a
//! step by far (412 MB each for 2,048 tokens), freshly mapped and faulted in every step: a quarter
//! of a `tiny50k` step was the kernel clearing and mapping pages. Here the rows go through in
//! groups of about 32 MB of logits: each group's logits are computed, turned into losses and, in
//! place, into their gradient, which goes straight into dx = dlogits·w and dw += dlogitsᵀ·x.
//!
//! The gradients are computed in the forward pass, for an upstream gradient of 1, and kept with
//! the op until the backward pass scales them by the actual upstream gradient (by the chain rule
//! they are linear in it). So a training step does the same three matmuls as the unfused version,
//! with no recomputation. Evaluation asks for no gradients
//! ([`LossGradients::None`]) and does only the first matmul.

use super::cpu::{by_float, contiguous, matmul, matmul_by_columns, strided_matmul, Operand};
use super::cross_entropy::{
    loss_and_gradient_in_place, loss_and_z_gradient_in_place, max_and_log_sum_exp,
};
use super::simd::{multiversioned, FastExp};
use super::Precision;
use candle_core::{bail, CpuStorage, CustomOp3, DType, Device, Layout, Result, Shape, Tensor};
use gemm::Parallelism;
use rayon::prelude::*;
use std::sync::Mutex;

/// Whether the fused loss computes gradients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LossGradients {
    /// Along with the loss (training): the backward pass only scales them.
    Eager,
    /// Not at all (evaluation): a backward pass through this loss is an error.
    None,
}

/// Logits per row group (elements): 32 MB of f32, 166 rows of GPT-2's vocabulary. dw's update
/// is a product over the group's rows, and each thread's share of the other two is its rows:
/// with 83-row groups (16 MB) `tiny50k` ran 10-20% slower (AMD Zen 4, 2 threads), with 41-row
/// groups (one thread's share below 64 rows) at half speed; 64 MB groups were no faster than
/// 32 MB, and 128 MB ones slower again.
const GROUP_LOGITS: usize = 1 << 23;

struct LinearCrossEntropy {
    gradients: LossGradients,
    precision: Precision,
    /// PaLM's z-loss coefficient; with one the op returns [objective, cross-entropy, mean log²Z].
    z_loss: Option<f64>,
    /// (dx, dw) of the mean loss for an upstream gradient of 1, from the forward pass.
    stash: Mutex<Option<(Tensor, Tensor)>>,
}

/// The element types of the fused loss: f32 goes through oneDNN when it is loaded, f64 (the
/// tests' reference precision) through gemm.
trait LossFloat: FastExp {
    fn f32s(values: &[Self]) -> Option<&[f32]>;
    fn f32s_mut(values: &mut [Self]) -> Option<&mut [f32]>;
}

impl LossFloat for f32 {
    fn f32s(values: &[f32]) -> Option<&[f32]> {
        Some(values)
    }
    fn f32s_mut(values: &mut [f32]) -> Option<&mut [f32]> {
        Some(values)
    }
}

impl LossFloat for f64 {
    fn f32s(_: &[f64]) -> Option<&[f32]> {
        None
    }
    fn f32s_mut(_: &mut [f64]) -> Option<&mut [f32]> {
        None
    }
}

multiversioned! {
    /// Rows of logits `z` (length v each) to their losses (log-sum-exp − the target's logit)
    /// and, with `grad`, in place to (softmax − one-hot(target)) · scale.
    fn loss_rows<T: FastExp>(z: &mut [T], targets: &[u32], v: usize, scale: T, grad: bool, losses: &mut [f64]) {
        for ((row, &t), loss) in z.chunks_mut(v).zip(targets).zip(losses.iter_mut()) {
            let loss_value = if grad {
                loss_and_gradient_in_place(row, t as usize, scale)
            } else {
                let (_, lse) = max_and_log_sum_exp(row);
                lse - row[t as usize]
            };
            *loss = loss_value.to_f64().unwrap_or(f64::NAN);
        }
    }
}

multiversioned! {
    /// [`loss_rows`] with a z-loss of coefficient `z_loss`: also each row's log²Z, and with
    /// `grad` the rows turn into the gradient of cross-entropy + z_loss · log²Z.
    fn z_loss_rows<T: FastExp>(z: &mut [T], targets: &[u32], v: usize, scale_and_z_loss: [T; 2], grad: bool, losses: &mut [f64], log_z_sq: &mut [f64]) {
        let [scale, z_loss] = scale_and_z_loss;
        for (((row, &t), loss), lz2) in z.chunks_mut(v).zip(targets).zip(losses.iter_mut()).zip(log_z_sq.iter_mut()) {
            let (loss_value, log_z) = if grad {
                loss_and_z_gradient_in_place(row, t as usize, scale, z_loss)
            } else {
                let (_, lse) = max_and_log_sum_exp(row);
                (lse - row[t as usize], lse)
            };
            *loss = loss_value.to_f64().unwrap_or(f64::NAN);
            *lz2 = log_z.to_f64().map_or(f64::NAN, |l| l * l);
        }
    }
}

/// A step's loss terms, means over the rows.
struct LossMeans {
    cross_entropy: f64,
    /// Mean log²Z, when a z-loss was asked for.
    log_z_sq: Option<f64>,
}

/// Mean loss terms and, with `grad`, (dx, dw) of the objective (cross-entropy + z_loss · log²Z).
#[allow(clippy::type_complexity)]
fn run<T: LossFloat>(
    x: &[T],
    w: &[T],
    targets: &[u32],
    (n, c, v): (usize, usize, usize),
    grad: bool,
    precision: Precision,
    z_loss: Option<f64>,
) -> Result<(LossMeans, Option<(Vec<T>, Vec<T>)>)> {
    if n == 0 {
        bail!("fused cross-entropy: no rows");
    }
    if let Some(&bad) = targets.iter().find(|&&t| t as usize >= v) {
        bail!("cross-entropy target {bad} is outside the vocabulary of {v}");
    }
    let threads = rayon::current_num_threads();
    let parallelism = if threads > 1 {
        Parallelism::Rayon(threads)
    } else {
        Parallelism::None
    };
    let group = (GROUP_LOGITS / v).max(16).min(n);
    let rows_per_task = super::cross_entropy::ce_rows_per_task(v);
    let scale = T::from(1.0 / n as f64).expect("finite scale");
    let mut z = vec![T::zero(); group * v];
    let mut losses = vec![0f64; n];
    let mut log_z_sq = vec![0f64; if z_loss.is_some() { n } else { 0 }];
    let (mut dx, mut dw) = if grad {
        (vec![T::zero(); n * c], vec![T::zero(); v * c])
    } else {
        (Vec::new(), Vec::new())
    };
    let (c_rs, v_rs) = (c as isize, v as isize);
    // x and w in the matmuls' precision, converted once for every group, when oneDNN runs them.
    let onednn = match (T::f32s(x), T::f32s(w), super::onednn::onednn()) {
        (Some(x), Some(w), Some(_)) => {
            Some((Operand::new(x, precision), Operand::new(w, precision)))
        }
        _ if precision == Precision::Bf16 => {
            bail!("fused lm_head cross-entropy: bf16 matmuls need f32 inputs and oneDNN (libdnnl.so.2)")
        }
        _ => None,
    };
    // f32 wᵀ (C×V), row-major, when several row groups read it: oneDNN repacks the transposed
    // view of w (V×C) on every call, and reads a row-major f32 wᵀ as it is; the copy costs about
    // one repack. `tiny50k` f32 on AMD Zen 4: the logits' calls 16% shorter (DNNL_VERBOSE), the
    // step 2-14% in 4 of 5 pairs. bf16 operands are repacked (to pairs of rows) either way.
    let w_t = match &onednn {
        Some((_, w @ Operand::F32(_))) if n > group => Some(w.transposed(v, c)?),
        _ => None,
    };
    for g0 in (0..n).step_by(group) {
        let m = group.min(n - g0);
        let z = &mut z[..m * v];
        let xg = x[g0 * c..].as_ptr();
        if let Some((x, w)) = &onednn {
            // z = x·wᵀ
            let z = T::f32s_mut(z).expect("f32 logits");
            let w_t = match &w_t {
                Some(w_t) => w_t.view(v, 1),
                None => w.view(1, c),
            };
            matmul_by_columns((m, v, c), z, x.view_at(g0 * c, c, 1), w_t)?;
        } else {
            // SAFETY: every view below lies inside its buffer: x rows g0..g0+m (C wide), w
            // (V×C), z (m×V); the destination overlaps no input.
            unsafe {
                // z = x·wᵀ
                strided_matmul(
                    (m, v, c),
                    (z.as_mut_ptr(), v_rs, 1),
                    (xg, c_rs, 1),
                    (w.as_ptr(), 1, c_rs),
                    false,
                    parallelism,
                );
            }
        }
        let (targets, losses) = (&targets[g0..g0 + m], &mut losses[g0..g0 + m]);
        match z_loss {
            None => z
                .par_chunks_mut(rows_per_task * v)
                .zip(targets.par_chunks(rows_per_task))
                .zip(losses.par_chunks_mut(rows_per_task))
                .for_each(|((z, t), l)| loss_rows(z, t, v, scale, grad, l)),
            Some(coefficient) => {
                let coefficient = T::from(coefficient).expect("finite z_loss");
                z.par_chunks_mut(rows_per_task * v)
                    .zip(targets.par_chunks(rows_per_task))
                    .zip(losses.par_chunks_mut(rows_per_task))
                    .zip(log_z_sq[g0..g0 + m].par_chunks_mut(rows_per_task))
                    .for_each(|(((z, t), l), lz2)| {
                        z_loss_rows(z, t, v, [scale, coefficient], grad, l, lz2)
                    })
            }
        }
        if let (true, Some((x, w))) = (grad, &onednn) {
            let dz = Operand::new(T::f32s(z).expect("f32 logits"), precision);
            // dx = dz·w
            let dx = T::f32s_mut(&mut dx[g0 * c..]).expect("f32 dx");
            matmul((m, c, v), dx, dz.view(v, 1), w.view(c, 1), None, false)?;
            // dw += dzᵀ·x, group by group in row order (the first group writes).
            let dw = T::f32s_mut(&mut dw).expect("f32 dw");
            matmul(
                (v, c, m),
                dw,
                dz.view(1, v),
                x.view_at(g0 * c, c, 1),
                None,
                g0 > 0,
            )?;
        } else if grad {
            // SAFETY: every view below lies inside its buffer: z (m×V), w (V×C), x and dx rows
            // g0..g0+m (C wide), dw (V×C); the destinations overlap no input.
            unsafe {
                // dx = dz·w
                strided_matmul(
                    (m, c, v),
                    (dx[g0 * c..].as_mut_ptr(), c_rs, 1),
                    (z.as_ptr(), v_rs, 1),
                    (w.as_ptr(), c_rs, 1),
                    false,
                    parallelism,
                );
                // dw += dzᵀ·x, group by group in row order (the first group writes).
                strided_matmul(
                    (v, c, m),
                    (dw.as_mut_ptr(), c_rs, 1),
                    (z.as_ptr(), 1, v_rs),
                    (xg, c_rs, 1),
                    g0 > 0,
                    parallelism,
                );
            }
        }
    }
    // Per-row losses summed in row order: the same result on every run.
    let means = LossMeans {
        cross_entropy: losses.iter().sum::<f64>() / n as f64,
        log_z_sq: z_loss.map(|_| log_z_sq.iter().sum::<f64>() / n as f64),
    };
    Ok((means, grad.then_some((dx, dw))))
}

impl LinearCrossEntropy {
    fn forward<T: LossFloat + candle_core::WithDType>(
        &self,
        x: &[T],
        w: &[T],
        targets: &[u32],
        dims: (usize, usize, usize),
    ) -> Result<Vec<T>> {
        let (n, c, v) = dims;
        let (means, grads) = run(
            x,
            w,
            targets,
            dims,
            self.gradients == LossGradients::Eager,
            self.precision,
            self.z_loss,
        )?;
        if let Some((dx, dw)) = grads {
            let dx = Tensor::from_vec(dx, (n, c), &Device::Cpu)?;
            let dw = Tensor::from_vec(dw, (v, c), &Device::Cpu)?;
            *self.stash.lock().expect("stash lock") = Some((dx, dw));
        }
        Ok(match (self.z_loss, means.log_z_sq) {
            (Some(coefficient), Some(log_z_sq)) => vec![
                T::from_f64(means.cross_entropy + coefficient * log_z_sq),
                T::from_f64(means.cross_entropy),
                T::from_f64(log_z_sq),
            ],
            _ => vec![T::from_f64(means.cross_entropy)],
        })
    }
}

impl CustomOp3 for LinearCrossEntropy {
    fn name(&self) -> &'static str {
        "fused-lm-head-cross-entropy"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, c) = l1.shape().dims2()?;
        let (v, c_w) = l2.shape().dims2()?;
        if c_w != c {
            bail!("fused lm_head cross-entropy: x is {c} wide, the weight {c_w}");
        }
        let targets = match s3 {
            CpuStorage::U32(t) => contiguous(t, l3, "targets")?,
            _ => bail!("fused lm_head cross-entropy: targets must be u32"),
        };
        if targets.len() != n {
            bail!(
                "fused lm_head cross-entropy: {n} rows but {} targets",
                targets.len()
            );
        }
        let dims = (n, c, v);
        let out = by_float!("fused lm_head cross-entropy on CPU: x and weight must both be f32 or f64";
            x = s1, l1, "x"; w = s2, l2, "weight" => self.forward(x, w, targets, dims)?);
        let shape = match self.z_loss {
            Some(_) => Shape::from(3),
            None => Shape::from(()),
        };
        Ok((out, shape))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _w: &Tensor,
        _targets: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let stash = self.stash.lock().expect("stash lock");
        let Some((dx, dw)) = stash.as_ref() else {
            bail!("this loss was computed for evaluation, without gradients (Gpt::eval_loss); train with Gpt::loss");
        };
        let upstream = match self.z_loss {
            None => grad_res.to_dtype(DType::F64)?.to_scalar::<f64>()?,
            Some(_) => {
                let upstream = grad_res.to_dtype(DType::F64)?.to_vec1::<f64>()?;
                if upstream[1..].iter().any(|&u| u != 0.0) {
                    bail!("the cross-entropy and log²Z terms of the fused loss are for logging; differentiate the objective (element 0)");
                }
                upstream[0]
            }
        };
        if upstream == 1.0 {
            return Ok((Some(dx.clone()), Some(dw.clone()), None));
        }
        Ok((Some((dx * upstream)?), Some((dw * upstream)?), None))
    }
}

/// Mean cross-entropy of `targets` (N,) under the logits x·wᵀ, for x (N, C) and w (V, C),
/// fused (see the module docs). CPU, f32 or f64; the loss has x's dtype. f32 matmuls go through
/// oneDNN when it is loaded, in `precision` (bf16 needs oneDNN and f32 inputs); the softmax,
/// the loss and the gradients' accumulation stay in x's dtype.
pub fn fused_linear_cross_entropy(
    x: &Tensor,
    w: &Tensor,
    targets: &Tensor,
    gradients: LossGradients,
    precision: Precision,
) -> Result<Tensor> {
    apply(x, w, targets, gradients, precision, None)
}

/// [`fused_linear_cross_entropy`] with PaLM's z-loss (Chowdhery et al. 2022, §5): the objective
/// is the mean of cross-entropy + `z_loss` · log²Z over the rows, log Z being a row's log-sum-exp
/// of the logits. Returns a (3,) tensor: the objective (differentiate this one), the mean
/// cross-entropy and the mean log²Z (both for logging; a gradient through them is an error).
pub fn fused_linear_cross_entropy_with_z_loss(
    x: &Tensor,
    w: &Tensor,
    targets: &Tensor,
    gradients: LossGradients,
    precision: Precision,
    z_loss: f64,
) -> Result<Tensor> {
    if !(z_loss.is_finite() && z_loss >= 0.0) {
        bail!("z_loss must be a finite coefficient ≥ 0, got {z_loss}");
    }
    apply(x, w, targets, gradients, precision, Some(z_loss))
}

fn apply(
    x: &Tensor,
    w: &Tensor,
    targets: &Tensor,
    gradients: LossGradients,
    precision: Precision,
    z_loss: Option<f64>,
) -> Result<Tensor> {
    let op = LinearCrossEntropy {
        gradients,
        precision,
        z_loss,
        stash: Mutex::new(None),
    };
    x.contiguous()?
        .apply_op3(&w.contiguous()?, &targets.contiguous()?, op)
}

/// Whether [`fused_linear_cross_entropy`] serves these hidden states and weight.
pub fn fused_linear_cross_entropy_applies(x: &Tensor, w: &Tensor) -> bool {
    x.device().is_cpu()
        && w.device().is_cpu()
        && x.dtype() == w.dtype()
        && matches!(x.dtype(), DType::F32 | DType::F64)
}
