//! Muon (Jordan et al. 2024, "Muon: An optimizer for hidden layers in neural networks") as
//! `torch.optim.Muon` (torch/optim/_muon.py) computes it, for 2-D parameters:
//!
//! - buf ← lerp(buf, g, 1−μ) (= μ·buf + (1−μ)·g);
//! - u ← lerp(g, buf, μ) with Nesterov momentum, else buf;
//! - O ← Newton–Schulz(u): u in the iteration's precision, transposed when it has more rows than
//!   columns, divided by its Frobenius norm clamped at `eps`, then `ns_steps` times
//!   A ← X·Xᵀ, B ← b·A + c·A·A, X ← a·X + B·X; transposed back;
//! - θ ← θ·(1 − lr·wd); θ ← θ − lr·adjust(rows, cols)·O.
//!
//! Unlike the Adam family the update is not elementwise: the iteration multiplies whole matrices.
//! Its state is one momentum buffer per parameter (`momentum_buffer.NAME`) and the step count
//! (`step.NAME`). The iteration runs in `bf16` by default, as PyTorch's: operands rounded to
//! bf16, products summed in f32 and rounded back to bf16 after every operation, as PyTorch's CPU
//! bf16 kernels do; `f32` and `f64` run it in that precision.

use super::kernel::lerp_tensors;
use super::{check_state_count, saved_state, saved_step, Optimizer, Param};
use candle_core::backprop::GradStore;
use candle_core::{bail, DType, Result, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};

/// How the learning rate scales with a matrix's shape (rows A, columns B).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AdjustLr {
    /// Keller Jordan's: lr·√max(1, A/B).
    Original,
    /// Moonshot's (Liu et al. 2025), to match AdamW's update RMS: lr·0.2·√max(A, B).
    MatchRmsAdamw,
    /// Bernstein's spectral condition: lr·√(A/B).
    SpectralUnclamped,
}

impl AdjustLr {
    /// The factor on the learning rate for a `rows × cols` matrix.
    pub fn factor(self, rows: usize, cols: usize) -> f64 {
        let (a, b) = (rows as f64, cols as f64);
        match self {
            AdjustLr::Original => (a / b).max(1.0).sqrt(),
            AdjustLr::MatchRmsAdamw => 0.2 * a.max(b).sqrt(),
            AdjustLr::SpectralUnclamped => (a / b).sqrt(),
        }
    }
}

/// The precision of the Newton–Schulz iteration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NewtonSchulzPrecision {
    /// PyTorch's: bf16 values, f32 sums.
    Bf16,
    F32,
    F64,
}

/// Muon's hyperparameters; the defaults are `torch.optim.Muon`'s.
#[derive(Debug, Clone, PartialEq)]
pub struct MuonConfig {
    pub lr: f64,
    /// μ.
    pub momentum: f64,
    pub nesterov: bool,
    /// Decoupled: θ ← θ·(1 − lr·wd) before the update (each [`Param`] carries its own).
    pub weight_decay: f64,
    pub ns_steps: usize,
    /// (a, b, c) of the quintic iteration.
    pub ns_coefficients: [f64; 3],
    /// The floor of the Frobenius norm the iteration's input is divided by.
    pub eps: f64,
    pub adjust_lr: AdjustLr,
    pub newton_schulz_precision: NewtonSchulzPrecision,
}

impl Default for MuonConfig {
    fn default() -> Self {
        MuonConfig {
            lr: 1e-3,
            momentum: 0.95,
            nesterov: true,
            weight_decay: 0.1,
            ns_steps: 5,
            ns_coefficients: [3.4445, -4.775, 2.0315],
            eps: 1e-7,
            adjust_lr: AdjustLr::Original,
            newton_schulz_precision: NewtonSchulzPrecision::Bf16,
        }
    }
}

impl MuonConfig {
    /// Checks the values PyTorch checks, and the ones a run would fail on later.
    pub fn check(&self) -> Result<()> {
        if !(self.lr.is_finite() && self.lr >= 0.0) {
            bail!("muon lr must be >= 0, got {}", self.lr);
        }
        if !(0.0..1.0).contains(&self.momentum) {
            bail!("muon momentum must be in [0, 1), got {}", self.momentum);
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            bail!("muon weight_decay must be >= 0, got {}", self.weight_decay);
        }
        if !(1..100).contains(&self.ns_steps) {
            bail!("ns_steps must be in 1..=99, got {}", self.ns_steps);
        }
        if self.ns_coefficients.iter().any(|c| !c.is_finite()) {
            bail!(
                "ns_coefficients must be finite, got {:?}",
                self.ns_coefficients
            );
        }
        if !(self.eps.is_finite() && self.eps > 0.0) {
            bail!("muon eps must be > 0, got {}", self.eps);
        }
        Ok(())
    }
}

/// One 2-D parameter with its momentum buffer and step count.
struct MuonSlot {
    param: Param,
    buffer: Tensor,
    step: u64,
}

/// Muon over 2-D parameters (see the module docs).
pub struct Muon {
    slots: Vec<MuonSlot>,
    cfg: MuonConfig,
}

impl Muon {
    /// Muon over `params`, each 2-D; a parameter's `weight_decay` is its decoupled decay.
    pub fn with_params(params: Vec<Param>, cfg: MuonConfig) -> Result<Self> {
        cfg.check()?;
        let mut seen = std::collections::HashSet::new();
        let slots = params
            .into_iter()
            .map(|param| {
                if param.var.rank() != 2 {
                    bail!(
                        "Muon updates 2-D matrices; {} has shape {:?}",
                        param.name,
                        param.var.dims()
                    );
                }
                if !seen.insert(param.name.clone()) {
                    bail!("two parameters are named {}", param.name);
                }
                Ok(MuonSlot {
                    buffer: param.var.as_tensor().zeros_like()?,
                    param,
                    step: 0,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Muon { slots, cfg })
    }

    /// The hyperparameters.
    pub fn config(&self) -> &MuonConfig {
        &self.cfg
    }
}

/// Newton–Schulz orthogonalisation of a 2-D `update` in `precision`, returned in `update`'s dtype.
pub fn newton_schulz(update: &Tensor, cfg: &MuonConfig) -> Result<Tensor> {
    let (rows, cols) = update.dims2()?;
    let bf16 = cfg.newton_schulz_precision == NewtonSchulzPrecision::Bf16;
    let work = match cfg.newton_schulz_precision {
        NewtonSchulzPrecision::F64 => DType::F64,
        _ => DType::F32,
    };
    // bf16 values held in f32: every result is rounded to bf16, as a bf16 tensor op's would be.
    let round = |t: Tensor| -> Result<Tensor> {
        if bf16 {
            t.to_dtype(DType::BF16)?.to_dtype(DType::F32)
        } else {
            Ok(t)
        }
    };
    let mut x = round(update.to_dtype(work)?)?;
    let transposed = rows > cols;
    if transposed {
        x = x.t()?.contiguous()?;
    }
    let norm = round(x.sqr()?.sum_all()?.sqrt()?)?;
    let eps = round(Tensor::new(cfg.eps, x.device())?.to_dtype(work)?)?;
    x = round(x.broadcast_div(&norm.maximum(&eps)?)?)?;
    let [a, b, c] = cfg.ns_coefficients;
    for _ in 0..cfg.ns_steps {
        let gram = round(x.matmul(&x.t()?)?)?;
        let gram_update = round(((gram.matmul(&gram)? * c)? + (&gram * b)?)?)?;
        x = round(((&x * a)? + gram_update.matmul(&x)?)?)?;
    }
    if transposed {
        x = x.t()?.contiguous()?;
    }
    x.to_dtype(update.dtype())
}

impl Optimizer for Muon {
    fn update(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        let cfg = &self.cfg;
        for slot in &mut self.slots {
            let var = &slot.param.var;
            let Some(grad) = grads.get(var.as_tensor()) else {
                continue;
            };
            if grad.dims() != var.dims() {
                bail!(
                    "gradient of {} has shape {:?}, the parameter {:?}",
                    slot.param.name,
                    grad.dims(),
                    var.dims()
                );
            }
            let grad = grad.to_dtype(var.dtype())?.detach();
            slot.buffer = lerp_tensors(&slot.buffer, &grad, 1.0 - cfg.momentum)?.detach();
            let update = match cfg.nesterov {
                true => lerp_tensors(&grad, &slot.buffer, cfg.momentum)?,
                false => slot.buffer.clone(),
            };
            let orthogonal = newton_schulz(&update, cfg)?;
            let (rows, cols) = var.dims2()?;
            let adjusted_lr = lr * cfg.adjust_lr.factor(rows, cols);
            let theta = var.as_tensor().detach();
            let decayed = (theta * (1.0 - lr * slot.param.weight_decay))?;
            var.set(&(decayed - (orthogonal * adjusted_lr)?)?)?;
            slot.step += 1;
        }
        Ok(())
    }

    fn state_tensors(&self) -> Result<BTreeMap<String, Tensor>> {
        let mut out = BTreeMap::new();
        for slot in &self.slots {
            let name = &slot.param.name;
            out.insert(format!("momentum_buffer.{name}"), slot.buffer.clone());
            let step = Tensor::new(&[slot.step as i64], slot.param.var.device())?;
            out.insert(format!("step.{name}"), step);
        }
        Ok(out)
    }

    fn load_state_tensors(&mut self, tensors: &HashMap<String, Tensor>) -> Result<()> {
        check_state_count(tensors, 2 * self.slots.len())?;
        for slot in &mut self.slots {
            let buffer = saved_state(tensors, "momentum_buffer", &slot.param)?;
            slot.step = saved_step(tensors, &slot.param.name)?;
            slot.buffer = buffer
                .to_dtype(slot.param.var.dtype())?
                .to_device(slot.param.var.device())?;
        }
        Ok(())
    }

    fn steps_taken(&self) -> u64 {
        self.slots.first().map_or(0, |s| s.step)
    }
}

/// Muon on some 2-D parameters and AdamW on the rest, as modded-nanogpt and PyTorch's Muon
/// documentation pair them: the step's lr goes to Muon as it is and to AdamW scaled by
/// `adamw.lr / muon.lr`, so one schedule drives both peaks.
pub struct MuonWithAdamW {
    muon: Muon,
    adamw: super::Adam,
    adamw_lr_scale: f64,
}

impl MuonWithAdamW {
    /// Muon over `matrices` (each 2-D), AdamW over `others`.
    pub fn new(
        matrices: Vec<Param>,
        others: Vec<Param>,
        muon: MuonConfig,
        adamw: super::AdamConfig,
    ) -> Result<Self> {
        if muon.lr <= 0.0 {
            bail!(
                "muon lr must be > 0 to scale AdamW's lr by, got {}",
                muon.lr
            );
        }
        let adamw_lr_scale = adamw.lr / muon.lr;
        Ok(MuonWithAdamW {
            muon: Muon::with_params(matrices, muon)?,
            adamw: super::Adam::with_params(others, adamw)?,
            adamw_lr_scale,
        })
    }
}

impl Optimizer for MuonWithAdamW {
    fn update(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        self.muon.update(grads, lr)?;
        self.adamw.update(grads, lr * self.adamw_lr_scale)
    }

    fn state_tensors(&self) -> Result<BTreeMap<String, Tensor>> {
        let mut state = self.muon.state_tensors()?;
        for (name, tensor) in self.adamw.state_tensors()? {
            if state.insert(name.clone(), tensor).is_some() {
                bail!("Muon and AdamW both hold optimizer state {name}");
            }
        }
        Ok(state)
    }

    fn load_state_tensors(&mut self, tensors: &HashMap<String, Tensor>) -> Result<()> {
        let muon_names = self.muon.state_tensors()?;
        let (muon, adamw): (HashMap<String, Tensor>, HashMap<String, Tensor>) = tensors
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .partition(|(k, _)| muon_names.contains_key(k));
        self.muon.load_state_tensors(&muon)?;
        self.adamw.load_state_tensors(&adamw)
    }

    fn steps_taken(&self) -> u64 {
        self.muon.steps_taken().max(self.adamw.steps_taken())
    }
}
