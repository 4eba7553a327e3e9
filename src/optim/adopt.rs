//! ADOPT (Taniguchi et al., "ADOPT: Modified Adam Can Converge with Any β2 with the Optimal Rate",
//! NeurIPS 2024), exactly as the authors' reference implementation (PyPI `torch-adopt` 0.1.0).

use super::{check_common, init_moments, lerp, Moments, Optimizer, Param};
use anyhow::{bail, Result};
use candle_core::backprop::GradStore;
use candle_core::Tensor;
use std::collections::{BTreeMap, HashMap};

/// ADOPT's hyperparameters. Each parameter's weight decay comes from its [`Param`].
///
/// State s = 0, m = 0, v = 0. Each step:
/// - if λ ≠ 0 and not decoupled: g ← g + λθ;
/// - if s = 0: v ← g², s ← 1, and stop (θ and m untouched);
/// - if decoupled: θ ← θ·(1 − lr·λ);
/// - ĝ ← g / max(sqrt(v), eps) (v does not yet contain g; eps is a floor, not an addend);
/// - ĝ ← clamp(ĝ, −s^c, s^c) with c = `clip_exponent` (no clamp when `None`);
/// - m ← β1·m + (1−β1)·ĝ; θ ← θ − lr·m; v ← β2·v + (1−β2)·g²; s ← s + 1.
#[derive(Debug, Clone, PartialEq)]
pub struct AdoptConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// The default weight decay a config hands to [`super::param_groups`].
    pub weight_decay: f64,
    /// Decoupled (AdamW-style) weight decay instead of an L2 term.
    pub decouple: bool,
    /// Clamp exponent c in ±s^c, or `None` for no clipping.
    pub clip_exponent: Option<f64>,
}

impl Default for AdoptConfig {
    /// The reference defaults: lr 1e-3, betas (0.9, 0.9999), eps 1e-6, no weight decay,
    /// coupled decay, clip exponent 0.25.
    fn default() -> Self {
        Self {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.9999,
            eps: 1e-6,
            weight_decay: 0.0,
            decouple: false,
            clip_exponent: Some(0.25),
        }
    }
}

/// ADOPT over a set of parameters.
pub struct Adopt {
    params: Vec<Param>,
    moments: Vec<Moments>,
    cfg: AdoptConfig,
}

impl Adopt {
    /// An optimizer with zeroed state.
    pub fn new(params: Vec<Param>, cfg: AdoptConfig) -> Result<Self> {
        check_common(cfg.lr, cfg.beta1, cfg.beta2, cfg.eps, cfg.weight_decay)?;
        for p in &params {
            check_common(cfg.lr, cfg.beta1, cfg.beta2, cfg.eps, p.weight_decay)?;
        }
        if let Some(c) = cfg.clip_exponent {
            if !(c.is_finite() && c > 0.0) {
                bail!("clip_exponent must be positive, got {c}");
            }
        }
        let moments = init_moments(&params)?;
        Ok(Self {
            params,
            moments,
            cfg,
        })
    }

    /// The hyperparameters.
    pub fn config(&self) -> &AdoptConfig {
        &self.cfg
    }
}

impl Optimizer for Adopt {
    fn step(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        let AdoptConfig {
            beta1,
            beta2,
            eps,
            decouple,
            clip_exponent,
            ..
        } = self.cfg;
        for (p, s) in self.params.iter().zip(self.moments.iter_mut()) {
            let Some(grad) = grads.get(p.var.as_tensor()) else {
                continue;
            };
            let theta = p.var.as_tensor();
            let wd = p.weight_decay;
            let mut grad = grad.clone();
            if wd != 0.0 && !decouple {
                grad = (grad + (theta * wd)?)?;
            }
            if s.step == 0 {
                s.exp_avg_sq = grad.sqr()?;
                s.step = 1;
                continue;
            }
            let mut theta_new = theta.clone();
            if wd != 0.0 && decouple {
                theta_new = (theta * (1.0 - lr * wd))?;
            }
            let denom = s.exp_avg_sq.sqrt()?.maximum(eps)?;
            let mut normed = (&grad / denom)?;
            if let Some(c) = clip_exponent {
                let clip = (s.step as f64).powf(c);
                normed = normed.clamp(-clip, clip)?;
            }
            s.exp_avg = lerp(&s.exp_avg, &normed, 1.0 - beta1)?;
            p.var.set(&(theta_new - (&s.exp_avg * lr)?)?)?;
            s.exp_avg_sq = ((&s.exp_avg_sq * beta2)? + (grad.sqr()? * (1.0 - beta2))?)?;
            s.step += 1;
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
