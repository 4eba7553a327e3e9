//! gpt-pretrain: pretrain GPT-2-style language models on [candle](https://github.com/huggingface/candle)
//! with a selectable optimizer (Adam, AdamW or ADOPT), log every loss, checkpoint, resume exactly,
//! and sample from the result.
//!
//! The library holds everything; `src/main.rs` is a thin command-line layer over it.
//! - [`model`]: the GPT-2 model (nanoGPT's architecture, Hugging Face tensor names).
//! - [`kernels`], [`attention`], [`linear_cross_entropy`]: fused CPU (and CUDA) kernels with their
//!   own backward passes, each tested against plain candle ops.
//! - [`tokenizer`], [`data`]: tokenizers and the memory-mapped token cache with seeded batching.
//! - [`optim`]: Adam, AdamW and ADOPT with exposed, checkpointable state; reusable by any candle program.
//! - [`schedule`]: the learning-rate schedule, a pure function of the step.
//! - [`config`]: run configuration (defaults → TOML → `--set` overrides).
//! - [`checkpoint`]: atomic, checksummed checkpoints.
//! - [`train`]: the training loop; [`sample`]: text generation.

pub mod attention;
pub mod bench;
pub mod checkpoint;
pub mod compare;
pub mod compare_plots;
pub mod config;
pub mod data;
pub mod device;
pub mod eval;
pub mod faults;
pub mod fsutil;
pub mod hf;
pub mod kernels;
#[cfg(feature = "cuda")]
mod kernels_cuda;
pub mod linear_cross_entropy;
pub mod metrics;
pub mod model;
pub mod optim;
pub mod plot;
pub mod runlock;
pub mod sample;
pub mod schedule;
pub mod signals;
pub mod sweep;
pub mod tokenizer;
pub mod toy;
pub mod train;
