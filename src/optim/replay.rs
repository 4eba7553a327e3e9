//! Replays an optimizer fixture: given initial parameters and the gradient of every step, the
//! parameters after each step. `gpt-pretrain optim replay FILE.json` and the PyTorch fixture tests
//! (`tests/fixtures/optim/`, written by `scripts/optim_fixtures.py`) run through here.
//!
//! Input: `{"optimizer": "adam"|"adamw"|"adopt"|"muon", "hyperparameters": {…}, "dtype":
//! "f32"|"f64", "params": {name: nested list}, "grads": [{name: nested list}, … one per step]}`.
//! Hyperparameters: `lr, betas, eps, weight_decay`, for ADOPT also `decouple, clip_exponent`
//! (null: no clipping) and `variant`; for Muon `lr, momentum, nesterov, weight_decay, ns_steps,
//! ns_coefficients, eps, adjust_lr` ("original" | "match_rms_adamw" | "spectral_unclamped") and
//! `newton_schulz_dtype` ("bf16" | "f32" | "f64"), its parameters 2-D. Left out, a
//! hyperparameter takes the optimizer's default. Weight decay applies to every tensor, as in
//! PyTorch. Output: `{"steps": [{name: nested list}, …]}`.

use super::{
    Adam, AdamConfig, AdjustLr, Adopt, AdoptConfig, AdoptVariant, Muon, MuonConfig,
    NewtonSchulzPrecision, Optimizer, OptimizerKind, Param,
};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use serde::Deserialize;
use serde_json::{Map, Value};
use std::collections::BTreeMap;

/// Hyperparameters as a fixture states them.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FixtureHyperparameters {
    pub lr: Option<f64>,
    pub betas: Option<[f64; 2]>,
    pub eps: Option<f64>,
    pub weight_decay: Option<f64>,
    pub decouple: Option<bool>,
    /// `null` means no clipping; absent means the default (0.25).
    #[serde(default, deserialize_with = "present_or_null")]
    pub clip_exponent: Option<Option<f64>>,
    pub variant: Option<AdoptVariant>,
    pub momentum: Option<f64>,
    pub nesterov: Option<bool>,
    pub ns_steps: Option<usize>,
    pub ns_coefficients: Option<[f64; 3]>,
    pub adjust_lr: Option<AdjustLr>,
    pub newton_schulz_dtype: Option<NewtonSchulzPrecision>,
}

impl FixtureHyperparameters {
    /// The Muon-only keys this fixture sets.
    fn muon_keys(&self) -> Vec<&'static str> {
        [
            ("momentum", self.momentum.is_some()),
            ("nesterov", self.nesterov.is_some()),
            ("ns_steps", self.ns_steps.is_some()),
            ("ns_coefficients", self.ns_coefficients.is_some()),
            ("adjust_lr", self.adjust_lr.is_some()),
            ("newton_schulz_dtype", self.newton_schulz_dtype.is_some()),
        ]
        .into_iter()
        .filter_map(|(key, set)| set.then_some(key))
        .collect()
    }
}

/// The optimizers a fixture may name: the training ones and Muon.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FixtureOptimizer {
    Adam,
    AdamW,
    Adopt,
    Muon,
}

fn present_or_null<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<Option<Option<f64>>, D::Error> {
    Ok(Some(Option::deserialize(d)?))
}

/// A fixture's input part.
#[derive(Debug, Deserialize)]
pub struct Fixture {
    pub optimizer: FixtureOptimizer,
    #[serde(default)]
    pub hyperparameters: FixtureHyperparameters,
    pub dtype: String,
    pub params: Map<String, Value>,
    pub grads: Vec<Map<String, Value>>,
}

/// A nested JSON list as a shape and row-major values.
fn flatten(value: &Value, what: &str) -> Result<(Vec<usize>, Vec<f64>)> {
    match value {
        Value::Number(n) => Ok((vec![], vec![n.as_f64().context("number")?])),
        Value::Array(items) => {
            let mut shape = None;
            let mut values = Vec::new();
            for item in items {
                let (s, v) = flatten(item, what)?;
                if shape.get_or_insert_with(|| s.clone()) != &s {
                    bail!("{what} is a ragged list");
                }
                values.extend(v);
            }
            let mut full = vec![items.len()];
            full.extend(shape.unwrap_or_default());
            Ok((full, values))
        }
        _ => bail!("{what} must be a number or a nested list of numbers"),
    }
}

/// Row-major values back into a nested list of `shape`.
fn nest(values: &[f64], shape: &[usize]) -> Value {
    match shape {
        [] => Value::from(values[0]),
        [n, rest @ ..] => {
            let stride: usize = rest.iter().product();
            Value::Array(
                (0..*n)
                    .map(|i| nest(&values[i * stride..(i + 1) * stride], rest))
                    .collect(),
            )
        }
    }
}

impl Fixture {
    fn dtype(&self) -> Result<DType> {
        match self.dtype.as_str() {
            "f32" => Ok(DType::F32),
            "f64" => Ok(DType::F64),
            d => bail!("dtype must be f32 or f64, got {d}"),
        }
    }

    /// The parameters after each step, replayed in `dtype` (the fixture's when `None`), through
    /// the fused CPU kernel or (`fused = false`) plain tensor ops.
    pub fn replay(
        &self,
        dtype: Option<DType>,
        fused: bool,
    ) -> Result<Vec<BTreeMap<String, Value>>> {
        self.replay_on(&Device::Cpu, dtype, fused)
    }

    /// [`Fixture::replay`] with the parameters on `device` (fused applies on CPU only).
    pub fn replay_on(
        &self,
        device: &Device,
        dtype: Option<DType>,
        fused: bool,
    ) -> Result<Vec<BTreeMap<String, Value>>> {
        let dtype = match dtype {
            Some(d) => d,
            None => self.dtype()?,
        };
        let device = device.clone();
        let h = &self.hyperparameters;
        let mut names: Vec<&String> = self.params.keys().collect();
        names.sort();
        let mut params = Vec::new();
        let mut shapes = BTreeMap::new();
        for name in &names {
            let (shape, values) = flatten(&self.params[*name], &format!("params.{name}"))?;
            let t = Tensor::from_vec(values, shape.as_slice(), &device)?.to_dtype(dtype)?;
            shapes.insert(name.to_string(), shape);
            params.push(Param {
                name: name.to_string(),
                var: Var::from_tensor(&t)?,
                weight_decay: 0.0,
            });
        }
        let muon_keys = h.muon_keys();
        if self.optimizer != FixtureOptimizer::Muon && !muon_keys.is_empty() {
            bail!("{} apply to muon only", muon_keys.join(", "));
        }
        let kind = match self.optimizer {
            FixtureOptimizer::Adam => OptimizerKind::Adam,
            FixtureOptimizer::AdamW => OptimizerKind::AdamW,
            FixtureOptimizer::Adopt | FixtureOptimizer::Muon => OptimizerKind::Adopt,
        };
        let mut lr = opt_lr(h, kind);
        let mut opt: Box<dyn Optimizer> = match self.optimizer {
            FixtureOptimizer::Muon => {
                if h.betas.is_some() || h.decouple.is_some() || h.clip_exponent.is_some() {
                    bail!("betas, decouple and clip_exponent do not apply to muon");
                }
                if h.variant.is_some() {
                    bail!("variant applies to adopt only");
                }
                let d = MuonConfig::default();
                let cfg = MuonConfig {
                    lr: h.lr.unwrap_or(d.lr),
                    momentum: h.momentum.unwrap_or(d.momentum),
                    nesterov: h.nesterov.unwrap_or(d.nesterov),
                    weight_decay: h.weight_decay.unwrap_or(d.weight_decay),
                    ns_steps: h.ns_steps.unwrap_or(d.ns_steps),
                    ns_coefficients: h.ns_coefficients.unwrap_or(d.ns_coefficients),
                    eps: h.eps.unwrap_or(d.eps),
                    adjust_lr: h.adjust_lr.unwrap_or(d.adjust_lr),
                    newton_schulz_precision: h
                        .newton_schulz_dtype
                        .unwrap_or(d.newton_schulz_precision),
                };
                lr = cfg.lr;
                for p in &mut params {
                    p.weight_decay = cfg.weight_decay;
                }
                Box::new(Muon::with_params(params.clone(), cfg)?)
            }
            FixtureOptimizer::Adam | FixtureOptimizer::AdamW => {
                if h.decouple.is_some() || h.clip_exponent.is_some() || h.variant.is_some() {
                    bail!("decouple, clip_exponent and variant apply to adopt only");
                }
                let d = AdamConfig::defaults(kind);
                let cfg = AdamConfig {
                    lr: h.lr.unwrap_or(d.lr),
                    beta1: h.betas.map_or(d.beta1, |b| b[0]),
                    beta2: h.betas.map_or(d.beta2, |b| b[1]),
                    eps: h.eps.unwrap_or(d.eps),
                    weight_decay: h.weight_decay.unwrap_or(d.weight_decay),
                    decoupled: d.decoupled,
                };
                for p in &mut params {
                    p.weight_decay = cfg.weight_decay;
                }
                let mut adam = Adam::with_params(params.clone(), cfg)?;
                adam.set_fused(fused)?;
                Box::new(adam)
            }
            FixtureOptimizer::Adopt => {
                let d = AdoptConfig::default();
                let variant = h.variant.unwrap_or(d.variant);
                let default_clip = match variant {
                    AdoptVariant::Release => d.clip_exponent,
                    AdoptVariant::Original => None,
                };
                let cfg = AdoptConfig {
                    lr: h.lr.unwrap_or(d.lr),
                    beta1: h.betas.map_or(d.beta1, |b| b[0]),
                    beta2: h.betas.map_or(d.beta2, |b| b[1]),
                    eps: h.eps.unwrap_or(d.eps),
                    weight_decay: h.weight_decay.unwrap_or(d.weight_decay),
                    decouple: h.decouple.unwrap_or(d.decouple),
                    clip_exponent: h.clip_exponent.unwrap_or(default_clip),
                    variant,
                };
                for p in &mut params {
                    p.weight_decay = cfg.weight_decay;
                }
                let mut adopt = Adopt::with_params(params.clone(), cfg)?;
                adopt.set_fused(fused)?;
                Box::new(adopt)
            }
        };
        let mut steps = Vec::with_capacity(self.grads.len());
        for (i, grads) in self.grads.iter().enumerate() {
            // The gradient of sum(θ ⊙ G) with respect to θ is exactly G: this turns given values
            // into the GradStore that optimizers take.
            let mut loss = Tensor::zeros((), dtype, &device)?;
            for p in &params {
                let value = grads
                    .get(&p.name)
                    .with_context(|| format!("grads[{i}] lacks {}", p.name))?;
                let (shape, values) = flatten(value, &format!("grads[{i}].{}", p.name))?;
                if shape != shapes[&p.name] {
                    bail!(
                        "grads[{i}].{} has shape {shape:?}, the parameter {:?}",
                        p.name,
                        shapes[&p.name]
                    );
                }
                let g = Tensor::from_vec(values, shape.as_slice(), &device)?.to_dtype(dtype)?;
                loss = (loss + p.var.as_tensor().mul(&g)?.sum_all()?)?;
            }
            if let Some(extra) = grads.keys().find(|k| !shapes.contains_key(*k)) {
                bail!("grads[{i}] has {extra}, which is not a parameter");
            }
            opt.update(&loss.backward()?, lr)?;
            let mut out = BTreeMap::new();
            for p in &params {
                let values: Vec<f64> = p
                    .var
                    .as_tensor()
                    .to_dtype(DType::F64)?
                    .flatten_all()?
                    .to_vec1()?;
                out.insert(p.name.clone(), nest(&values, &shapes[&p.name]));
            }
            steps.push(out);
        }
        Ok(steps)
    }
}

fn opt_lr(h: &FixtureHyperparameters, kind: OptimizerKind) -> f64 {
    h.lr.unwrap_or(match kind {
        OptimizerKind::Adopt => AdoptConfig::default().lr,
        k => AdamConfig::defaults(k).lr,
    })
}

/// Reads a fixture file.
pub fn read_fixture(path: &std::path::Path) -> Result<Fixture> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let value: Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))?;
    // Fixtures may carry the expected output and a provenance note beside the input.
    let mut input = match value {
        Value::Object(map) => map,
        _ => bail!("{} must hold a JSON object", path.display()),
    };
    input.remove("expected");
    input.remove("source");
    serde_json::from_value(Value::Object(input))
        .with_context(|| format!("{} is not an optimizer fixture", path.display()))
}

/// Flattens one step's output into name → values (for comparisons).
pub fn flat_values(step: &BTreeMap<String, Value>) -> Result<BTreeMap<String, Vec<f64>>> {
    step.iter()
        .map(|(k, v)| Ok((k.clone(), flatten(v, k)?.1)))
        .collect()
}

/// Flattens a nested-list JSON value.
pub fn flat(value: &Value) -> Result<Vec<f64>> {
    Ok(flatten(value, "value")?.1)
}
