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

#[cfg(test)]
mod tests {
    use super::*;

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
