//! gpt-pretrain: pretrain GPT-2-style language models on [candle](https://github.com/huggingface/candle)
//! with a selectable optimizer (Adam, AdamW or ADOPT), log every loss, checkpoint, resume exactly,
//! and sample from the result.
//!
//! The library holds everything; `src/main.rs` is a thin command-line layer over it.
//! - [`model`]: the GPT-2 model (nanoGPT's architecture, Hugging Face tensor names).
//! - [`ops`]: fused CPU (and CUDA) kernels with their own backward passes, each tested against
//!   plain candle ops.
//! - [`data`]: tokenizers and the memory-mapped token cache with seeded batching.
//! - [`optim`]: Adam, AdamW and ADOPT with exposed, checkpointable state; reusable by any candle program.
//! - [`config`]: run configuration (defaults → TOML → `--set` overrides).
//! - [`train`]: the training loop, checkpoints, metrics and the learning-rate schedule.
//! - [`distributed`]: data parallel over MPI ranks (the `mpi` feature).
//! - [`study`]: sweeps, the comparison report and the toy problem.
//! - [`tools`]: sampling, evaluation and the benchmark.

pub mod config;
pub mod data;
pub mod device;
pub mod distributed;
pub mod fsutil;
pub mod model;
pub mod ops;
pub mod optim;
pub mod study;
pub mod tools;
pub mod train;
