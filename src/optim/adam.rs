//! Adam and AdamW, exactly as `torch.optim.Adam` / `torch.optim.AdamW` (no amsgrad, no maximize).

use super::{check_common, init_moments, lerp, Moments, Optimizer, OptimizerKind, Param};
use anyhow::Result;
use candle_core::backprop::GradStore;
use candle_core::Tensor;
use std::collections::{BTreeMap, HashMap};

/// Adam's hyperparameters. Each parameter's weight decay comes from its [`Param`].
///
/// For t = 1, 2, …:
/// - Adam (`decoupled = false`): g ← g + λθ;
/// - AdamW (`decoupled = true`): θ ← θ·(1 − lr·λ);
/// - m ← β1·m + (1−β1)·g; v ← β2·v + (1−β2)·g²;
/// - θ ← θ − lr/(1−β1^t) · m / (sqrt(v)/sqrt(1−β2^t) + eps).
#[derive(Debug, Clone, PartialEq)]
pub struct AdamConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// The default weight decay a config hands to [`super::param_groups`].
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

/// Adam or AdamW over a set of parameters.
pub struct Adam {
    params: Vec<Param>,
    moments: Vec<Moments>,
    cfg: AdamConfig,
}

impl Adam {
    /// An optimizer with zeroed moments.
    pub fn new(params: Vec<Param>, cfg: AdamConfig) -> Result<Self> {
        check_common(cfg.lr, cfg.beta1, cfg.beta2, cfg.eps, cfg.weight_decay)?;
        for p in &params {
            check_common(cfg.lr, cfg.beta1, cfg.beta2, cfg.eps, p.weight_decay)?;
        }
        let moments = init_moments(&params)?;
        Ok(Self {
            params,
            moments,
            cfg,
        })
    }

    /// The hyperparameters.
    pub fn config(&self) -> &AdamConfig {
        &self.cfg
    }
}

impl Optimizer for Adam {
    fn step(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        let AdamConfig {
            beta1,
            beta2,
            eps,
            decoupled,
            ..
        } = self.cfg;
        for (p, s) in self.params.iter().zip(self.moments.iter_mut()) {
            let Some(grad) = grads.get(p.var.as_tensor()) else {
                continue;
            };
            let theta = p.var.as_tensor();
            let wd = p.weight_decay;
            s.step += 1;
            let t = s.step as i32;
            let mut theta_new = theta.clone();
            let mut grad = grad.clone();
            if wd != 0.0 {
                if decoupled {
                    theta_new = (theta * (1.0 - lr * wd))?;
                } else {
                    grad = (grad + (theta * wd)?)?;
                }
            }
            s.exp_avg = lerp(&s.exp_avg, &grad, 1.0 - beta1)?;
            s.exp_avg_sq = ((&s.exp_avg_sq * beta2)? + (grad.sqr()? * (1.0 - beta2))?)?;
            let bias_correction1 = 1.0 - beta1.powi(t);
            let bias_correction2_sqrt = (1.0 - beta2.powi(t)).sqrt();
            let step_size = lr / bias_correction1;
            let denom = ((s.exp_avg_sq.sqrt()? / bias_correction2_sqrt)? + eps)?;
            let update = ((&s.exp_avg * step_size)? / denom)?;
            p.var.set(&(theta_new - update)?)?;
        }
        Ok(())
    }

    fn state_tensors(&self) -> Result<BTreeMap<String, Tensor>> {
        super::moments_to_tensors(&self.params, &self.moments)
    }

    fn load_state_tensors(&mut self, tensors: &HashMap<String, Tensor>) -> Result<()> {
        super::moments_from_tensors(&self.params, &mut self.moments, tensors)
    }

    fn steps_taken(&self) -> u64 {
        self.moments.first().map_or(0, |m| m.step)
    }
}
