//! GPT-2, as in nanoGPT (<https://github.com/karpathy/nanoGPT/blob/master/model.py>) and the GPT-2
//! paper (Radford et al., 2019, "Language Models are Unsupervised Multitask Learners").
//!
//! Token + learned position embeddings, `n_layer` pre-LayerNorm blocks of causal self-attention
//! (one fused qkv projection) and a 4x MLP with tanh-GELU, a final LayerNorm, and an `lm_head` tied
//! to the token embedding. Tensors carry Hugging Face GPT-2 names (`transformer.h.0.attn.c_attn.weight`);
//! linear weights are stored as `[out, in]` like `torch.nn.Linear` (Hugging Face's `Conv1D` stores the
//! transpose). `lm_head.weight` is `transformer.wte.weight` and is not stored twice.
//!
//! Every layer is written with candle ops that have a backward pass (`candle_nn`'s LayerNorm and
//! `softmax_last_dim` have none and would silently stop gradients), or with the fused kernels of
//! [`crate::ops`] (LayerNorm, causal softmax, tanh-GELU, cross-entropy; CPU and CUDA) and
//! [`crate::ops::attention`] (the whole causal attention on CPU) and [`crate::ops::lm_head_loss`]
//! (the lm_head and the loss on CPU), which carry their own backward and are tested against those
//! ops.

mod config;
pub mod generate;
pub mod hf;
mod params;

pub use config::{is_hidden_matrix, GptConfig, Init, ParamSpec};
pub use params::Params;

use crate::ops::attention::causal_attention;
use crate::ops::dropout::dropout;
use crate::ops::layer_norm::layer_norm;
use crate::ops::linear::{fused_linear_takes_bf16, linear};
use crate::ops::lm_head_loss::{
    fused_linear_cross_entropy, fused_linear_cross_entropy_applies,
    fused_linear_cross_entropy_with_z_loss, LossGradients,
};
use crate::ops::Precision;
use anyhow::{bail, Result};
use candle_core::{DType, Tensor, D};
use rand_chacha::ChaCha8Rng;

/// A linear layer `y = x Wᵀ + b` with `W` stored `[out, in]`, computed in `autocast.cast`: the
/// input, weight and bias are cast to it (differentiably, so gradients reach the master weights in
/// their own dtype) and the output stays in it, as under PyTorch's autocast. On CPU with oneDNN
/// loaded, f32 tensors go through [`fused_linear`] instead, its operands in `autocast.precision`.
struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
    autocast: Autocast,
}

impl Linear {
    fn new(params: &Params, prefix: &str, bias: bool, autocast: Autocast) -> Result<Self> {
        Ok(Self {
            weight: params.get(&format!("{prefix}.weight"))?.as_tensor().clone(),
            bias: if bias {
                Some(params.get(&format!("{prefix}.bias"))?.as_tensor().clone())
            } else {
                None
            },
            autocast,
        })
    }

    /// Whether this layer rounds its input to bf16 first thing ([`fused_linear_takes_bf16`]), so
    /// that the op producing an input for it alone may store it so.
    fn takes_bf16(&self) -> bool {
        fused_linear_takes_bf16(&self.weight, self.autocast.precision)
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // (B, T, in) → (B·T, in) so one 2-D matmul does the work.
        let (b, t, c) = x.dims3()?;
        let y = linear(
            &x.reshape((b * t, c))?,
            &self.weight,
            self.bias.as_ref(),
            self.autocast.precision,
            self.autocast.cast,
        )?;
        Ok(y.reshape((b, t, ()))?)
    }
}

/// LayerNorm over the last dimension with eps 1e-5, as `torch.nn.LayerNorm`.
struct LayerNorm {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl LayerNorm {
    fn new(params: &Params, prefix: &str, bias: bool) -> Result<Self> {
        let lin = Linear::new(params, prefix, bias, Autocast::F32)?;
        Ok(Self {
            weight: lin.weight,
            bias: lin.bias,
        })
    }

    /// [`Self::forward`] for an input that `consumer` alone reads: stored in bf16, rounded, when
    /// the consumer would round it to bf16 first thing anyway (the values it sees are the same).
    fn forward_into(&self, x: &Tensor, consumer: &Linear) -> Result<Tensor> {
        if consumer.takes_bf16()
            && x.device().is_cpu()
            && x.dtype() == DType::F32
            && crate::ops::layer_norm::fused_layer_norm_applies(x, &self.weight)
        {
            return Ok(crate::ops::layer_norm::fused_layer_norm_rounded(
                x,
                &self.weight,
                self.bias.as_ref(),
                1e-5,
            )?);
        }
        self.forward(x)
    }

    /// Normalises in the weights' dtype whatever the input's (autocast keeps LayerNorm in f32).
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = x.to_dtype(self.weight.dtype())?;
        Ok(layer_norm(&x, &self.weight, self.bias.as_ref(), 1e-5)?)
    }
}

struct CausalSelfAttention {
    c_attn: Linear,
    c_proj: Linear,
    n_head: usize,
    dropout: f64,
}

impl CausalSelfAttention {
    fn forward(
        &self,
        x: &Tensor,
        mask: &Tensor,
        mut rng: Option<&mut ChaCha8Rng>,
    ) -> Result<Tensor> {
        let qkv = self.c_attn.forward(x)?;
        let y = causal_attention(
            &qkv,
            self.n_head,
            self.c_attn.autocast.precision,
            mask,
            self.dropout,
            rng.as_deref_mut(),
        )?;
        Ok(dropout(&self.c_proj.forward(&y)?, self.dropout, rng)?)
    }
}

struct Mlp {
    c_fc: Linear,
    c_proj: Linear,
    dropout: f64,
}

impl Mlp {
    fn forward(&self, x: &Tensor, rng: Option<&mut ChaCha8Rng>) -> Result<Tensor> {
        let u = self.c_fc.forward(x)?;
        // c_proj alone reads h: stored in bf16 when c_proj rounds its input to bf16 anyway.
        let h = if self.c_proj.takes_bf16() && u.device().is_cpu() && u.dtype() == DType::F32 {
            crate::ops::gelu::fused_gelu_tanh_rounded(&u)?
        } else {
            crate::ops::gelu::gelu_tanh(&u)?
        };
        Ok(dropout(&self.c_proj.forward(&h)?, self.dropout, rng)?)
    }
}

struct Block {
    ln_1: LayerNorm,
    attn: CausalSelfAttention,
    ln_2: LayerNorm,
    mlp: Mlp,
}

impl Block {
    fn new(params: &Params, cfg: &GptConfig, i: usize, autocast: Autocast) -> Result<Self> {
        let p = |s: &str| format!("transformer.h.{i}.{s}");
        Ok(Self {
            ln_1: LayerNorm::new(params, &p("ln_1"), cfg.bias)?,
            attn: CausalSelfAttention {
                c_attn: Linear::new(params, &p("attn.c_attn"), cfg.bias, autocast)?,
                c_proj: Linear::new(params, &p("attn.c_proj"), cfg.bias, autocast)?,
                n_head: cfg.n_head,
                dropout: cfg.dropout,
            },
            ln_2: LayerNorm::new(params, &p("ln_2"), cfg.bias)?,
            mlp: Mlp {
                c_fc: Linear::new(params, &p("mlp.c_fc"), cfg.bias, autocast)?,
                c_proj: Linear::new(params, &p("mlp.c_proj"), cfg.bias, autocast)?,
                dropout: cfg.dropout,
            },
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        mask: &Tensor,
        mut rng: Option<&mut ChaCha8Rng>,
    ) -> Result<Tensor> {
        // The residual stream stays in the parameters' dtype; branch outputs are cast back to it.
        let h = self.ln_1.forward_into(x, &self.attn.c_attn)?;
        let attn = self.attn.forward(&h, mask, rng.as_deref_mut())?;
        let x = (x + attn.to_dtype(x.dtype())?)?;
        let mlp = self
            .mlp
            .forward(&self.ln_2.forward_into(&x, &self.mlp.c_fc)?, rng)?;
        Ok((&x + mlp.to_dtype(x.dtype())?)?)
    }
}

/// The GPT-2 language model.
pub struct Gpt {
    cfg: GptConfig,
    wte: Tensor,
    wpe: Tensor,
    blocks: Vec<Block>,
    ln_f: LayerNorm,
    /// 0 on and below the diagonal, −∞ above: added to attention scores.
    causal_mask: Tensor,
    autocast: Autocast,
}

/// What the run's [`Precision`] means for a layer on its device, decided once when the model is
/// built: the dtype candle's own ops cast tensors to (bf16 under CUDA autocast; on CPU the
/// parameters' own), and what the CPU's fused matmuls round their operands to.
#[derive(Clone, Copy)]
struct Autocast {
    cast: DType,
    precision: Precision,
}

impl Autocast {
    const F32: Self = Self {
        cast: DType::F32,
        precision: Precision::F32,
    };
}

impl Gpt {
    /// Builds the model over `params` (which it shares: optimizer updates are seen at once),
    /// computing in the parameters' dtype.
    pub fn new(cfg: &GptConfig, params: &Params) -> Result<Self> {
        let dtype = params.get("transformer.wte.weight")?.dtype();
        let autocast = Autocast {
            cast: dtype,
            precision: Precision::F32,
        };
        Self::build(cfg, params, autocast)
    }

    /// The model in the run's precision. bf16 is mixed precision, as nanoGPT under
    /// `torch.autocast`: matmuls, attention and the MLP in bf16, with LayerNorm, softmax, the
    /// residual stream, the logits handed to the loss, and the parameters and their gradients in
    /// the parameters' own dtype (f32).
    ///
    /// On CPU, bf16 means bf16 operands in the linear layers' and the lm_head's matmuls (oneDNN:
    /// AMX, AVX512-BF16, or widened to f32 where oneDNN has no bf16 kernel) and, where the CPU has
    /// AVX512-BF16, in the attention's six products
    /// ([`crate::ops::attention::fused_causal_attention_in`]), f32 everywhere else;
    /// it needs oneDNN and f32 parameters.
    pub fn with_precision(cfg: &GptConfig, params: &Params, precision: Precision) -> Result<Self> {
        let wte = params.get("transformer.wte.weight")?;
        let (on_cpu, dtype) = (wte.device().is_cpu(), wte.dtype());
        let autocast = if on_cpu && precision == Precision::Bf16 && dtype != DType::BF16 {
            if dtype != DType::F32 {
                bail!("bf16 matmuls on CPU need f32 parameters, not {dtype:?}");
            }
            if let Some(reason) = crate::ops::onednn::bf16_matmuls_unavailable() {
                bail!("bf16 matmuls on CPU need oneDNN, and {reason}");
            }
            Autocast {
                cast: dtype,
                precision,
            }
        } else {
            Autocast {
                cast: precision.compute_dtype(),
                precision: Precision::F32,
            }
        };
        Self::build(cfg, params, autocast)
    }

    fn build(cfg: &GptConfig, params: &Params, autocast: Autocast) -> Result<Self> {
        cfg.validate()?;
        let wte = params.get("transformer.wte.weight")?.as_tensor().clone();
        let (device, dtype) = (wte.device().clone(), wte.dtype());
        let n = cfg.block_size;
        let mask: Vec<f32> = (0..n * n)
            .map(|i| {
                if i % n > i / n {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
            .collect();
        Ok(Self {
            cfg: cfg.clone(),
            wpe: params.get("transformer.wpe.weight")?.as_tensor().clone(),
            blocks: (0..cfg.n_layer)
                .map(|i| Block::new(params, cfg, i, autocast))
                .collect::<Result<_>>()?,
            ln_f: LayerNorm::new(params, "transformer.ln_f", cfg.bias)?,
            causal_mask: Tensor::from_vec(mask, (n, n), &device)?.to_dtype(dtype)?,
            wte,
            autocast,
        })
    }

    /// The model's shape.
    pub fn config(&self) -> &GptConfig {
        &self.cfg
    }

    /// Logits `(B, T, vocab_size)` for token ids `(B, T)` (u32), in the parameters' dtype.
    /// `dropout_rng` switches dropout on (training); `None` is evaluation.
    pub fn forward(&self, idx: &Tensor, dropout_rng: Option<&mut ChaCha8Rng>) -> Result<Tensor> {
        Ok(self
            .logits_in_compute_dtype(idx, dropout_rng)?
            .to_dtype(self.wte.dtype())?)
    }

    /// [`Gpt::forward`] before the logits are cast back from the compute dtype.
    fn logits_in_compute_dtype(
        &self,
        idx: &Tensor,
        dropout_rng: Option<&mut ChaCha8Rng>,
    ) -> Result<Tensor> {
        self.lm_head(&self.final_hidden(idx, dropout_rng)?)
    }

    /// Logits `(B, T, vocab_size)` in the compute dtype from the final hidden states.
    fn lm_head(&self, x: &Tensor) -> Result<Tensor> {
        let (b, t, c) = x.dims3()?;
        // lm_head is tied to wte.
        let logits = linear(
            &x.reshape((b * t, c))?,
            &self.wte,
            None,
            self.autocast.precision,
            self.autocast.cast,
        )?;
        Ok(logits.reshape((b, t, ()))?)
    }

    /// The hidden states after the final LayerNorm `(B, T, C)`, the lm_head's input.
    fn final_hidden(
        &self,
        idx: &Tensor,
        mut dropout_rng: Option<&mut ChaCha8Rng>,
    ) -> Result<Tensor> {
        let (b, t) = idx.dims2()?;
        if t > self.cfg.block_size {
            bail!(
                "sequence of length {t} is longer than block_size {}",
                self.cfg.block_size
            );
        }
        let tok = self
            .wte
            .embedding(&idx.flatten_all()?)?
            .reshape((b, t, ()))?;
        let pos = self.wpe.narrow(0, 0, t)?;
        let mut x = dropout(
            &tok.broadcast_add(&pos)?,
            self.cfg.dropout,
            dropout_rng.as_deref_mut(),
        )?;
        let mask = self.causal_mask.narrow(0, 0, t)?.narrow(1, 0, t)?;
        for block in &self.blocks {
            x = block.forward(&x, &mask, dropout_rng.as_deref_mut())?;
        }
        self.ln_f.forward(&x)
    }

    /// Mean cross-entropy of predicting `targets` `(B, T)` from `idx` `(B, T)`, to train on
    /// (backward works through it). On CPU the lm_head and the loss are one fused kernel that
    /// computes their gradients in the same pass ([`crate::ops::lm_head_loss`]).
    pub fn loss(
        &self,
        idx: &Tensor,
        targets: &Tensor,
        dropout_rng: Option<&mut ChaCha8Rng>,
    ) -> Result<Tensor> {
        self.loss_with(idx, targets, dropout_rng, LossGradients::Eager)
    }

    /// [`Gpt::loss`] with PaLM's z-loss added when `z_loss` > 0: the objective is the mean of
    /// cross-entropy + `z_loss` · log²Z over the positions (log Z the log-sum-exp of a
    /// position's logits), which keeps the logits' normaliser near 1. On CPU the term is fused
    /// into the lm_head loss; elsewhere it is composed from the logits.
    pub fn training_loss(
        &self,
        idx: &Tensor,
        targets: &Tensor,
        dropout_rng: Option<&mut ChaCha8Rng>,
        z_loss: f64,
    ) -> Result<TrainingLoss> {
        if z_loss == 0.0 {
            let objective = self.loss(idx, targets, dropout_rng)?;
            return Ok(TrainingLoss {
                cross_entropy: objective.clone(),
                objective,
                z_loss: None,
            });
        }
        let x = self.final_hidden(idx, dropout_rng)?;
        let targets = targets.flatten_all()?;
        if self.autocast.cast == self.wte.dtype()
            && fused_linear_cross_entropy_applies(&x, &self.wte)
        {
            let terms = fused_linear_cross_entropy_with_z_loss(
                &x.flatten_to(1)?,
                &self.wte,
                &targets,
                LossGradients::Eager,
                self.autocast.precision,
                z_loss,
            )?;
            return Ok(TrainingLoss {
                objective: terms.get(0)?,
                cross_entropy: terms.get(1)?.detach(),
                z_loss: Some((terms.get(2)? * z_loss)?.detach()),
            });
        }
        let logits = self.lm_head(&x)?.flatten_to(1)?;
        let cross_entropy = self.cross_entropy_of_logits(&logits, &targets)?;
        let log_z_sq = logits
            .to_dtype(self.wte.dtype())?
            .log_sum_exp(D::Minus1)?
            .sqr()?
            .mean_all()?;
        let term = (log_z_sq * z_loss)?;
        Ok(TrainingLoss {
            objective: (&cross_entropy + &term)?,
            cross_entropy: cross_entropy.detach(),
            z_loss: Some(term.detach()),
        })
    }

    /// [`Gpt::loss`] for evaluation: the same value, without computing gradients (on CPU a
    /// backward pass through it is an error).
    pub fn eval_loss(&self, idx: &Tensor, targets: &Tensor) -> Result<Tensor> {
        self.loss_with(idx, targets, None, LossGradients::None)
    }

    fn loss_with(
        &self,
        idx: &Tensor,
        targets: &Tensor,
        dropout_rng: Option<&mut ChaCha8Rng>,
        gradients: LossGradients,
    ) -> Result<Tensor> {
        let x = self.final_hidden(idx, dropout_rng)?;
        let targets = targets.flatten_all()?;
        if self.autocast.cast == self.wte.dtype()
            && fused_linear_cross_entropy_applies(&x, &self.wte)
        {
            return Ok(fused_linear_cross_entropy(
                &x.flatten_to(1)?,
                &self.wte,
                &targets,
                gradients,
                self.autocast.precision,
            )?);
        }
        let logits = self.lm_head(&x)?.flatten_to(1)?;
        self.cross_entropy_of_logits(&logits, &targets)
    }

    /// Mean cross-entropy of `targets` (N,) under `logits` (N, V) in the compute dtype.
    fn cross_entropy_of_logits(&self, logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
        // The fused kernel reads bf16 logits directly and computes in f32 (autocast's upcast,
        // without materialising an f32 copy of the largest tensor of the step).
        if crate::ops::cross_entropy::fused_cross_entropy_applies(logits) {
            return Ok(crate::ops::cross_entropy::fused_cross_entropy(
                logits, targets,
            )?);
        }
        Ok(crate::ops::cross_entropy::cross_entropy(
            &logits.to_dtype(self.wte.dtype())?,
            targets,
        )?)
    }
}

/// A training step's loss ([`Gpt::training_loss`]): what the backward pass runs through, and
/// what the log shows.
pub struct TrainingLoss {
    /// The objective to differentiate: the cross-entropy, plus the z-loss term when one is on.
    pub objective: Tensor,
    /// The mean cross-entropy.
    pub cross_entropy: Tensor,
    /// The z-loss term added to the objective (`z_loss` · mean log²Z); `None` without one.
    pub z_loss: Option<Tensor>,
}
