//! Text generation from a run's newest checkpoint.

use crate::model::generate::{generate, Generation};
use crate::model::Gpt;
use crate::train::{load_run_model, RunModel};
use anyhow::Result;
use std::path::Path;

/// Sampling settings.
#[derive(Debug, Clone)]
pub struct SampleOptions {
    pub prompt: String,
    pub max_new_tokens: usize,
    /// 0 means greedy (argmax).
    pub temperature: f64,
    /// Sample among the `top_k` most likely tokens; `None` for all.
    pub top_k: Option<usize>,
    pub seed: u64,
    /// `cpu`, `cuda`, `cuda:N`; `None` uses the run's device.
    pub device: Option<String>,
}

/// Generates `max_new_tokens` after the prompt, calling `on_text` with each decoded piece as it
/// appears. Returns the whole continuation. An empty prompt starts from `<|endoftext|>` (GPT-2
/// and BPE tokenizers) or a newline (bytes).
pub fn sample(run_dir: &Path, opts: &SampleOptions, on_text: impl FnMut(&str)) -> Result<String> {
    let device = opts
        .device
        .as_deref()
        .map(crate::device::parse_device)
        .transpose()?;
    let (run, device) = load_run_model(run_dir, device.as_ref())?;
    let RunModel {
        tokenizer,
        model_cfg,
        params,
        ..
    } = run;
    let model = Gpt::new(&model_cfg, &params)?;
    let how = Generation {
        max_new_tokens: opts.max_new_tokens,
        temperature: opts.temperature,
        top_k: opts.top_k,
        seed: opts.seed,
    };
    generate(&model, &tokenizer, &opts.prompt, &how, &device, on_text)
}
