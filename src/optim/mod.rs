//! Adam, AdamW and ADOPT for candle, exact to their references, fused on CPU, with their state
//! (moments and step counts) exposed as named tensors so checkpoints can save and restore it.
//!
//! Two ways in:
//! - the crate's [`Optimizer`] trait: build [`Param`]s (a name, a var, its weight decay — or
//!   [`param_groups`] for nanoGPT's grouping), call [`Optimizer::update`] with the `GradStore` from
//!   `loss.backward()` and the step's learning rate, save [`Optimizer::state_tensors`];
//! - `candle_nn::Optimizer`, implemented by [`Adam`] and [`Adopt`], so any candle program can use
//!   them as it uses `candle_nn::AdamW`: `Adopt::new(varmap.all_vars(), AdoptConfig::default())`.
//!
//! f32 and f64 parameters are updated by a fused kernel: one pass over θ, g, m and v with no
//! temporaries — on CPU parallel over chunks, on CUDA (with the `cuda` feature) one launch per
//! parameter tensor with the state kept on the device. Other dtypes run the same rule as candle
//! tensor ops on the parameter's device.

pub use adam::{Adam, AdamConfig};
pub use adopt::{Adopt, AdoptConfig, AdoptVariant};
pub use muon::{AdjustLr, Muon, MuonConfig, MuonWithAdamW, NewtonSchulzPrecision};

use candle_core::backprop::GradStore;
use candle_core::{bail, DType, Result, Tensor, Var};
use kernel::Moments;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use update::Update;

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
    /// Muon (`torch.optim.Muon`) on the blocks' matrices, AdamW on every other tensor.
    Muon,
}

/// Hyperparameters of either optimizer family.
#[derive(Debug, Clone, PartialEq)]
pub enum OptimizerSettings {
    Adam(AdamConfig),
    Adopt(AdoptConfig),
    /// Muon on the hidden matrices, AdamW on every other tensor.
    Muon {
        muon: MuonConfig,
        adamw: AdamConfig,
    },
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

/// Unnamed vars (the `candle_nn::Optimizer` entry point) named by position, all decayed alike.
pub(crate) fn indexed_params(vars: Vec<Var>, weight_decay: f64) -> Vec<Param> {
    vars.into_iter()
        .enumerate()
        .map(|(i, var)| Param {
            name: i.to_string(),
            var,
            weight_decay,
        })
        .collect()
}

/// A first-order optimizer whose state can be saved and restored (and moved to another thread:
/// the trainer runs CPU updates on a worker of rayon's pool).
pub trait Optimizer: Send {
    /// Applies one update with learning rate `lr`. Parameters with no gradient in `grads` are
    /// left alone, state included (as PyTorch skips parameters whose `.grad` is `None`).
    fn update(&mut self, grads: &GradStore, lr: f64) -> Result<()>;

    /// Every state tensor by name: `exp_avg.NAME`, `exp_avg_sq.NAME`, `step.NAME` (i64).
    fn state_tensors(&self) -> Result<BTreeMap<String, Tensor>>;

    /// Restores state saved by [`Optimizer::state_tensors`]; names and shapes must match.
    fn load_state_tensors(&mut self, tensors: &HashMap<String, Tensor>) -> Result<()>;

    /// Updates applied to the first parameter (in training every parameter steps together).
    fn steps_taken(&self) -> u64;
}

/// Implements [`Optimizer`] and `candle_nn::Optimizer` for a type with `slots: Slots`, `cfg` (with
/// `lr` and `weight_decay`) and `fn rule(cfg, param, steps_before, lr) -> Update`.
macro_rules! impl_optimizer {
    ($ty:ty, $config:ty) => {
        impl $crate::optim::Optimizer for $ty {
            fn update(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
                let cfg = &self.cfg;
                self.slots.update(grads, |p, s| Self::rule(cfg, p, s, lr))
            }

            fn state_tensors(&self) -> Result<BTreeMap<String, Tensor>> {
                self.slots.state_tensors()
            }

            fn load_state_tensors(&mut self, tensors: &HashMap<String, Tensor>) -> Result<()> {
                self.slots.load_state_tensors(tensors)
            }

            fn steps_taken(&self) -> u64 {
                self.slots.steps_taken()
            }
        }

        impl candle_nn::Optimizer for $ty {
            type Config = $config;

            /// Every var decayed by `config.weight_decay`; state named by position (`exp_avg.0`, …).
            fn new(vars: Vec<Var>, config: $config) -> Result<Self> {
                let params = $crate::optim::indexed_params(vars, config.weight_decay);
                Self::with_params(params, config)
            }

            fn step(&mut self, grads: &GradStore) -> Result<()> {
                let lr = self.cfg.lr;
                $crate::optim::Optimizer::update(self, grads, lr)
            }

            fn learning_rate(&self) -> f64 {
                self.cfg.lr
            }

            fn set_learning_rate(&mut self, lr: f64) {
                self.cfg.lr = lr;
            }
        }
    };
}
pub(crate) use impl_optimizer;

mod adam;
mod adopt;
#[cfg(feature = "cuda")]
mod cuda;
mod kernel;
mod muon;
pub mod replay;
mod update;

/// Builds the optimizer a config asks for; Muon takes every 2-D parameter (as
/// `torch.optim.Muon` would be given them) and AdamW the rest.
pub fn build(settings: &OptimizerSettings, params: Vec<Param>) -> Result<Box<dyn Optimizer>> {
    build_with_matrices(settings, params, |p| p.var.rank() == 2)
}

/// [`build`] with the parameters Muon updates chosen by `muon_takes` (each must be 2-D); the
/// other optimizers update every parameter.
pub fn build_with_matrices(
    settings: &OptimizerSettings,
    params: Vec<Param>,
    muon_takes: impl Fn(&Param) -> bool,
) -> Result<Box<dyn Optimizer>> {
    Ok(match settings {
        OptimizerSettings::Adam(cfg) => Box::new(Adam::with_params(params, cfg.clone())?),
        OptimizerSettings::Adopt(cfg) => Box::new(Adopt::with_params(params, cfg.clone())?),
        OptimizerSettings::Muon { muon, adamw } => {
            let (matrices, others) = params.into_iter().partition(|p| muon_takes(p));
            Box::new(MuonWithAdamW::new(
                matrices,
                others,
                muon.clone(),
                adamw.clone(),
            )?)
        }
    })
}

/// One parameter with its state: m, v and the number of updates it has had.
pub(crate) struct Slot {
    pub param: Param,
    pub moments: Moments,
    pub step: u64,
}

/// The parameters and state every optimizer here keeps; the optimizers differ only in the
/// [`Update`] they compute for each step.
pub(crate) struct Slots {
    slots: Vec<Slot>,
    fused: bool,
}

impl Slots {
    pub fn new(params: Vec<Param>) -> Result<Self> {
        let mut seen = std::collections::HashSet::new();
        for p in &params {
            if !seen.insert(p.name.clone()) {
                bail!("two parameters are named {}", p.name);
            }
        }
        let slots = params
            .into_iter()
            .map(|param| {
                Ok(Slot {
                    moments: Moments::zeros(&param.var, true)?,
                    param,
                    step: 0,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Self { slots, fused: true })
    }

    /// Switches between the fused CPU kernel and tensor ops, keeping the state's values.
    pub fn set_fused(&mut self, fused: bool) -> Result<()> {
        if fused == self.fused {
            return Ok(());
        }
        for slot in &mut self.slots {
            let (m, v) = slot.moments.to_tensors(&slot.param.var)?;
            let mut moments = Moments::zeros(&slot.param.var, fused)?;
            moments.load(&slot.param.var, &m, &v)?;
            slot.moments = moments;
        }
        self.fused = fused;
        Ok(())
    }

    /// Runs `rule(param, step_before)` for each parameter that has a gradient and applies the
    /// update it returns; the step count is incremented afterwards.
    pub fn update(
        &mut self,
        grads: &GradStore,
        mut rule: impl FnMut(&Param, u64) -> Update,
    ) -> Result<()> {
        for slot in &mut self.slots {
            let Some(grad) = grads.get(slot.param.var.as_tensor()) else {
                continue;
            };
            if grad.dims() != slot.param.var.dims() {
                bail!(
                    "gradient of {} has shape {:?}, the parameter {:?}",
                    slot.param.name,
                    grad.dims(),
                    slot.param.var.dims()
                );
            }
            let update = rule(&slot.param, slot.step);
            let grad = grad.to_dtype(slot.param.var.dtype())?;
            slot.moments.apply(&update, &slot.param.var, &grad)?;
            slot.step += 1;
        }
        Ok(())
    }

    pub fn state_tensors(&self) -> Result<BTreeMap<String, Tensor>> {
        let mut out = BTreeMap::new();
        for slot in &self.slots {
            let (m, v) = slot.moments.to_tensors(&slot.param.var)?;
            let name = &slot.param.name;
            out.insert(format!("exp_avg.{name}"), m);
            out.insert(format!("exp_avg_sq.{name}"), v);
            let step = Tensor::new(&[slot.step as i64], slot.param.var.device())?;
            out.insert(format!("step.{name}"), step);
        }
        Ok(out)
    }

    pub fn load_state_tensors(&mut self, tensors: &HashMap<String, Tensor>) -> Result<()> {
        check_state_count(tensors, 3 * self.slots.len())?;
        for slot in &mut self.slots {
            let m = saved_state(tensors, "exp_avg", &slot.param)?;
            let v = saved_state(tensors, "exp_avg_sq", &slot.param)?;
            slot.step = saved_step(tensors, &slot.param.name)?;
            slot.moments.load(&slot.param.var, m, v)?;
        }
        Ok(())
    }

    pub fn steps_taken(&self) -> u64 {
        self.slots.first().map_or(0, |s| s.step)
    }
}

/// Refuses a saved state with another number of tensors than the optimizer keeps.
pub(crate) fn check_state_count(tensors: &HashMap<String, Tensor>, expected: usize) -> Result<()> {
    if tensors.len() != expected {
        bail!(
            "optimizer state has {} tensors, expected {expected} (another model or optimizer?)",
            tensors.len()
        );
    }
    Ok(())
}

/// The saved state tensor `KIND.NAME` of `param`, which must have the parameter's shape.
pub(crate) fn saved_state<'a>(
    tensors: &'a HashMap<String, Tensor>,
    kind: &str,
    param: &Param,
) -> Result<&'a Tensor> {
    let name = &param.name;
    let Some(t) = tensors.get(&format!("{kind}.{name}")) else {
        bail!("optimizer state lacks {kind}.{name}");
    };
    if t.dims() != param.var.dims() {
        bail!(
            "optimizer state {kind}.{name} has shape {:?}, the parameter has {:?}",
            t.dims(),
            param.var.dims()
        );
    }
    Ok(t)
}

/// The saved step count `step.NAME`: one non-negative integer.
pub(crate) fn saved_step(tensors: &HashMap<String, Tensor>, name: &str) -> Result<u64> {
    let Some(t) = tensors.get(&format!("step.{name}")) else {
        bail!("optimizer state lacks step.{name}");
    };
    let step = t.to_dtype(DType::I64)?.flatten_all()?.to_vec1::<i64>()?;
    match step.as_slice() {
        [n] if *n >= 0 => Ok(*n as u64),
        _ => bail!("optimizer state step.{name} is not one non-negative integer"),
    }
}

/// Checks the hyperparameters every Adam-family optimizer shares.
pub(crate) fn check_common(
    lr: f64,
    beta1: f64,
    beta2: f64,
    eps: f64,
    params: &[Param],
) -> Result<()> {
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
    for p in params {
        if !(p.weight_decay.is_finite() && p.weight_decay >= 0.0) {
            bail!(
                "weight_decay of {} must be >= 0, got {}",
                p.name,
                p.weight_decay
            );
        }
    }
    Ok(())
}
