//! The run directory: `config.toml` (the resolved config), `run.json` (the reproducibility header),
//! `tokenizer.json` (a trained BPE only) beside `metrics.jsonl` and `checkpoints/`; reading a run
//! back (its config, tokenizer, header and newest model), and the identity a resume must keep.

use super::checkpoint;
use crate::config::{TokenizerKind, TrainConfig, RESUME_OVERRIDABLE};
use crate::data::tokenizer::Tokenizer;
use crate::model::{GptConfig, Params};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use serde::{Deserialize, Serialize};
use std::path::Path;

pub(super) const CONFIG_FILE: &str = "config.toml";
pub(super) const RUN_FILE: &str = "run.json";
pub(super) const TOKENIZER_FILE: &str = "tokenizer.json";

/// The reproducibility header written once when a run starts (`run.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunHeader {
    pub crate_version: String,
    pub git_commit: String,
    pub seed: u64,
    pub device: String,
    pub start_time: String,
    pub corpus: String,
    pub corpus_sha256: String,
    pub tokenizer_sha256: String,
    pub vocab_size: usize,
    pub n_tokens: usize,
    pub n_params: usize,
    pub model: GptConfig,
    /// Data-parallel ranks the run started with (1 for runs older than the field).
    #[serde(default = "one")]
    pub world_size: usize,
    /// Changes accepted on resume with `--allow-data-change`, one line each.
    #[serde(default)]
    pub overrides: Vec<String>,
    /// How the steps went, written when the run reaches `max_steps`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub totals: Option<RunTotals>,
}

/// Counts over a finished run's steps (`run.json`'s `totals`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunTotals {
    /// Optimizer steps taken.
    pub steps: u64,
    /// Steps not applied (non-finite, or over a spike threshold).
    pub skipped_steps: u64,
    /// Steps whose gradients `grad_clip` scaled down.
    pub clipped_steps: u64,
    /// `clipped_steps / steps`.
    pub clipped_share: f64,
}

/// Records `totals` in the run's `run.json`.
pub(super) fn record_totals(run_dir: &Path, totals: RunTotals) -> Result<()> {
    let mut header = load_run_header(run_dir)?;
    header.totals = Some(totals);
    crate::fsutil::write_atomic(
        &run_dir.join(RUN_FILE),
        serde_json::to_string_pretty(&header)?.as_bytes(),
    )
}

fn one() -> usize {
    1
}

/// The run directory's resolved config.
pub fn load_run_config(run_dir: &Path) -> Result<TrainConfig> {
    let path = run_dir.join(CONFIG_FILE);
    if !path.is_file() {
        bail!(
            "{} is not a run directory (no {CONFIG_FILE})",
            run_dir.display()
        );
    }
    TrainConfig::from_table(TrainConfig::read_table(&path)?)
}

/// The tokenizer a run directory was trained with.
pub fn load_run_tokenizer(run_dir: &Path, cfg: &TrainConfig) -> Result<Tokenizer> {
    match cfg.tokenizer {
        TokenizerKind::Byte => Ok(Tokenizer::Byte),
        TokenizerKind::Gpt2 => Tokenizer::gpt2(cfg.tokenizer_path.as_deref().map(Path::new)),
        TokenizerKind::Bpe => Tokenizer::from_file(&run_dir.join(TOKENIZER_FILE)),
    }
}

/// A run's reproducibility header (`run.json`).
pub fn load_run_header(run_dir: &Path) -> Result<RunHeader> {
    let path = run_dir.join(RUN_FILE);
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is corrupted", path.display()))
}

/// A run's trained model as its newest checkpoint holds it: the config, the tokenizer, the model
/// shape and the parameters (on `device`).
pub struct RunModel {
    pub cfg: TrainConfig,
    pub tokenizer: Tokenizer,
    pub model_cfg: GptConfig,
    pub params: Params,
}

/// Loads [`RunModel`] from `run_dir`; `device` defaults to the run's own.
pub fn load_run_model(run_dir: &Path, device: Option<&Device>) -> Result<(RunModel, Device)> {
    let cfg = load_run_config(run_dir)?;
    let device = match device {
        Some(d) => d.clone(),
        None => crate::device::parse_device(&cfg.device)?,
    };
    let tokenizer = load_run_tokenizer(run_dir, &cfg)?;
    let model_cfg = cfg.model_config(tokenizer.vocab_size())?;
    let ckpt = checkpoint::load_latest(run_dir, &device)?;
    let params = Params::from_tensors(&model_cfg, ckpt.model, DType::F32, &device)
        .with_context(|| format!("cannot load {}", ckpt.dir.display()))?;
    Ok((
        RunModel {
            cfg,
            tokenizer,
            model_cfg,
            params,
        },
        device,
    ))
}

/// The config with the keys a resume may change set to fixed values: equal identities mean the
/// same computation per step.
pub(super) fn identity(cfg: &TrainConfig) -> Result<toml::Table> {
    let mut t = cfg.to_table()?;
    for key in RESUME_OVERRIDABLE {
        t.remove(*key);
    }
    Ok(t)
}

/// A hash of [`identity`], stored in every checkpoint.
pub(super) fn identity_hash(cfg: &TrainConfig) -> Result<String> {
    Ok(crate::fsutil::sha256_hex(
        toml::to_string(&identity(cfg)?)?.as_bytes(),
    ))
}
