//! The one precision type, from the config key down to the CPU matmul operands.

use serde::{Deserialize, Serialize};

/// The precision a run computes in: the config's `dtype`, `bench --dtype`, and what each op's
/// matmuls multiply in. The products are accumulated in f32 either way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// Everything in f32 (the default).
    #[value(help = "everything in f32")]
    F32,
    /// On CUDA, mixed precision as nanoGPT's `torch.autocast(dtype=torch.bfloat16)`: bf16
    /// matmuls, attention and MLP activations; f32 master weights, optimizer state, LayerNorm,
    /// softmax, residual stream and loss. On CPU (with oneDNN), bf16 operands in the linear
    /// layers' and the lm_head's matmuls and (with AVX512-BF16) the attention's products,
    /// accumulated in f32, and f32 everywhere else.
    #[value(help = "bf16 matmuls with f32 accumulation and f32 master weights")]
    Bf16,
}

impl Precision {
    /// Its name in configs and on the command line: `f32`, `bf16`.
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::Bf16 => "bf16",
        }
    }

    /// The dtype matmuls run in.
    pub fn compute_dtype(self) -> candle_core::DType {
        match self {
            Self::F32 => candle_core::DType::F32,
            Self::Bf16 => candle_core::DType::BF16,
        }
    }
}
