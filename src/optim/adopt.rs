//! ADOPT (Taniguchi et al., "ADOPT: Modified Adam Can Converge with Any β2 with the Optimal Rate",
//! NeurIPS 2024, <https://arxiv.org/abs/2411.02853>), in two versions of the authors' code.

use super::update::Update;
use super::{check_common, Param, Slots};
use candle_core::backprop::GradStore;
use candle_core::{bail, Result, Tensor, Var};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};

/// Which version of the authors' ADOPT.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AdoptVariant {
    /// PyPI `torch-adopt` 0.1.0 (iShohei220/adopt at 6468572), with clipping. State s = 0, m = 0,
    /// v = 0; each step:
    /// - if λ ≠ 0 and not decoupled: g ← g + λθ;
    /// - if s = 0: v ← g², s ← 1, and stop (θ and m untouched);
    /// - if decoupled: θ ← θ − lr·λ·θ;
    /// - ĝ ← g / max(sqrt(v), eps) (v does not yet contain g; eps is a floor, not an addend);
    /// - ĝ ← clamp(ĝ, −s^c, s^c) with c = `clip_exponent` (no clamp when `None`);
    /// - m ← β1·m + (1−β1)·ĝ; θ ← θ − lr·m; v ← β2·v + (1−β2)·g²; s ← s + 1.
    #[default]
    Release,
    /// The first published code (iShohei220/adopt at 6e94fbc, 2024-11-06), which the paper's GPT-2
    /// runs appear to use: no clipping; s counted from 1 and incremented first; weight decay
    /// (coupled g ← g + λθ, or decoupled θ ← θ − lr·λ·θ) before anything else; s = 1: v ← g², stop;
    /// s = 2: m ← g / max(sqrt(v), eps) (no (1−β1) factor); s ≥ 3: m ← β1·m + (1−β1)·g/max(sqrt(v), eps);
    /// then θ ← θ − lr·m; v ← β2·v + (1−β2)·g².
    Original,
}

/// ADOPT's hyperparameters. Each parameter's weight decay comes from its [`Param`]; `weight_decay`
/// here is the value [`super::param_groups`] and the `candle_nn::Optimizer` constructor hand out.
/// See [`AdoptVariant`] for the exact update rules.
#[derive(Debug, Clone, PartialEq)]
pub struct AdoptConfig {
    /// Learning rate used by `candle_nn::Optimizer::step` (the crate's own trait passes one per step).
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Decoupled (AdamW-style) weight decay instead of an L2 term.
    pub decouple: bool,
    /// Clamp exponent c in ±s^c, or `None` for no clipping (must be `None` for `Original`).
    pub clip_exponent: Option<f64>,
    pub variant: AdoptVariant,
}

impl Default for AdoptConfig {
    /// The reference defaults: lr 1e-3, betas (0.9, 0.9999), eps 1e-6, no weight decay,
    /// coupled decay, clip exponent 0.25, the `torch-adopt` 0.1.0 rules.
    fn default() -> Self {
        Self {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.9999,
            eps: 1e-6,
            weight_decay: 0.0,
            decouple: false,
            clip_exponent: Some(0.25),
            variant: AdoptVariant::Release,
        }
    }
}

/// ADOPT over a set of parameters.
pub struct Adopt {
    slots: Slots,
    cfg: AdoptConfig,
}

impl Adopt {
    /// An optimizer with zeroed state over named parameters.
    pub fn with_params(params: Vec<Param>, cfg: AdoptConfig) -> Result<Self> {
        check_common(cfg.lr, cfg.beta1, cfg.beta2, cfg.eps, &params)?;
        if let Some(c) = cfg.clip_exponent {
            if !(c.is_finite() && c > 0.0) {
                bail!("clip_exponent must be positive, got {c}");
            }
            if cfg.variant == AdoptVariant::Original {
                bail!("the original ADOPT has no clipping: set clip_exponent to none");
            }
        }
        Ok(Self {
            slots: Slots::new(params)?,
            cfg,
        })
    }

    /// The hyperparameters.
    pub fn config(&self) -> &AdoptConfig {
        &self.cfg
    }

    /// `false` runs the update as candle tensor ops instead of the fused CPU or CUDA kernel (the
    /// reference they are tested against); the state carries over.
    pub fn set_fused(&mut self, fused: bool) -> Result<()> {
        self.slots.set_fused(fused)
    }

    /// This step's coefficients for a parameter that has had `steps_before` updates.
    fn rule(cfg: &AdoptConfig, param: &Param, steps_before: u64, lr: f64) -> Update {
        let wd = param.weight_decay;
        let coupled_wd = if cfg.decouple { 0.0 } else { wd };
        let decay_alpha = if cfg.decouple { -lr * wd } else { 0.0 };
        match cfg.variant {
            AdoptVariant::Release if steps_before == 0 => Update::AdoptInit {
                coupled_wd,
                decay_alpha: 0.0,
            },
            AdoptVariant::Release => Update::Adopt {
                beta1: cfg.beta1,
                beta2: cfg.beta2,
                eps: cfg.eps,
                coupled_wd,
                decay_alpha,
                lr,
                clip: cfg.clip_exponent.map(|c| (steps_before as f64).powf(c)),
            },
            AdoptVariant::Original if steps_before == 0 => Update::AdoptInit {
                coupled_wd,
                decay_alpha,
            },
            AdoptVariant::Original => Update::Adopt {
                // s = 2 sets m ← ĝ: a lerp with weight 1 is exactly that.
                beta1: if steps_before == 1 { 0.0 } else { cfg.beta1 },
                beta2: cfg.beta2,
                eps: cfg.eps,
                coupled_wd,
                decay_alpha,
                lr,
                clip: None,
            },
        }
    }
}

super::impl_optimizer!(Adopt, AdoptConfig);
