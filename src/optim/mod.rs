//! Adam, AdamW and ADOPT for candle, with their state (moments and step counts) exposed as named
//! tensors so checkpoints can save and restore it exactly.
//!
//! The optimizers work on any candle program's [`Var`]s: build [`Param`]s (a name, a var and its
//! weight decay), call [`Optimizer::step`] with the [`GradStore`] from `loss.backward()` and the
//! step's learning rate. The learning-rate schedule lives outside ([`crate::schedule`]).
//!
//! Semantics follow the references exactly (see each type's docs): `torch.optim.Adam`,
//! `torch.optim.AdamW`, and the ADOPT authors' `torch-adopt` 0.1.0.

mod adam;
mod adopt;

pub use adam::{Adam, AdamConfig};
pub use adopt::{Adopt, AdoptConfig};

use anyhow::{bail, Context, Result};
use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};

/// Which optimizer a run uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    /// `torch.optim.Adam`: weight decay as L2 added to the gradient.
    Adam,
    /// `torch.optim.AdamW`: decoupled weight decay.
    AdamW,
    /// ADOPT (Taniguchi et al., NeurIPS 2024).
    Adopt,
}

/// Hyperparameters of either optimizer family.
#[derive(Debug, Clone, PartialEq)]
pub enum OptimizerSettings {
    Adam(AdamConfig),
    Adopt(AdoptConfig),
}

/// One trainable tensor as an optimizer sees it.
#[derive(Clone)]
pub struct Param {
    /// A stable name; it keys the saved state.
    pub name: String,
    pub var: Var,
    /// This tensor's weight-decay coefficient (0 for no decay).
    pub weight_decay: f64,
}

/// nanoGPT's parameter groups: `weight_decay` on tensors of two or more dimensions (matmul
/// weights, embeddings), none on biases and LayerNorm gains unless `decay_1d`.
pub fn param_groups(named_vars: &[(String, Var)], weight_decay: f64, decay_1d: bool) -> Vec<Param> {
    named_vars
        .iter()
        .map(|(name, var)| Param {
            name: name.clone(),
            var: var.clone(),
            weight_decay: if var.rank() >= 2 || decay_1d {
                weight_decay
            } else {
                0.0
            },
        })
        .collect()
}

/// A first-order optimizer whose state can be saved and restored.
pub trait Optimizer {
    /// Applies one update with learning rate `lr`. Parameters with no gradient in `grads` are
    /// left alone, state included (as PyTorch skips parameters whose `.grad` is `None`).
    fn step(&mut self, grads: &GradStore, lr: f64) -> Result<()>;

    /// Every state tensor by name: `exp_avg.NAME`, `exp_avg_sq.NAME`, `step.NAME`.
    fn state_tensors(&self) -> Result<BTreeMap<String, Tensor>>;

    /// Restores state saved by [`Optimizer::state_tensors`]; names and shapes must match.
    fn load_state_tensors(&mut self, tensors: &HashMap<String, Tensor>) -> Result<()>;

    /// Updates done on the first parameter (all parameters step together in training).
    fn steps_taken(&self) -> u64;
}

/// Builds the optimizer a config asks for.
pub fn build(settings: &OptimizerSettings, params: Vec<Param>) -> Result<Box<dyn Optimizer>> {
    Ok(match settings {
        OptimizerSettings::Adam(cfg) => Box::new(Adam::new(params, cfg.clone())?),
        OptimizerSettings::Adopt(cfg) => Box::new(Adopt::new(params, cfg.clone())?),
    })
}

/// Moments and step count of one parameter (shared by Adam and ADOPT).
pub(crate) struct Moments {
    pub exp_avg: Tensor,
    pub exp_avg_sq: Tensor,
    pub step: u64,
}

impl Moments {
    fn zeros(var: &Var) -> Result<Self> {
        Ok(Self {
            exp_avg: var.as_tensor().zeros_like()?,
            exp_avg_sq: var.as_tensor().zeros_like()?,
            step: 0,
        })
    }
}

/// Zeroed state for each parameter, rejecting duplicate names.
pub(crate) fn init_moments(params: &[Param]) -> Result<Vec<Moments>> {
    let mut seen = std::collections::HashSet::new();
    for p in params {
        if !seen.insert(&p.name) {
            bail!("two parameters are named {}", p.name);
        }
    }
    params.iter().map(|p| Moments::zeros(&p.var)).collect()
}

pub(crate) fn moments_to_tensors(
    params: &[Param],
    moments: &[Moments],
) -> Result<BTreeMap<String, Tensor>> {
    let mut out = BTreeMap::new();
    for (p, s) in params.iter().zip(moments) {
        out.insert(format!("exp_avg.{}", p.name), s.exp_avg.clone());
        out.insert(format!("exp_avg_sq.{}", p.name), s.exp_avg_sq.clone());
        let step = Tensor::new(&[s.step as i64], s.exp_avg.device())?;
        out.insert(format!("step.{}", p.name), step);
    }
    Ok(out)
}

pub(crate) fn moments_from_tensors(
    params: &[Param],
    moments: &mut [Moments],
    tensors: &HashMap<String, Tensor>,
) -> Result<()> {
    let expected = 3 * params.len();
    if tensors.len() != expected {
        bail!(
            "optimizer state has {} tensors, expected {expected} (another model or optimizer?)",
            tensors.len()
        );
    }
    for (p, s) in params.iter().zip(moments.iter_mut()) {
        let get = |kind: &str| {
            tensors
                .get(&format!("{kind}.{}", p.name))
                .with_context(|| format!("optimizer state lacks {kind}.{}", p.name))
        };
        let want = p.var.as_tensor();
        for (kind, slot) in [
            ("exp_avg", &mut s.exp_avg),
            ("exp_avg_sq", &mut s.exp_avg_sq),
        ] {
            let t = get(kind)?;
            if t.dims() != want.dims() {
                bail!(
                    "optimizer state {kind}.{} has shape {:?}, the parameter has {:?}",
                    p.name,
                    t.dims(),
                    want.dims()
                );
            }
            *slot = t.to_dtype(want.dtype())?.to_device(want.device())?;
        }
        let step = get("step")?
            .to_dtype(DType::I64)?
            .flatten_all()?
            .to_vec1::<i64>()?;
        match step.as_slice() {
            [n] if *n >= 0 => s.step = *n as u64,
            _ => bail!(
                "optimizer state step.{} is not one non-negative integer",
                p.name
            ),
        }
    }
    Ok(())
}

/// `torch.lerp_(start, end, weight)` as PyTorch's CPU kernel computes it, so f64 results match
/// PyTorch to the last bits: `start + w·(end − start)` for w < 0.5, else `end − (end − start)·(1 − w)`.
pub(crate) fn lerp(start: &Tensor, end: &Tensor, weight: f64) -> Result<Tensor> {
    let diff = (end - start)?;
    Ok(if weight < 0.5 {
        (start + (diff * weight)?)?
    } else {
        (end - (diff * (1.0 - weight))?)?
    })
}

/// Checks the hyperparameters every Adam-family optimizer shares.
pub(crate) fn check_common(lr: f64, beta1: f64, beta2: f64, eps: f64, wd: f64) -> Result<()> {
    if !(lr.is_finite() && lr >= 0.0) {
        bail!("lr must be >= 0, got {lr}");
    }
    for (name, b) in [("beta1", beta1), ("beta2", beta2)] {
        if !(0.0..1.0).contains(&b) {
            bail!("{name} must be in [0, 1), got {b}");
        }
    }
    if !(eps.is_finite() && eps >= 0.0) {
        bail!("eps must be >= 0, got {eps}");
    }
    if !(wd.is_finite() && wd >= 0.0) {
        bail!("weight_decay must be >= 0, got {wd}");
    }
    Ok(())
}
