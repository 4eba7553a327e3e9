//! The model's shape: presets, the padded vocabulary, and the parameter tensors it implies (name,
//! shape, initialisation).

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

/// The model's shape.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GptConfig {
    pub n_layer: usize,
    pub n_head: usize,
    pub n_embd: usize,
    /// Longest context; the size of the position table.
    pub block_size: usize,
    /// Biases in linear layers and LayerNorms (GPT-2 has them).
    pub bias: bool,
    pub dropout: f64,
    /// Rows of the embedding table (the tokenizer's vocabulary padded to a multiple of 64).
    pub vocab_size: usize,
}

impl GptConfig {
    /// Named model shapes. The vocabulary is set later from the tokenizer.
    pub fn preset(name: &str) -> Result<Self> {
        let (n_layer, n_head, n_embd, block_size) = match name {
            "tiny" => (4, 4, 128, 128),
            // nanoGPT's Shakespeare model.
            "baby" => (6, 6, 384, 256),
            // GPT-2 small, 124M parameters.
            "gpt2" => (12, 12, 768, 1024),
            "gpt2-medium" => (24, 16, 1024, 1024),
            _ => bail!("unknown model preset '{name}' (expected tiny, baby, gpt2 or gpt2-medium)"),
        };
        Ok(Self {
            n_layer,
            n_head,
            n_embd,
            block_size,
            bias: true,
            dropout: 0.0,
            vocab_size: 50304,
        })
    }

    /// Pads a vocabulary to a multiple of 64 (50257 → 50304, as nanoGPT) for faster matmuls.
    /// The padded rows are never targets, so training drives their logits down.
    pub fn padded_vocab(vocab: usize) -> usize {
        vocab.div_ceil(64) * 64
    }

    /// Rejects shapes the model cannot build.
    pub fn validate(&self) -> Result<()> {
        if self.n_layer == 0 || self.n_head == 0 || self.n_embd == 0 || self.block_size == 0 {
            bail!("n_layer, n_head, n_embd and block_size must all be at least 1");
        }
        if !self.n_embd.is_multiple_of(self.n_head) {
            bail!(
                "n_embd ({}) must be a multiple of n_head ({})",
                self.n_embd,
                self.n_head
            );
        }
        if !(0.0..1.0).contains(&self.dropout) {
            bail!("dropout must be in [0, 1), got {}", self.dropout);
        }
        Ok(())
    }

    /// Every parameter tensor: name, shape and initialisation, in name order.
    pub fn parameter_specs(&self) -> Vec<ParamSpec> {
        let c = self.n_embd;
        let std = 0.02;
        // GPT-2 scales the residual projections by 1/sqrt(number of residual additions).
        let proj_std = 0.02 / ((2 * self.n_layer) as f64).sqrt();
        let mut specs = vec![
            ParamSpec::new(
                "transformer.wte.weight",
                &[self.vocab_size, c],
                Init::Normal(std),
            ),
            ParamSpec::new(
                "transformer.wpe.weight",
                &[self.block_size, c],
                Init::Normal(std),
            ),
            ParamSpec::new("transformer.ln_f.weight", &[c], Init::Ones),
        ];
        if self.bias {
            specs.push(ParamSpec::new("transformer.ln_f.bias", &[c], Init::Zeros));
        }
        for i in 0..self.n_layer {
            let p = |s: &str| format!("transformer.h.{i}.{s}");
            let mut layer = vec![
                (p("ln_1.weight"), vec![c], Init::Ones),
                (p("attn.c_attn.weight"), vec![3 * c, c], Init::Normal(std)),
                (p("attn.c_proj.weight"), vec![c, c], Init::Normal(proj_std)),
                (p("ln_2.weight"), vec![c], Init::Ones),
                (p("mlp.c_fc.weight"), vec![4 * c, c], Init::Normal(std)),
                (
                    p("mlp.c_proj.weight"),
                    vec![c, 4 * c],
                    Init::Normal(proj_std),
                ),
            ];
            if self.bias {
                layer.extend([
                    (p("ln_1.bias"), vec![c], Init::Zeros),
                    (p("attn.c_attn.bias"), vec![3 * c], Init::Zeros),
                    (p("attn.c_proj.bias"), vec![c], Init::Zeros),
                    (p("ln_2.bias"), vec![c], Init::Zeros),
                    (p("mlp.c_fc.bias"), vec![4 * c], Init::Zeros),
                    (p("mlp.c_proj.bias"), vec![c], Init::Zeros),
                ]);
            }
            specs.extend(layer.into_iter().map(|(name, shape, init)| ParamSpec {
                name,
                shape,
                init,
            }));
        }
        specs.sort_by(|a, b| a.name.cmp(&b.name));
        specs
    }

    /// Number of parameters (the tied `lm_head` counted once).
    pub fn n_params(&self) -> usize {
        self.parameter_specs()
            .iter()
            .map(|s| s.shape.iter().product::<usize>())
            .sum()
    }

    /// Training FLOPs per token as nanoGPT's `estimate_mfu` counts them: 6·N (N without the
    /// position table) + 12·L·C·T for attention.
    pub fn training_flops_per_token(&self) -> f64 {
        let n = (self.n_params() - self.block_size * self.n_embd) as f64;
        6.0 * n + 12.0 * (self.n_layer * self.n_embd * self.block_size) as f64
    }
}

/// How a parameter starts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Init {
    /// N(0, std²).
    Normal(f64),
    Zeros,
    Ones,
}

/// One parameter tensor's name, shape and initialisation.
#[derive(Debug, Clone, PartialEq)]
pub struct ParamSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub init: Init,
}

impl ParamSpec {
    fn new(name: &str, shape: &[usize], init: Init) -> Self {
        Self {
            name: name.to_string(),
            shape: shape.to_vec(),
            init,
        }
    }
}

/// Whether the parameter `name` of rank `rank` is one of the blocks' matrices (attention and
/// MLP weights), which Muon updates; the embeddings (and the lm_head tied to one), LayerNorms and
/// biases are not.
pub fn is_hidden_matrix(name: &str, rank: usize) -> bool {
    rank == 2 && name.starts_with("transformer.h.")
}
