//! Fused kernels for the model, as candle custom ops with their own backward pass, one file per op
//! with its CPU kernel, its CUDA launchers (`kernels.cu` under `cuda/`) and its backward together.
//! Each has a plain candle-op twin (used where the kernel does not apply) and is tested against
//! it, values and gradients; one entry point per op chooses between them ([`linear::linear`],
//! [`layer_norm::layer_norm`], [`attention::causal_attention`], [`softmax::causal_softmax`],
//! [`gelu::gelu_tanh`], [`cross_entropy::cross_entropy`]), so the model calls the op, not a path.
//!
//! - [`attention`]: the whole causal self-attention on CPU (packed qkv in, heads out); on
//!   AVX-512 its products run in register tiles (`attention/tiles.rs`), of f32 FMAs
//!   (`attention/avx512.rs`) or of bf16 pairs (`attention/bf16.rs`, AVX512-BF16).
//! - [`softmax`]: the causal attention softmax (CUDA, and CPU when the composed attention runs).
//! - [`layer_norm`], [`gelu`]: LayerNorm and GPT-2's tanh-GELU.
//! - [`cross_entropy`]: softmax cross-entropy of logits; [`lm_head_loss`]: the lm_head matmul and
//!   the cross-entropy in one pass on CPU, the logits never materialized.
//! - [`linear`]: the linear layer on CPU through oneDNN ([`onednn`]), in f32 or with bf16 matmuls.
//! - [`dropout`]: inverted dropout with masks from the run's seeded stream.
//! - [`grad_norm`]: sums of squares for the global gradient norm.
//! - [`simd`] and [`cpu`]: what the CPU loops share (a vectorizable exp, lane-wise reductions,
//!   AVX-512/AVX2 dispatch, strided gemm); `cuda`: what the CUDA launchers share.

pub mod attention;
pub mod cpu;
pub mod cross_entropy;
#[cfg(feature = "cuda")]
mod cuda;
pub mod dropout;
pub mod gelu;
pub mod grad_norm;
pub mod layer_norm;
pub mod linear;
pub mod lm_head_loss;
pub mod onednn;
mod precision;
pub mod simd;
pub mod softmax;

pub use precision::Precision;
