//! Loss and perplexity of a model on any text file, with the sliding windows of Hugging Face's
//! perplexity guide (<https://huggingface.co/docs/transformers/perplexity>): windows of `block`
//! tokens starting every `stride` tokens, each scoring only the tokens past the previous window's
//! end, so every token after the first is predicted exactly once, with at least `block − stride`
//! tokens of context after the first window. (The guide's code counts each window's scored tokens
//! as one fewer than it scores; we count them exactly.)

use crate::data::tokenizer::Tokenizer;
use crate::data::Corpus;
use crate::model::{Gpt, GptConfig, Params};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, D};
use serde::Serialize;
use std::path::Path;

/// A model ready to score text, from a run directory or a Hugging Face GPT-2 directory.
pub struct Scorer {
    pub model_cfg: GptConfig,
    params: Params,
    pub tokenizer: Tokenizer,
    /// Ids at or above this are vocabulary padding, excluded from the softmax.
    pub vocab: usize,
}

impl Scorer {
    /// Loads `path`: a run directory (newest checkpoint) or a directory with `config.json`,
    /// `model.safetensors` and `tokenizer.json` as `transformers` saves them.
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        if path.join("config.toml").is_file() {
            let (run, _) = crate::train::load_run_model(path, Some(device))?;
            let crate::train::RunModel {
                tokenizer,
                model_cfg,
                params,
                ..
            } = run;
            let vocab = tokenizer.vocab_size();
            Ok(Self {
                model_cfg,
                params,
                tokenizer,
                vocab,
            })
        } else if path.join("config.json").is_file() {
            let model_cfg = crate::model::hf::read_config(path)?;
            let params = crate::model::hf::read_weights(path, &model_cfg, device)?;
            let tokenizer = Tokenizer::from_file(&path.join("tokenizer.json"))?;
            let vocab = model_cfg.vocab_size;
            Ok(Self {
                model_cfg,
                params,
                tokenizer,
                vocab,
            })
        } else {
            bail!(
                "{} is neither a run directory (config.toml) nor a Hugging Face model directory (config.json)",
                path.display()
            );
        }
    }

    /// The model over the loaded parameters.
    pub fn model(&self) -> Result<Gpt> {
        Gpt::new(&self.model_cfg, &self.params)
    }
}

/// The result of [`evaluate_text`].
#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    pub data: String,
    pub tokens: usize,
    /// Tokens scored (all but the first).
    pub scored: usize,
    pub block: usize,
    pub stride: usize,
    /// Mean negative log-likelihood per scored token, in nats.
    pub loss: f64,
    pub perplexity: f64,
}

impl std::fmt::Display for EvalReport {
    /// `DATA: loss L, perplexity P over N tokens (block B, stride S)`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: loss {:.4}, perplexity {:.3} over {} tokens (block {}, stride {})",
            self.data, self.loss, self.perplexity, self.scored, self.block, self.stride
        )
    }
}

/// Summed negative log-likelihood of `ids[skip+1..]`, each predicted from the ids before it.
fn window_nll(model: &Gpt, ids: &[u32], skip: usize, vocab: usize, device: &Device) -> Result<f64> {
    let input = Tensor::new(&ids[..ids.len() - 1], device)?.unsqueeze(0)?;
    let logits = model
        .forward(&input, None)?
        .squeeze(0)?
        .narrow(D::Minus1, 0, vocab)?;
    let logits = logits.narrow(0, skip, ids.len() - 1 - skip)?;
    let targets = Tensor::new(&ids[skip + 1..], device)?;
    let mean = crate::ops::cross_entropy::cross_entropy(&logits, &targets)?;
    Ok(mean.to_dtype(DType::F64)?.to_scalar::<f64>()? * targets.dim(0)? as f64)
}

/// Loss and perplexity of `scorer` on the text file `data`.
pub fn evaluate_text(
    scorer: &Scorer,
    data: &Path,
    block: Option<usize>,
    stride: Option<usize>,
    device: &Device,
) -> Result<EvalReport> {
    let corpus = Corpus::read(data)?;
    let ids = scorer.tokenizer.encode(&corpus.text)?;
    if ids.len() < 2 {
        bail!(
            "{} has {} token(s): nothing to predict",
            data.display(),
            ids.len()
        );
    }
    let max_block = scorer.model_cfg.block_size;
    let block = block.unwrap_or(max_block);
    if block < 2 || block > max_block {
        bail!("--block must be in [2, {max_block}], got {block}");
    }
    let stride = stride.unwrap_or(block / 2).clamp(1, block);
    let model = scorer.model()?;
    let (mut nll, mut scored) = (0.0, 0usize);
    // Window [begin, end) predicts ids[begin+1..end]; it scores the targets past `prev_end`.
    let mut prev_end = 0usize;
    let mut begin = 0usize;
    loop {
        let end = (begin + block).min(ids.len());
        let first_target = prev_end.max(begin + 1);
        if end > first_target {
            let skip = first_target - (begin + 1);
            nll += window_nll(&model, &ids[begin..end], skip, scorer.vocab, device)
                .with_context(|| format!("window at token {begin}"))?;
            scored += end - first_target;
        }
        prev_end = end;
        if end == ids.len() {
            break;
        }
        begin += stride;
    }
    let loss = nll / scored as f64;
    Ok(EvalReport {
        data: data.display().to_string(),
        tokens: ids.len(),
        scored,
        block,
        stride,
        loss,
        perplexity: loss.exp(),
    })
}
