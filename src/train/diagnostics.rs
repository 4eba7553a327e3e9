//! Per-layer optimizer diagnostics, every `diag_interval` steps: for each parameter group (or
//! tensor) the gradient norm, the norm of the update actually applied (after clipping and weight
//! decay), the weight norm, and the update-to-weight ratio that optimizer papers plot. Reading
//! only: a step with diagnostics computes the same bits as one without.

use crate::model::Params;
use crate::ops::grad_norm::sum_of_squares;
use anyhow::Result;
use candle_core::backprop::GradStore;
use candle_core::Tensor;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// What the diagnostics sum over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiagGranularity {
    /// The embeddings, each block's attention and MLP matrices, all LayerNorms, all linear
    /// biases ([`group_of`]).
    Group,
    /// Each parameter tensor by its Hugging Face name.
    Tensor,
}

/// The group of a GPT-2 parameter (Hugging Face names): `embedding` (wte, wpe),
/// `block.N.attn` and `block.N.mlp` (their linear weights), `layernorm` (every LayerNorm's gain
/// and bias), `bias` (every linear layer's bias); anything else is its own group.
pub fn group_of(name: &str) -> String {
    let name = name.strip_prefix("transformer.").unwrap_or(name);
    if name.starts_with("wte.") || name.starts_with("wpe.") {
        return "embedding".into();
    }
    let parts: Vec<&str> = name.split('.').collect();
    if parts.iter().any(|p| p.starts_with("ln_")) {
        return "layernorm".into();
    }
    if parts.last() == Some(&"bias") {
        return "bias".into();
    }
    match parts.as_slice() {
        ["h", layer, module @ ("attn" | "mlp"), ..] => format!("block.{layer}.{module}"),
        _ => name.to_string(),
    }
}

/// Sums of squares per key, in f64.
#[derive(Debug, Default, Clone, PartialEq)]
struct SquareSums(BTreeMap<String, f64>);

impl SquareSums {
    fn add(&mut self, key: String, sum: f64) {
        *self.0.entry(key).or_insert(0.0) += sum;
    }
}

/// The step's state before its update: the parameters (copied) and the gradients' norms.
pub struct BeforeUpdate {
    granularity: DiagGranularity,
    params: Vec<(String, Tensor)>,
    grad: SquareSums,
}

/// The key a tensor's figures are summed under.
fn key(granularity: DiagGranularity, name: &str) -> String {
    match granularity {
        DiagGranularity::Group => group_of(name),
        DiagGranularity::Tensor => name.to_string(),
    }
}

impl BeforeUpdate {
    /// Copies the parameters and sums the squares of their gradients (as computed, before
    /// clipping), per key.
    pub fn capture(
        params: &Params,
        grads: &GradStore,
        granularity: DiagGranularity,
    ) -> Result<Self> {
        let mut grad = SquareSums::default();
        let mut copies = Vec::new();
        for (name, var) in params.named_vars() {
            if let Some(g) = grads.get(var.as_tensor()) {
                grad.add(key(granularity, &name), sum_of_squares(g)?);
            }
            copies.push((name, var.as_tensor().copy()?));
        }
        Ok(Self {
            granularity,
            params: copies,
            grad,
        })
    }

    /// The figures once the update is applied, as flat metrics keys
    /// (`update_weight_ratio/block.3.mlp`, …): `grad_norm`, `update_norm` ‖θ′ − θ‖,
    /// `weight_norm` ‖θ′‖ and `update_weight_ratio` ‖θ′ − θ‖ / ‖θ‖ of each key.
    pub fn after(self, params: &Params) -> Result<serde_json::Map<String, serde_json::Value>> {
        let mut update = SquareSums::default();
        let mut before = SquareSums::default();
        let mut after = SquareSums::default();
        for (name, old) in &self.params {
            let new = params.get(name)?.as_tensor();
            let k = key(self.granularity, name);
            update.add(k.clone(), sum_of_squares(&(new - old)?)?);
            before.add(k.clone(), sum_of_squares(old)?);
            after.add(k, sum_of_squares(new)?);
        }
        let mut out = serde_json::Map::new();
        for (k, &sum) in &self.grad.0 {
            out.insert(format!("grad_norm/{k}"), sum.sqrt().into());
        }
        for (k, &sum) in &update.0 {
            let weight = before.0[k].sqrt();
            out.insert(format!("update_norm/{k}"), sum.sqrt().into());
            out.insert(format!("weight_norm/{k}"), after.0[k].sqrt().into());
            if weight > 0.0 {
                out.insert(
                    format!("update_weight_ratio/{k}"),
                    (sum.sqrt() / weight).into(),
                );
            }
        }
        Ok(out)
    }
}

/// The root mean square of each key's normalised update, the direction that the lr scales,
/// from the optimizer's state after its step: Adam's and AdamW's
/// m̂ / (√v̂ + eps) with m̂ = m / (1 − β1ᵗ), v̂ = v / (1 − β2ᵗ) (torch.optim.Adam's), and ADOPT's
/// m (its update is lr · m). Weight decay is not part of it. Keys as
/// `normalized_update_rms/K`.
pub fn normalized_update_rms(
    state: &BTreeMap<String, Tensor>,
    settings: &crate::optim::OptimizerSettings,
    granularity: DiagGranularity,
) -> Result<serde_json::Map<String, serde_json::Value>> {
    use crate::optim::OptimizerSettings;
    use candle_core::DType;
    let mut squares = SquareSums::default();
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for (state_name, m) in state {
        let Some(name) = state_name.strip_prefix("exp_avg.") else {
            continue;
        };
        let m = m.to_dtype(DType::F64)?;
        let update = match settings {
            OptimizerSettings::Adopt(_) => m,
            // Muon's state holds no normalised update; its AdamW part's does.
            OptimizerSettings::Adam(c) | OptimizerSettings::Muon { adamw: c, .. } => {
                let (Some(v), Some(step)) = (
                    state.get(&format!("exp_avg_sq.{name}")),
                    state.get(&format!("step.{name}")),
                ) else {
                    continue;
                };
                let t = step.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?[0];
                if t < 1.0 {
                    continue;
                }
                let m_hat = (m / (1.0 - c.beta1.powf(t)))?;
                let v_hat = (v.to_dtype(DType::F64)? / (1.0 - c.beta2.powf(t)))?;
                (m_hat / (v_hat.sqrt()? + c.eps)?)?
            }
        };
        let k = key(granularity, name);
        *counts.entry(k.clone()).or_insert(0) += update.elem_count();
        squares.add(k, sum_of_squares(&update)?);
    }
    Ok(squares
        .0
        .iter()
        .map(|(k, &sum)| {
            let rms = (sum / counts[k].max(1) as f64).sqrt();
            (format!("normalized_update_rms/{k}"), rms.into())
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adams_normalised_update_is_bias_corrected_and_adopts_is_its_moment() {
        use crate::optim::{AdamConfig, AdoptConfig, OptimizerKind, OptimizerSettings};
        let cpu = candle_core::Device::Cpu;
        let t = |v: &[f64]| Tensor::new(v, &cpu).unwrap();
        let state = BTreeMap::from([
            (
                "exp_avg.transformer.wte.weight".to_string(),
                t(&[0.1, -0.3]),
            ),
            (
                "exp_avg_sq.transformer.wte.weight".to_string(),
                t(&[0.04, 0.01]),
            ),
            (
                "step.transformer.wte.weight".to_string(),
                Tensor::new(&[2i64], &cpu).unwrap(),
            ),
        ]);
        let adam = AdamConfig {
            eps: 1e-8,
            beta1: 0.9,
            beta2: 0.999,
            ..AdamConfig::defaults(OptimizerKind::Adam)
        };
        let rms = normalized_update_rms(
            &state,
            &OptimizerSettings::Adam(adam),
            DiagGranularity::Group,
        )
        .unwrap();
        // t = 2: m̂ = m / 0.19, v̂ = v / 0.001999; u = m̂ / (√v̂ + 1e-8).
        let u = |m: f64, v: f64| (m / 0.19) / ((v / 0.001999f64).sqrt() + 1e-8);
        let expected = ((u(0.1, 0.04).powi(2) + u(-0.3, 0.01).powi(2)) / 2.0).sqrt();
        let got = rms["normalized_update_rms/embedding"].as_f64().unwrap();
        assert!(
            (got - expected).abs() < 1e-12 * expected,
            "{got} vs {expected}"
        );
        let adopt = OptimizerSettings::Adopt(AdoptConfig::default());
        let rms = normalized_update_rms(&state, &adopt, DiagGranularity::Tensor).unwrap();
        let expected = ((0.01f64 + 0.09) / 2.0).sqrt();
        let got = rms["normalized_update_rms/transformer.wte.weight"]
            .as_f64()
            .unwrap();
        assert!((got - expected).abs() < 1e-15, "{got}");
    }

    #[test]
    fn gpt2_names_fall_into_their_groups() {
        for (name, group) in [
            ("transformer.wte.weight", "embedding"),
            ("transformer.wpe.weight", "embedding"),
            ("transformer.h.0.ln_1.weight", "layernorm"),
            ("transformer.h.3.ln_2.bias", "layernorm"),
            ("transformer.ln_f.weight", "layernorm"),
            ("transformer.h.3.attn.c_attn.weight", "block.3.attn"),
            ("transformer.h.3.attn.c_proj.weight", "block.3.attn"),
            ("transformer.h.11.mlp.c_fc.weight", "block.11.mlp"),
            ("transformer.h.11.mlp.c_proj.bias", "bias"),
            ("lm_head.weight", "lm_head.weight"),
        ] {
            assert_eq!(group_of(name), group, "{name}");
        }
    }
}
