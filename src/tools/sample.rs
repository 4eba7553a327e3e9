//! Text generation from a run's newest checkpoint.

use crate::config::TokenizerKind;
use crate::data::tokenizer::END_OF_TEXT;
use crate::model::Gpt;
use crate::train::{load_run_model, RunModel};
use anyhow::{bail, Result};
use candle_core::{DType, Tensor, D};
use candle_transformers::generation::{LogitsProcessor, Sampling};
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
pub fn sample(
    run_dir: &Path,
    opts: &SampleOptions,
    mut on_text: impl FnMut(&str),
) -> Result<String> {
    let device = opts
        .device
        .as_deref()
        .map(crate::device::parse_device)
        .transpose()?;
    let (run, device) = load_run_model(run_dir, device.as_ref())?;
    let RunModel {
        cfg,
        tokenizer,
        model_cfg,
        params,
    } = run;
    let model = Gpt::new(&model_cfg, &params)?;

    let mut ids = if opts.prompt.is_empty() {
        match cfg.tokenizer {
            TokenizerKind::Byte => vec![b'\n' as u32],
            _ => tokenizer.encode(END_OF_TEXT)?,
        }
    } else {
        tokenizer.encode(&opts.prompt)?
    };
    if ids.is_empty() {
        bail!("the prompt encodes to no tokens");
    }
    let sampling = if opts.temperature <= 0.0 {
        Sampling::ArgMax
    } else {
        match opts.top_k {
            Some(k) => Sampling::TopK {
                k,
                temperature: opts.temperature,
            },
            None => Sampling::All {
                temperature: opts.temperature,
            },
        }
    };
    let mut processor = LogitsProcessor::from_sampling(opts.seed, sampling);
    let vocab = tokenizer.vocab_size();
    let first_new = ids.len();
    let mut printed = String::new();
    for _ in 0..opts.max_new_tokens {
        let context = &ids[ids.len().saturating_sub(model_cfg.block_size)..];
        let input = Tensor::new(context, &device)?.unsqueeze(0)?;
        let logits = model.forward(&input, None)?;
        let last = logits
            .narrow(1, context.len() - 1, 1)?
            .flatten_all()?
            // Padding rows of the embedding are not tokens: never sample them.
            .narrow(D::Minus1, 0, vocab)?
            .to_dtype(DType::F32)?;
        ids.push(processor.sample(&last)?);
        // Decode the whole continuation each time: a multi-byte character may span tokens.
        let text = tokenizer.decode(&ids[first_new..])?;
        if text.len() > printed.len()
            && text.starts_with(printed.as_str())
            && !text.ends_with('\u{fffd}')
        {
            on_text(&text[printed.len()..]);
            printed = text;
        }
    }
    let text = tokenizer.decode(&ids[first_new..])?;
    if text.starts_with(printed.as_str()) && text.len() > printed.len() {
        on_text(&text[printed.len()..]);
    }
    Ok(text)
}
