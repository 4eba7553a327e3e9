//! Text generation: the autoregressive loop behind `gpt-pretrain sample` and the samples a run
//! writes while it trains (`sample_interval`).

use super::Gpt;
use crate::data::tokenizer::{Tokenizer, END_OF_TEXT};
use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor, D};
use candle_transformers::generation::{LogitsProcessor, Sampling};

/// How to draw each token.
#[derive(Debug, Clone)]
pub struct Generation {
    /// Tokens to generate after the prompt.
    pub max_new_tokens: usize,
    /// 0 means greedy (argmax).
    pub temperature: f64,
    /// Sample among the `top_k` most likely tokens; `None` for all.
    pub top_k: Option<usize>,
    pub seed: u64,
}

/// The prompt's token ids; an empty prompt starts from `<|endoftext|>` (GPT-2 and BPE
/// tokenizers) or a newline (bytes).
pub fn prompt_ids(tokenizer: &Tokenizer, prompt: &str) -> Result<Vec<u32>> {
    let ids = match (prompt.is_empty(), tokenizer) {
        (true, Tokenizer::Byte) => vec![b'\n' as u32],
        (true, _) => tokenizer.encode(END_OF_TEXT)?,
        (false, _) => tokenizer.encode(prompt)?,
    };
    if ids.is_empty() {
        bail!("the prompt encodes to no tokens");
    }
    Ok(ids)
}

/// Generates after `prompt`, calling `on_text` with each decoded piece as it appears; returns
/// the whole continuation. Reads the model only.
pub fn generate(
    model: &Gpt,
    tokenizer: &Tokenizer,
    prompt: &str,
    how: &Generation,
    device: &Device,
    mut on_text: impl FnMut(&str),
) -> Result<String> {
    let mut ids = prompt_ids(tokenizer, prompt)?;
    let sampling = if how.temperature <= 0.0 {
        Sampling::ArgMax
    } else {
        match how.top_k {
            Some(k) => Sampling::TopK {
                k,
                temperature: how.temperature,
            },
            None => Sampling::All {
                temperature: how.temperature,
            },
        }
    };
    let mut processor = LogitsProcessor::from_sampling(how.seed, sampling);
    let vocab = tokenizer.vocab_size();
    let block_size = model.config().block_size;
    let first_new = ids.len();
    let mut printed = String::new();
    for _ in 0..how.max_new_tokens {
        let context = &ids[ids.len().saturating_sub(block_size)..];
        let input = Tensor::new(context, device)?.unsqueeze(0)?;
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
