//! Run configuration: defaults in code → a TOML file → `--set key=value` overrides.
//!
//! Keys are flat, nanoGPT-style. Unknown keys and bad values are errors. Optimizer
//! hyperparameters left unset take the chosen optimizer's own defaults (see [`crate::optim`]).

use crate::model::GptConfig;
pub use crate::ops::Precision;
use crate::optim::{AdamConfig, AdoptConfig, AdoptVariant, OptimizerKind};
pub use crate::train::schedule::{DecayShape, ScheduleKind};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Every key a config file or `--set` may name.
pub const KEYS: &[&str] = &[
    "model",
    "init_from",
    "n_layer",
    "n_head",
    "n_embd",
    "block_size",
    "bias",
    "dropout",
    "data",
    "val_data",
    "data_format",
    "tokenizer",
    "tokenizer_path",
    "bpe_vocab_size",
    "val_fraction",
    "cache_dir",
    "optimizer",
    "lr",
    "min_lr",
    "schedule",
    "warmup_steps",
    "lr_decay_steps",
    "decay_fraction",
    "decay_shape",
    "max_steps",
    "max_tokens",
    "betas",
    "eps",
    "weight_decay",
    "decay_1d",
    "decouple",
    "clip_exponent",
    "variant",
    "momentum",
    "nesterov",
    "ns_steps",
    "ns_coefficients",
    "adjust_lr",
    "newton_schulz_dtype",
    "adamw_lr",
    "adamw_betas",
    "adamw_eps",
    "adamw_weight_decay",
    "grad_clip",
    "nan_policy",
    "skip_loss_zscore",
    "skip_grad_zscore",
    "zscore_window",
    "z_loss",
    "diag_interval",
    "diag_granularity",
    "peak_flops",
    "sample_interval",
    "sample_prompt",
    "sample_tokens",
    "batch_size",
    "grad_accum",
    "sampling",
    "eval_interval",
    "eval_iters",
    "eval_batch_size",
    "eval_seed",
    "log_interval",
    "keep_last",
    "zero_stage",
    "seed",
    "device",
    "dtype",
];

/// Keys that `train --resume` may change: they affect how long the run goes, how often it
/// reports and how its state is spread over ranks, never what a completed step computes.
pub const RESUME_OVERRIDABLE: &[&str] = &[
    "max_steps",
    "max_tokens",
    "eval_interval",
    "log_interval",
    "diag_interval",
    "diag_granularity",
    "peak_flops",
    "sample_interval",
    "sample_prompt",
    "sample_tokens",
    "keep_last",
    "zero_stage",
];

/// ADOPT's gradient clipping: `clip_exponent = 0.25` clamps the normalised gradient to
/// ±step^0.25; `clip_exponent = "none"` disables clipping.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ClipExponent {
    /// Clamp to ±step^exponent.
    Exponent(f64),
    /// The keyword `"none"`.
    Keyword(NoClip),
}

/// The keyword `"none"` for [`ClipExponent`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NoClip {
    /// No clipping.
    None,
}

/// Tokens per sample during training unless `sample_tokens` says (llm.c's `genT`).
pub const SAMPLE_TOKENS: usize = 64;

/// Muon's defaults in training: `torch.optim.Muon`'s, except the lr (modded-nanogpt's order of
/// magnitude, with the `original` shape adjustment) and no weight decay.
pub const MUON_TRAINING_DEFAULTS: crate::optim::MuonConfig = crate::optim::MuonConfig {
    lr: 0.02,
    momentum: 0.95,
    nesterov: true,
    weight_decay: 0.0,
    ns_steps: 5,
    ns_coefficients: [3.4445, -4.775, 2.0315],
    eps: 1e-7,
    adjust_lr: crate::optim::AdjustLr::Original,
    newton_schulz_precision: crate::optim::NewtonSchulzPrecision::Bf16,
};

/// Steps in the spike policy's windows unless `zscore_window` says (llm.c's window).
pub const ZSCORE_WINDOW: usize = 128;

/// The share of `lr_decay_steps` a `wsd` schedule's decay takes unless `decay_fraction` says.
pub const WSD_DECAY_FRACTION: f64 = 0.2;

/// What a non-finite loss or gradient does to a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NanPolicy {
    /// Stop with an error naming the step; the last good checkpoint stays.
    Stop,
    /// Skip the update (the batch is consumed), count it, log it, and go on.
    Skip,
}

/// Which tokenizer turns the corpus into ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenizerKind {
    /// GPT-2's byte-level BPE (50,257 tokens).
    Gpt2,
    /// Raw UTF-8 bytes (256 tokens).
    Byte,
    /// A byte-level BPE of `bpe_vocab_size` tokens trained on the training text.
    Bpe,
}

/// A training run's full configuration. `Option` fields fall back to the preset or optimizer
/// default; [`TrainConfig::resolved`] fills them in so the saved config states every value used.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// Model preset: `tiny`, `baby`, `gpt2`.
    pub model: String,
    /// `scratch`, or weights to start from: `gpt2`, `gpt2-medium`, `gpt2-large`, `gpt2-xl` (from
    /// the Hugging Face cache or Hub) or a `transformers` GPT-2 directory. Their shape replaces the
    /// preset's.
    pub init_from: String,
    pub n_layer: Option<usize>,
    pub n_head: Option<usize>,
    pub n_embd: Option<usize>,
    /// Context length; may not exceed the preset's (its position table's size).
    pub block_size: Option<usize>,
    pub bias: Option<bool>,
    pub dropout: Option<f64>,
    /// The training data: a UTF-8 text file (tokenized and split by `val_fraction`), a
    /// directory of llm.c token shards (`*_train_*.bin`, `*_val_*.bin`) or nanoGPT files
    /// (`train.bin`, `val.bin`), or a glob or single `.bin` file of training tokens.
    pub data: String,
    /// The validation token files (a glob of llm.c val shards, or nanoGPT's `val.bin`), when
    /// `data` names token files that a directory does not pair up.
    pub val_data: Option<String>,
    /// How token files are laid out: `auto` (llm.c by its header; headerless only as nanoGPT's
    /// train.bin/val.bin), `llmc` or `nanogpt`.
    #[serde(skip_serializing_if = "crate::data::shards::DataFormat::is_auto")]
    pub data_format: crate::data::shards::DataFormat,
    pub tokenizer: TokenizerKind,
    /// A `tokenizer.json` for `tokenizer = "gpt2"`; unset means the Hugging Face cache or hub.
    pub tokenizer_path: Option<String>,
    /// Vocabulary size of a trained `bpe` tokenizer.
    pub bpe_vocab_size: usize,
    /// The last `val_fraction` of the tokens form the validation split.
    pub val_fraction: f64,
    /// Where tokenized corpora are cached.
    pub cache_dir: String,
    pub optimizer: OptimizerKind,
    pub lr: Option<f64>,
    /// Floor of the cosine schedule; default `lr / 10`.
    pub min_lr: Option<f64>,
    pub schedule: ScheduleKind,
    pub warmup_steps: usize,
    /// The step at which the decay reaches `min_lr`; default `max_steps`.
    pub lr_decay_steps: Option<usize>,
    /// `wsd` only: the share of `lr_decay_steps` that its final decay takes (default 0.2).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decay_fraction: Option<f64>,
    /// `wsd` only: `linear` (default), `cosine` or `1-sqrt`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decay_shape: Option<DecayShape>,
    pub max_steps: usize,
    /// Train this many tokens (over every rank) instead of `max_steps`: the step count is the
    /// budget over the tokens per step, rounded up.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u64>,
    pub betas: Option<[f64; 2]>,
    pub eps: Option<f64>,
    pub weight_decay: Option<f64>,
    /// Apply weight decay to 1-D tensors (biases, LayerNorm) too; nanoGPT does not.
    pub decay_1d: bool,
    /// ADOPT only: decoupled (AdamW-style) weight decay.
    pub decouple: Option<bool>,
    /// ADOPT only: clipping exponent, or `"none"`.
    pub clip_exponent: Option<ClipExponent>,
    /// ADOPT only: `release` (torch-adopt 0.1.0) or `original` (the first published code).
    pub variant: Option<AdoptVariant>,
    /// Muon only: the momentum μ.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub momentum: Option<f64>,
    /// Muon only: Nesterov momentum.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nesterov: Option<bool>,
    /// Muon only: Newton–Schulz iterations.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ns_steps: Option<usize>,
    /// Muon only: the iteration's (a, b, c).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ns_coefficients: Option<[f64; 3]>,
    /// Muon only: `original`, `match_rms_adamw` or `spectral_unclamped`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub adjust_lr: Option<crate::optim::AdjustLr>,
    /// Muon only: the iteration's precision, `bf16`, `f32` or `f64`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub newton_schulz_dtype: Option<crate::optim::NewtonSchulzPrecision>,
    /// Muon only: the peak lr of the AdamW that updates every tensor Muon does not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub adamw_lr: Option<f64>,
    /// Muon only: that AdamW's betas.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub adamw_betas: Option<[f64; 2]>,
    /// Muon only: that AdamW's eps.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub adamw_eps: Option<f64>,
    /// Muon only: that AdamW's decoupled weight decay (on 2-D tensors, and 1-D with `decay_1d`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub adamw_weight_decay: Option<f64>,
    /// Clip gradients to this global L2 norm; 0 disables.
    pub grad_clip: f64,
    /// `stop` (default) or `skip` on a non-finite loss or gradient.
    pub nan_policy: NanPolicy,
    /// Skip a step whose loss lies more than this many standard deviations above the mean of
    /// the last `zscore_window` steps' losses (llm.c's `-sl`); 0 disables.
    #[serde(skip_serializing_if = "is_zero_f64")]
    pub skip_loss_zscore: f64,
    /// The same for the (pre-clip) gradient norm (llm.c's `-sg`); 0 disables.
    #[serde(skip_serializing_if = "is_zero_f64")]
    pub skip_grad_zscore: f64,
    /// Steps in the spike policy's windows (default 128, as llm.c); only with a `skip_*_zscore`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub zscore_window: Option<usize>,
    /// PaLM's z-loss: add this coefficient times the mean log²Z of the logits to the training
    /// objective (the logged `loss` stays the cross-entropy); 0 disables.
    #[serde(skip_serializing_if = "is_zero_f64")]
    pub z_loss: f64,
    /// Log per-layer gradient, update and weight norms every this many steps; 0 disables.
    #[serde(skip_serializing_if = "is_zero")]
    pub diag_interval: usize,
    /// What the diagnostics sum over: `group` (default) or `tensor`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub diag_granularity: Option<crate::train::diagnostics::DiagGranularity>,
    /// The hardware's peak FLOP/s that MFU is taken against (on CUDA the data sheet's, for
    /// GPUs it knows, when unset).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peak_flops: Option<f64>,
    /// Write a sample of generated text every this many steps; 0 disables.
    #[serde(skip_serializing_if = "is_zero")]
    pub sample_interval: usize,
    /// The samples' prompt; empty starts from `<|endoftext|>` (or a newline for bytes).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sample_prompt: Option<String>,
    /// Tokens per sample (default 64, as llm.c); only with `sample_interval`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sample_tokens: Option<usize>,
    /// Sequences per micro-step.
    pub batch_size: usize,
    /// Micro-steps per optimizer step.
    pub grad_accum: usize,
    /// How training windows are drawn: `random` (nanoGPT's) or `shuffled` (without replacement).
    #[serde(skip_serializing_if = "crate::data::Sampling::is_random")]
    pub sampling: crate::data::Sampling,
    pub eval_interval: usize,
    /// Batches per evaluation (of `eval_batch_size` fixed windows each).
    pub eval_iters: usize,
    /// Sequences per evaluation batch; `batch_size` when unset. Setting it lets runs with
    /// different batch sizes evaluate on the same windows.
    pub eval_batch_size: Option<usize>,
    /// Seed of the fixed evaluation windows, shared by runs of every `seed` so they compare.
    pub eval_seed: u64,
    /// Print a line every `log_interval` steps (every step is written to metrics.jsonl).
    pub log_interval: usize,
    /// Complete checkpoints to keep.
    pub keep_last: usize,
    /// Data parallel: 0 keeps the optimizer state whole on every rank; 1 shards it across ranks
    /// (ZeRO stage 1, llm.c's `-z 1`): each rank updates the parameters it owns, then sends them
    /// to the others. Results are the same bits either way.
    #[serde(skip_serializing_if = "is_zero")]
    pub zero_stage: usize,
    /// Seeds model initialisation, data order and dropout together.
    pub seed: u64,
    /// `cpu`, `cuda` or `cuda:N`.
    pub device: String,
    /// `f32`, or `bf16` mixed precision (CUDA, or CPU with oneDNN).
    pub dtype: Precision,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            model: "tiny".into(),
            init_from: "scratch".into(),
            n_layer: None,
            n_head: None,
            n_embd: None,
            block_size: None,
            bias: None,
            dropout: None,
            data: "data/tinyshakespeare.txt".into(),
            val_data: None,
            data_format: crate::data::shards::DataFormat::Auto,
            tokenizer: TokenizerKind::Byte,
            tokenizer_path: None,
            bpe_vocab_size: 1024,
            val_fraction: 0.1,
            cache_dir: "data/cache".into(),
            optimizer: OptimizerKind::AdamW,
            lr: None,
            min_lr: None,
            schedule: ScheduleKind::Cosine,
            warmup_steps: 100,
            lr_decay_steps: None,
            decay_fraction: None,
            decay_shape: None,
            max_steps: 2000,
            max_tokens: None,
            betas: None,
            eps: None,
            weight_decay: None,
            decay_1d: false,
            decouple: None,
            clip_exponent: None,
            variant: None,
            momentum: None,
            nesterov: None,
            ns_steps: None,
            ns_coefficients: None,
            adjust_lr: None,
            newton_schulz_dtype: None,
            adamw_lr: None,
            adamw_betas: None,
            adamw_eps: None,
            adamw_weight_decay: None,
            grad_clip: 1.0,
            nan_policy: NanPolicy::Stop,
            skip_loss_zscore: 0.0,
            skip_grad_zscore: 0.0,
            zscore_window: None,
            z_loss: 0.0,
            diag_interval: 0,
            diag_granularity: None,
            peak_flops: None,
            sample_interval: 0,
            sample_prompt: None,
            sample_tokens: None,
            batch_size: 16,
            grad_accum: 1,
            sampling: crate::data::Sampling::Random,
            eval_interval: 250,
            eval_iters: 20,
            eval_batch_size: None,
            eval_seed: 0,
            log_interval: 10,
            keep_last: 3,
            zero_stage: 0,
            seed: 1337,
            device: "cpu".into(),
            dtype: Precision::F32,
        }
    }
}

/// Parses one `key=value` override into a TOML table entry. The value is read as TOML
/// (`3e-4`, `true`, `[0.9, 0.95]`, `"adam"`); a bare word that is not TOML is taken as a string.
pub fn parse_override(assignment: &str) -> Result<(String, toml::Value)> {
    let (key, value) = assignment
        .split_once('=')
        .with_context(|| format!("override '{assignment}' is not key=value"))?;
    let key = key.trim().to_string();
    let value = value.trim();
    let parsed = toml::from_str::<toml::Table>(&format!("v = {value}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(value.to_string()));
    Ok((key, parsed))
}

/// Rejects keys that [`TrainConfig`] does not have, naming the first one.
fn check_keys(table: &toml::Table, origin: &str) -> Result<()> {
    for key in table.keys() {
        if !KEYS.contains(&key.as_str()) {
            bail!("unknown config key '{key}' in {origin}");
        }
    }
    Ok(())
}

/// Turns a serde error about one value into a one-line message naming its key. serde's message
/// for a bad enum value ("unknown variant `sgd`") does not say which key held it, so each key is
/// read alone over the defaults until one fails.
fn value_error(e: toml::de::Error, table: &toml::Table, origin: &str) -> anyhow::Error {
    let msg = e.message().replace('\n', " ");
    let culprit = table.iter().find(|(key, value)| {
        let alone = toml::Table::from_iter([((*key).clone(), (*value).clone())]);
        toml::Table::try_into::<TrainConfig>(alone).is_err()
    });
    match culprit {
        Some((key, _)) => anyhow::anyhow!("bad value for '{key}' in {origin}: {msg}"),
        None => anyhow::anyhow!("bad config value in {origin}: {msg}"),
    }
}

impl TrainConfig {
    /// Reads a TOML file into a table, rejecting unknown keys.
    pub fn read_table(path: &Path) -> Result<toml::Table> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config file {}", path.display()))?;
        let table: toml::Table = toml::from_str(&text).map_err(|e| {
            anyhow::anyhow!(
                "config file {} is not valid TOML: {}",
                path.display(),
                e.message().replace('\n', " ")
            )
        })?;
        check_keys(&table, &path.display().to_string())?;
        Ok(table)
    }

    /// Builds a config from defaults, an optional TOML table, and `key=value` overrides, then
    /// validates it and fills in preset and optimizer defaults.
    pub fn from_layers(file: Option<toml::Table>, overrides: &[String]) -> Result<Self> {
        let mut table = file.unwrap_or_default();
        let mut given = std::collections::HashSet::new();
        for assignment in overrides {
            let (key, value) = parse_override(assignment)?;
            // A run's length is max_steps or max_tokens: either on the command line replaces
            // the other from the file.
            match key.as_str() {
                "max_steps" => table.remove("max_tokens"),
                "max_tokens" => table.remove("max_steps"),
                _ => None,
            };
            given.insert(key.clone());
            table.insert(key, value);
        }
        check_keys(&table, "the config")?;
        // In a file max_tokens decides, since a run's saved config states both.
        if given.contains("max_steps") && given.contains("max_tokens") {
            bail!("--set max_steps and max_tokens both given; a run's length is one or the other");
        }
        Self::from_table(table)
    }

    /// Deserializes a complete or partial table (missing keys take defaults) and resolves it.
    pub fn from_table(table: toml::Table) -> Result<Self> {
        check_keys(&table, "the config")?;
        let cfg: TrainConfig = toml::Table::try_into(table.clone())
            .map_err(|e| value_error(e, &table, "the config"))?;
        cfg.resolved()
    }

    /// The preset's model shape with this config's overrides applied, for a given vocabulary.
    pub fn model_config(&self, vocab_size: usize) -> Result<GptConfig> {
        let preset = GptConfig::preset(&self.model)?;
        let block_size = self.block_size.unwrap_or(preset.block_size);
        // Pretrained weights bring their own shape (set from their config by `train`) and their
        // exact vocabulary: padded rows would be untrained logits.
        let pretrained = self.pretrained();
        if block_size > preset.block_size && !pretrained {
            bail!(
                "block_size {block_size} is larger than the '{}' preset allows ({})",
                self.model,
                preset.block_size
            );
        }
        let cfg = GptConfig {
            n_layer: self.n_layer.unwrap_or(preset.n_layer),
            n_head: self.n_head.unwrap_or(preset.n_head),
            n_embd: self.n_embd.unwrap_or(preset.n_embd),
            block_size,
            bias: self.bias.unwrap_or(preset.bias),
            dropout: self.dropout.unwrap_or(preset.dropout),
            vocab_size: if pretrained {
                vocab_size
            } else {
                GptConfig::padded_vocab(vocab_size)
            },
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Whether the run starts from pretrained weights (`init_from` other than `scratch`).
    pub fn pretrained(&self) -> bool {
        self.init_from != "scratch"
    }

    /// Checks every value and fills optimizer and schedule defaults, so the saved config is
    /// explicit. A `max_tokens` budget is turned into steps for one process; a run turns it into
    /// steps for its ranks with [`TrainConfig::for_world`].
    pub fn resolved(self) -> Result<Self> {
        self.resolved_for_world(1)
    }

    /// The config resolved for `world_size` ranks: with `max_tokens`, `max_steps` becomes the
    /// budget over the tokens that many ranks train per step, and `lr_decay_steps` (unless
    /// given) that step count, pinned so that a resumed run keeps its schedule.
    pub fn for_world(self, world_size: usize) -> Result<Self> {
        let mut cfg = self.resolved_for_world(world_size)?;
        if cfg.max_tokens.is_some() {
            cfg.lr_decay_steps.get_or_insert(cfg.max_steps);
        }
        Ok(cfg)
    }

    /// Whether this run's bf16 matmuls run on the CPU (oneDNN's, or widened to f32 without its
    /// bf16 kernels).
    pub fn cpu_bf16(&self) -> bool {
        self.dtype == Precision::Bf16 && !self.device.starts_with("cuda")
    }

    /// The config as a TOML table (every key explicit once resolved).
    pub fn to_table(&self) -> Result<toml::Table> {
        Ok(toml::Table::try_from(self)?)
    }

    /// The config as TOML text, for printing and saving.
    pub fn to_toml(&self) -> Result<String> {
        Ok(toml::to_string(self)?)
    }

    /// A stable hash of the resolved config, stored in checkpoints.
    pub fn hash(&self) -> Result<String> {
        Ok(crate::fsutil::sha256_hex(self.to_toml()?.as_bytes()))
    }

    /// The optimizer's hyperparameters: each key the config gives, and the optimizer's default for
    /// each it leaves out (the one place those defaults are applied; [`TrainConfig::resolved`]
    /// writes them into the config).
    pub fn optimizer_settings(&self) -> crate::optim::OptimizerSettings {
        match self.optimizer {
            OptimizerKind::Adam | OptimizerKind::AdamW => {
                let d = AdamConfig::defaults(self.optimizer);
                let [beta1, beta2] = self.betas.unwrap_or([d.beta1, d.beta2]);
                crate::optim::OptimizerSettings::Adam(AdamConfig {
                    lr: self.lr.unwrap_or(d.lr),
                    beta1,
                    beta2,
                    eps: self.eps.unwrap_or(d.eps),
                    weight_decay: self.weight_decay.unwrap_or(d.weight_decay),
                    decoupled: d.decoupled,
                })
            }
            OptimizerKind::Adopt => {
                let d = AdoptConfig::default();
                let [beta1, beta2] = self.betas.unwrap_or([d.beta1, d.beta2]);
                let variant = self.variant.unwrap_or(d.variant);
                crate::optim::OptimizerSettings::Adopt(AdoptConfig {
                    lr: self.lr.unwrap_or(d.lr),
                    beta1,
                    beta2,
                    eps: self.eps.unwrap_or(d.eps),
                    weight_decay: self.weight_decay.unwrap_or(d.weight_decay),
                    decouple: self.decouple.unwrap_or(d.decouple),
                    clip_exponent: match (self.clip_exponent, variant) {
                        (_, AdoptVariant::Original) => None,
                        (Some(ClipExponent::Exponent(e)), _) => Some(e),
                        (Some(ClipExponent::Keyword(NoClip::None)), _) => None,
                        (None, _) => d.clip_exponent,
                    },
                    variant,
                })
            }
            OptimizerKind::Muon => {
                let d = MUON_TRAINING_DEFAULTS;
                let a = AdamConfig::defaults(OptimizerKind::AdamW);
                let [beta1, beta2] = self.adamw_betas.unwrap_or([a.beta1, a.beta2]);
                crate::optim::OptimizerSettings::Muon {
                    muon: crate::optim::MuonConfig {
                        lr: self.lr.unwrap_or(d.lr),
                        momentum: self.momentum.unwrap_or(d.momentum),
                        nesterov: self.nesterov.unwrap_or(d.nesterov),
                        weight_decay: self.weight_decay.unwrap_or(d.weight_decay),
                        ns_steps: self.ns_steps.unwrap_or(d.ns_steps),
                        ns_coefficients: self.ns_coefficients.unwrap_or(d.ns_coefficients),
                        eps: self.eps.unwrap_or(d.eps),
                        adjust_lr: self.adjust_lr.unwrap_or(d.adjust_lr),
                        newton_schulz_precision: self
                            .newton_schulz_dtype
                            .unwrap_or(d.newton_schulz_precision),
                    },
                    adamw: AdamConfig {
                        lr: self.adamw_lr.unwrap_or(a.lr),
                        beta1,
                        beta2,
                        eps: self.adamw_eps.unwrap_or(a.eps),
                        weight_decay: self.adamw_weight_decay.unwrap_or(a.weight_decay),
                        decoupled: true,
                    },
                }
            }
        }
    }

    /// The peak learning rate: `lr`, or the optimizer's default.
    pub fn peak_lr(&self) -> f64 {
        match self.optimizer_settings() {
            crate::optim::OptimizerSettings::Adam(c) => c.lr,
            crate::optim::OptimizerSettings::Adopt(c) => c.lr,
            crate::optim::OptimizerSettings::Muon { muon, .. } => muon.lr,
        }
    }

    /// `min_lr`, or a tenth of the peak learning rate.
    pub fn min_lr_or_default(&self) -> f64 {
        self.min_lr.unwrap_or(self.peak_lr() / 10.0)
    }

    /// Whether steps are judged by the spike policy (a `skip_*_zscore` above 0).
    pub fn spike_policy(&self) -> bool {
        self.skip_loss_zscore > 0.0 || self.skip_grad_zscore > 0.0
    }

    /// The learning-rate schedule this config trains with.
    pub fn schedule(&self) -> crate::train::schedule::Schedule {
        crate::train::schedule::Schedule {
            kind: self.schedule,
            lr: self.peak_lr(),
            min_lr: self.min_lr_or_default(),
            warmup_steps: self.warmup_steps,
            decay_steps: self.lr_decay_steps_or_default(),
            wsd: self.decay_fraction.zip(self.decay_shape),
        }
    }

    /// `lr_decay_steps`, or `max_steps`.
    pub fn lr_decay_steps_or_default(&self) -> usize {
        self.lr_decay_steps.unwrap_or(self.max_steps)
    }
}

/// Whether a count is zero (its default, left out of saved configs to keep their hashes).
fn is_zero(n: &usize) -> bool {
    *n == 0
}

/// Whether a threshold is zero (off, its default, left out of saved configs likewise).
fn is_zero_f64(x: &f64) -> bool {
    *x == 0.0
}

mod resolve;
#[cfg(test)]
mod tests;
