//! Adam and AdamW, exactly as `torch.optim.Adam` / `torch.optim.AdamW` (no amsgrad, no maximize).

use super::update::Update;
use super::{check_common, OptimizerKind, Param, Slots};
use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor, Var};
use std::collections::{BTreeMap, HashMap};

/// Adam's hyperparameters. Each parameter's weight decay comes from its [`Param`]; `weight_decay`
/// here is the value [`super::param_groups`] and the `candle_nn::Optimizer` constructor hand out.
///
/// For t = 1, 2, … (PyTorch's order of operations):
/// - Adam (`decoupled = false`): g ← g + λθ;
/// - AdamW (`decoupled = true`): θ ← θ·(1 − lr·λ);
/// - m ← lerp(m, g, 1−β1) = β1·m + (1−β1)·g; v ← β2·v + (1−β2)·g²;
/// - θ ← θ − (lr/(1−β1^t))·m / (sqrt(v)/sqrt(1−β2^t) + eps).
#[derive(Debug, Clone, PartialEq)]
pub struct AdamConfig {
    /// Learning rate used by `candle_nn::Optimizer::step` (the crate's own trait passes one per step).
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// AdamW's decoupled decay instead of Adam's L2 term.
    pub decoupled: bool,
}

impl AdamConfig {
    /// PyTorch's defaults: lr 1e-3, betas (0.9, 0.999), eps 1e-8; weight decay 0 for Adam and
    /// 0.01 for AdamW.
    pub fn defaults(kind: OptimizerKind) -> Self {
        let adamw = kind == OptimizerKind::AdamW;
        Self {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: if adamw { 0.01 } else { 0.0 },
            decoupled: adamw,
        }
    }
}

impl Default for AdamConfig {
    /// `torch.optim.AdamW`'s defaults, like `candle_nn::ParamsAdamW`.
    fn default() -> Self {
        Self::defaults(OptimizerKind::AdamW)
    }
}

/// Adam or AdamW over a set of parameters.
pub struct Adam {
    slots: Slots,
    cfg: AdamConfig,
}

impl Adam {
    /// An optimizer with zeroed moments over named parameters.
    pub fn with_params(params: Vec<Param>, cfg: AdamConfig) -> Result<Self> {
        check_common(cfg.lr, cfg.beta1, cfg.beta2, cfg.eps, &params)?;
        Ok(Self {
            slots: Slots::new(params)?,
            cfg,
        })
    }

    /// The hyperparameters.
    pub fn config(&self) -> &AdamConfig {
        &self.cfg
    }

    /// `false` runs the update as candle tensor ops instead of the fused CPU or CUDA kernel (the
    /// reference they are tested against); the state carries over.
    pub fn set_fused(&mut self, fused: bool) -> Result<()> {
        self.slots.set_fused(fused)
    }

    /// This step's coefficients for a parameter that has had `steps_before` updates.
    fn rule(cfg: &AdamConfig, param: &Param, steps_before: u64, lr: f64) -> Update {
        let t = (steps_before + 1) as i32;
        let wd = param.weight_decay;
        Update::Adam {
            beta1: cfg.beta1,
            beta2: cfg.beta2,
            eps: cfg.eps,
            coupled_wd: if cfg.decoupled { 0.0 } else { wd },
            decay: if cfg.decoupled { 1.0 - lr * wd } else { 1.0 },
            step_size: lr / (1.0 - cfg.beta1.powi(t)),
            bias_correction2_sqrt: (1.0 - cfg.beta2.powi(t)).sqrt(),
        }
    }
}

super::impl_optimizer!(Adam, AdamConfig);
