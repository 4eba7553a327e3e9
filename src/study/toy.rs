//! The online convex problem the ADOPT paper (Taniguchi et al., 2024, section 5 / figure 1) uses
//! to show that Adam can fail to converge for a β2 that is too small for the problem, while ADOPT
//! converges for any β2.
//!
//! Loss f_t(θ) = g_t·θ on θ ∈ [−1, 1] (projection after each step), θ0 = 0, where the stochastic
//! gradient g_t is k² with probability 1/k and −k otherwise: E\[g\] = 1, so the optimum is θ* = −1.
//! Learning rate α_t = α / sqrt(1 + α·t), α = 0.01, β1 = 0.9. The updates are our optimizers' own.

use crate::optim::{
    Adam, AdamConfig, Adopt, AdoptConfig, AdoptVariant, Optimizer, OptimizerKind, Param,
};
use anyhow::Result;
use candle_core::{DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Which optimizer runs the toy problem.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToyOptimizer {
    /// `torch.optim.Adam` (eps 1e-8).
    Adam,
    /// ADOPT as released (torch-adopt 0.1.0: clipping at s^0.25, eps 1e-6).
    Adopt,
    /// The original ADOPT (no clipping), the algorithm the paper analyses.
    AdoptOriginal,
}

impl ToyOptimizer {
    /// A short label for tables and legends.
    pub fn label(self) -> &'static str {
        match self {
            Self::Adam => "Adam",
            Self::Adopt => "ADOPT (clipped)",
            Self::AdoptOriginal => "ADOPT (original)",
        }
    }
}

/// One run of the toy problem.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ToyRun {
    pub k: f64,
    pub beta1: f64,
    pub beta2: f64,
    /// α in α_t = α / sqrt(1 + α·t).
    pub alpha: f64,
    pub steps: usize,
    pub seed: u64,
}

/// θ after every step (`steps` values).
pub fn simulate(optimizer: ToyOptimizer, run: &ToyRun) -> Result<Vec<f64>> {
    let device = Device::Cpu;
    let theta = Var::from_tensor(&Tensor::zeros(1, DType::F64, &device)?)?;
    let params = vec![Param {
        name: "theta".into(),
        var: theta.clone(),
        weight_decay: 0.0,
    }];
    let mut opt: Box<dyn Optimizer> = match optimizer {
        ToyOptimizer::Adam => Box::new(Adam::with_params(
            params,
            AdamConfig {
                beta1: run.beta1,
                beta2: run.beta2,
                ..AdamConfig::defaults(OptimizerKind::Adam)
            },
        )?),
        ToyOptimizer::Adopt | ToyOptimizer::AdoptOriginal => {
            let original = optimizer == ToyOptimizer::AdoptOriginal;
            Box::new(Adopt::with_params(
                params,
                AdoptConfig {
                    beta1: run.beta1,
                    beta2: run.beta2,
                    clip_exponent: if original { None } else { Some(0.25) },
                    variant: if original {
                        AdoptVariant::Original
                    } else {
                        AdoptVariant::Release
                    },
                    ..AdoptConfig::default()
                },
            )?)
        }
    };
    // The gradient takes only two values, so two gradient stores serve every step: the gradient
    // of sum(θ·c) with respect to θ is exactly c.
    let store_for = |c: f64| -> Result<_> {
        let c = Tensor::new(&[c], &device)?;
        Ok(theta.as_tensor().mul(&c)?.sum_all()?.backward()?)
    };
    let (rare, common) = (store_for(run.k * run.k)?, store_for(-run.k)?);
    let mut rng = ChaCha8Rng::seed_from_u64(run.seed);
    let mut trajectory = Vec::with_capacity(run.steps);
    for t in 0..run.steps {
        let lr = run.alpha / (1.0 + run.alpha * t as f64).sqrt();
        let grads = if rng.random_bool(1.0 / run.k) {
            &rare
        } else {
            &common
        };
        opt.update(grads, lr)?;
        let updated = theta.as_tensor().to_vec1::<f64>()?[0];
        let value = updated.clamp(-1.0, 1.0);
        if value != updated {
            theta.set(&Tensor::new(&[value], &device)?)?;
        }
        trajectory.push(value);
    }
    Ok(trajectory)
}
