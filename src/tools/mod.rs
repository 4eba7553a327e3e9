//! Commands that use a trained model or measure the code: sampling, evaluation on a text, and the
//! throughput benchmark.

pub mod bench;
pub mod eval;
pub mod export;
pub mod sample;
