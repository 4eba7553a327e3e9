//! The training loop, in nanoGPT's order: set lr → micro-steps with gradient accumulation → clip →
//! optimizer step → log → (every `eval_interval` steps and at the end) evaluate and checkpoint.
//!
//! A run directory holds `config.toml` (the resolved config), `run.json` (reproducibility header),
//! `metrics.jsonl` (one JSON object per event), `tokenizer.json` (trained BPE only) and
//! `checkpoints/`. On CPU a resumed run is bitwise identical to an uninterrupted one: parameters,
//! optimizer moments and the data stream position are restored exactly, the schedule is a pure
//! function of the step, and dropout masks are drawn from a stream keyed by the step.

pub mod checkpoint;
pub mod faults;
pub mod metrics;
pub mod runlock;
pub mod schedule;
pub mod signals;

use crate::config::{NanPolicy, TokenizerKind, TrainConfig, RESUME_OVERRIDABLE};
use crate::data::tokenizer::Tokenizer;
use crate::data::{eval_windows, BatchSampler, Corpus, Split, TokenData};
use crate::model::{Gpt, GptConfig, Params};
use crate::optim::{self, Optimizer};
use anyhow::{bail, Context, Result};
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor};
use checkpoint::TrainState;
use metrics::Metrics;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use runlock::RunLock;
use schedule::Schedule;
use serde::{Deserialize, Serialize};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Instant;

const CONFIG_FILE: &str = "config.toml";
const RUN_FILE: &str = "run.json";
const TOKENIZER_FILE: &str = "tokenizer.json";

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
    /// Changes accepted on resume with `--allow-data-change`, one line each.
    #[serde(default)]
    pub overrides: Vec<String>,
}

/// How a training run ended.
#[derive(Debug, Clone)]
pub struct TrainSummary {
    pub run_dir: PathBuf,
    /// Optimizer steps completed.
    pub step: u64,
    /// The last validation loss measured.
    pub val_loss: Option<f64>,
    pub best_val_loss: Option<f64>,
}

/// Options that affect how a run reports, not what it computes.
#[derive(Debug, Clone, Default)]
pub struct Reporting {
    /// Print nothing but errors and warnings (tests).
    pub quiet: bool,
}

/// Options of `train --resume`.
#[derive(Debug, Clone, Default)]
pub struct ResumeOptions {
    /// Accept a corpus or tokenizer whose content changed since the run started (recorded in
    /// run.json).
    pub allow_data_change: bool,
}

/// A run stopped by SIGINT or SIGTERM after checkpointing; `main` exits with 128 + signal.
#[derive(Debug)]
pub struct Interrupted {
    pub signal: i32,
    pub step: u64,
    pub checkpoint: PathBuf,
    pub run_dir: PathBuf,
}

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "interrupted by {} after step {}; saved {}; continue with --resume {}",
            signals::name(self.signal),
            self.step,
            self.checkpoint.display(),
            self.run_dir.display()
        )
    }
}

impl std::error::Error for Interrupted {}

/// Everything a run needs, assembled from a config (new run) or a run directory (resume).
struct Setup {
    cfg: TrainConfig,
    run_dir: PathBuf,
    device: Device,
    data: TokenData,
    model_cfg: GptConfig,
    params: Params,
    optimizer: Box<dyn Optimizer>,
    sampler: BatchSampler,
    step: u64,
    tokens: u64,
    best_val_loss: Option<f64>,
    skipped_steps: u64,
    lock: RunLock,
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
fn identity(cfg: &TrainConfig) -> Result<toml::Table> {
    let mut t = cfg.to_table()?;
    for key in RESUME_OVERRIDABLE {
        t.remove(*key);
    }
    Ok(t)
}

fn identity_hash(cfg: &TrainConfig) -> Result<String> {
    Ok(crate::fsutil::sha256_hex(
        toml::to_string(&identity(cfg)?)?.as_bytes(),
    ))
}

/// Starts a new run in `run_dir`, which must not exist yet (or be empty).
pub fn train_new(
    mut cfg: TrainConfig,
    run_dir: &Path,
    reporting: &Reporting,
) -> Result<TrainSummary> {
    if run_dir.exists()
        && std::fs::read_dir(run_dir)
            .map(|mut d| d.next().is_some())
            .unwrap_or(true)
    {
        bail!(
            "run directory {} already exists; continue it with --resume {0} or pick another --out",
            run_dir.display()
        );
    }
    let device = crate::device::parse_device(&cfg.device)?;
    let corpus = Corpus::read(Path::new(&cfg.data))?;
    let tokenizer = match cfg.tokenizer {
        TokenizerKind::Byte => Tokenizer::Byte,
        TokenizerKind::Gpt2 => Tokenizer::gpt2(cfg.tokenizer_path.as_deref().map(Path::new))?,
        TokenizerKind::Bpe => {
            Tokenizer::train_bpe(corpus.training_text(cfg.val_fraction), cfg.bpe_vocab_size)?
        }
    };
    let pretrained = match cfg.pretrained() {
        true => Some(adopt_pretrained_shape(&mut cfg, tokenizer.vocab_size())?),
        false => None,
    };
    let model_cfg = cfg.model_config(tokenizer.vocab_size())?;
    let data = TokenData::load(
        &corpus,
        &tokenizer,
        Path::new(&cfg.cache_dir),
        cfg.val_fraction,
        model_cfg.block_size,
    )?;
    let params = match &pretrained {
        Some(dir) => crate::model::hf::read_weights(dir, &model_cfg, &device)?,
        None => Params::init(&model_cfg, cfg.seed, DType::F32, &device)?,
    };
    let optimizer = build_optimizer(&cfg, &params)?;

    // Inputs are valid: only now touch the disk.
    std::fs::create_dir_all(run_dir)
        .with_context(|| format!("cannot create run directory {}", run_dir.display()))?;
    let lock = RunLock::acquire(run_dir)?;
    if run_dir.join(CONFIG_FILE).exists() {
        bail!(
            "run directory {} was started by another process meanwhile",
            run_dir.display()
        );
    }
    crate::fsutil::write_atomic(&run_dir.join(CONFIG_FILE), cfg.to_toml()?.as_bytes())?;
    let header = RunHeader {
        crate_version: env!("CARGO_PKG_VERSION").to_string(),
        git_commit: env!("GPT_PRETRAIN_GIT_COMMIT").to_string(),
        seed: cfg.seed,
        device: cfg.device.clone(),
        start_time: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        corpus: corpus.path.display().to_string(),
        corpus_sha256: corpus.sha256.clone(),
        tokenizer_sha256: tokenizer.fingerprint()?,
        vocab_size: tokenizer.vocab_size(),
        n_tokens: data.len(),
        n_params: model_cfg.n_params(),
        model: model_cfg.clone(),
        overrides: Vec::new(),
    };
    crate::fsutil::write_atomic(
        &run_dir.join(RUN_FILE),
        serde_json::to_string_pretty(&header)?.as_bytes(),
    )?;
    if cfg.tokenizer == TokenizerKind::Bpe {
        crate::fsutil::write_atomic(
            &run_dir.join(TOKENIZER_FILE),
            tokenizer.to_json()?.as_bytes(),
        )?;
    }
    let sampler = BatchSampler::new(cfg.seed);
    run(
        Setup {
            cfg,
            run_dir: run_dir.to_path_buf(),
            device,
            data,
            model_cfg,
            params,
            optimizer,
            sampler,
            step: 0,
            tokens: 0,
            best_val_loss: None,
            skipped_steps: 0,
            lock,
        },
        reporting,
    )
}

/// Finds the `init_from` weights and makes their shape the run's: explicit shape keys must agree,
/// `block_size` may crop the position table. Returns the weights' directory.
fn adopt_pretrained_shape(cfg: &mut TrainConfig, vocab: usize) -> Result<PathBuf> {
    let dir = crate::model::hf::resolve(&cfg.init_from)?;
    let shape = crate::model::hf::read_config(&dir)?;
    if shape.vocab_size != vocab {
        bail!(
            "init_from {} has a vocabulary of {}, the {:?} tokenizer {vocab}",
            cfg.init_from,
            shape.vocab_size,
            cfg.tokenizer
        );
    }
    for (key, set, theirs) in [
        ("n_layer", cfg.n_layer, shape.n_layer),
        ("n_head", cfg.n_head, shape.n_head),
        ("n_embd", cfg.n_embd, shape.n_embd),
    ] {
        if set.is_some_and(|v| v != theirs) {
            bail!(
                "{key} = {} disagrees with init_from {} ({theirs})",
                set.unwrap(),
                cfg.init_from
            );
        }
    }
    if cfg.bias == Some(false) {
        bail!("init_from GPT-2 weights have biases; drop bias = false");
    }
    let block = cfg.block_size.unwrap_or(shape.block_size);
    if block > shape.block_size {
        bail!(
            "block_size {block} is larger than init_from {} allows ({})",
            cfg.init_from,
            shape.block_size
        );
    }
    cfg.n_layer = Some(shape.n_layer);
    cfg.n_head = Some(shape.n_head);
    cfg.n_embd = Some(shape.n_embd);
    cfg.block_size = Some(block);
    cfg.bias = Some(true);
    Ok(dir)
}

/// Continues the run in `run_dir` from its newest complete checkpoint. `config_file` (if given)
/// and `overrides` may change only [`RESUME_OVERRIDABLE`] keys.
pub fn train_resume(
    run_dir: &Path,
    config_file: Option<toml::Table>,
    overrides: &[String],
    options: &ResumeOptions,
    reporting: &Reporting,
) -> Result<TrainSummary> {
    let saved = load_run_config(run_dir)?;
    let lock = RunLock::acquire(run_dir)?;
    let mut table = saved.to_table()?;
    if let Some(file) = config_file {
        let requested = TrainConfig::from_table(file)?;
        let (a, b) = (identity(&saved)?, identity(&requested)?);
        if let Some(key) = a.keys().find(|k| a.get(*k) != b.get(*k)) {
            bail!(
                "--config differs from the run's saved config in '{key}'; a resumed run may change only {}",
                RESUME_OVERRIDABLE.join(", ")
            );
        }
        for key in RESUME_OVERRIDABLE {
            if let Some(v) = requested.to_table()?.get(*key) {
                table.insert(key.to_string(), v.clone());
            }
        }
    }
    for assignment in overrides {
        let (key, value) = crate::config::parse_override(assignment)?;
        if !RESUME_OVERRIDABLE.contains(&key.as_str()) {
            bail!(
                "cannot change '{key}' when resuming (it would change the model, data, tokenizer or \
                 optimizer); only {} may be overridden",
                RESUME_OVERRIDABLE.join(", ")
            );
        }
        table.insert(key, value);
    }
    let cfg = TrainConfig::from_table(table)?;
    let mut header = load_run_header(run_dir)?;

    let device = crate::device::parse_device(&cfg.device)?;
    let ckpt = checkpoint::load_latest(run_dir, &device)?;
    if ckpt.state.config_hash != identity_hash(&cfg)? {
        bail!(
            "checkpoint {} was written with a different config than {}",
            ckpt.dir.display(),
            run_dir.join(CONFIG_FILE).display()
        );
    }
    let corpus = Corpus::read(Path::new(&cfg.data))?;
    let tokenizer = load_run_tokenizer(run_dir, &cfg)?;
    let fingerprint = tokenizer.fingerprint()?;
    let mut changes = Vec::new();
    if corpus.sha256 != header.corpus_sha256 {
        changes.push(format!(
            "corpus {} (sha256 {} then, {} now)",
            cfg.data,
            &header.corpus_sha256[..12],
            &corpus.sha256[..12]
        ));
    }
    if fingerprint != header.tokenizer_sha256 {
        changes.push(format!(
            "tokenizer (sha256 {} then, {} now)",
            &header.tokenizer_sha256[..12],
            &fingerprint[..12]
        ));
    }
    if !changes.is_empty() {
        if !options.allow_data_change {
            bail!(
                "{} changed since the run started; refusing to resume (--allow-data-change accepts it and records it in run.json)",
                changes.join(" and ")
            );
        }
        for change in changes {
            eprintln!("warning: resuming with a changed {change}");
            header.overrides.push(format!(
                "at step {}: {change}, accepted with --allow-data-change",
                ckpt.state.step
            ));
        }
        header.corpus_sha256 = corpus.sha256.clone();
        header.tokenizer_sha256 = fingerprint;
        crate::fsutil::write_atomic(
            &run_dir.join(RUN_FILE),
            serde_json::to_string_pretty(&header)?.as_bytes(),
        )?;
    }
    let model_cfg = cfg.model_config(tokenizer.vocab_size())?;
    let data = TokenData::load(
        &corpus,
        &tokenizer,
        Path::new(&cfg.cache_dir),
        cfg.val_fraction,
        model_cfg.block_size,
    )?;
    let params = Params::from_tensors(&model_cfg, ckpt.model, DType::F32, &device)
        .with_context(|| format!("cannot load {}", ckpt.dir.display()))?;
    let mut optimizer = build_optimizer(&cfg, &params)?;
    optimizer
        .load_state_tensors(&ckpt.optimizer)
        .with_context(|| format!("cannot load optimizer state from {}", ckpt.dir.display()))?;
    let word_pos: u128 = ckpt
        .state
        .data_word_pos
        .parse()
        .with_context(|| format!("bad data_word_pos in {}", ckpt.dir.display()))?;
    // What a crash may have left behind: half-written checkpoint directories, and metrics for
    // steps after the checkpoint (or a torn last line).
    for name in checkpoint::remove_incomplete(run_dir)? {
        eprintln!(
            "warning: removed incomplete checkpoint {name} (a crash interrupted its writing)"
        );
    }
    let reconciled = metrics::reconcile(run_dir, ckpt.state.step)?;
    if reconciled.torn {
        eprintln!(
            "warning: {}: its last line was incomplete (a crash mid-write); moved to {}",
            metrics::METRICS_FILE,
            metrics::SUPERSEDED_FILE
        );
    }
    if reconciled.superseded > 0 {
        eprintln!(
            "warning: {}: {} events after step {} are superseded by this resume; moved to {}",
            metrics::METRICS_FILE,
            reconciled.superseded,
            ckpt.state.step,
            metrics::SUPERSEDED_FILE
        );
    }
    if !reporting.quiet {
        println!(
            "resuming {} from {} (step {})",
            run_dir.display(),
            ckpt.dir.display(),
            ckpt.state.step
        );
    }
    run(
        Setup {
            sampler: BatchSampler::at(ckpt.state.data_seed, word_pos),
            step: ckpt.state.step,
            tokens: ckpt.state.tokens,
            best_val_loss: ckpt.state.best_val_loss,
            skipped_steps: ckpt.state.skipped_steps,
            lock,
            cfg,
            run_dir: run_dir.to_path_buf(),
            device,
            data,
            model_cfg,
            params,
            optimizer,
        },
        reporting,
    )
}

fn build_optimizer(cfg: &TrainConfig, params: &Params) -> Result<Box<dyn Optimizer>> {
    let groups = optim::param_groups(
        &params.named_vars(),
        cfg.weight_decay.unwrap_or(0.0),
        cfg.decay_1d,
    );
    Ok(optim::build(&cfg.optimizer_settings(), groups)?)
}

/// Mean loss over fixed windows, without dropout.
fn evaluate(
    model: &Gpt,
    data: &TokenData,
    split: Split,
    cfg: &TrainConfig,
    device: &Device,
) -> Result<f64> {
    let block = model.config().block_size;
    let windows = eval_windows(
        data,
        split,
        cfg.eval_seed,
        cfg.eval_iters,
        cfg.eval_batch_size.unwrap_or(cfg.batch_size),
        block,
    );
    let mut total = 0.0;
    for starts in &windows {
        let (x, y) = data.batch(split, starts, block, device)?;
        total += model
            .eval_loss(&x, &y)?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?;
    }
    Ok(total / windows.len() as f64)
}

/// Global L2 norm of the gradients, summed in name order in f64 so it is reproducible. On a GPU
/// each tensor's sum of squares stays on the device and one scalar comes back.
pub fn grad_norm(params: &Params, grads: &GradStore) -> Result<f64> {
    let mut sum = 0.0;
    let mut device_sums = Vec::new();
    for var in params.vars() {
        if let Some(g) = grads.get(var.as_tensor()) {
            if g.device().is_cpu() {
                sum += crate::ops::grad_norm::sum_of_squares(g)?;
            } else {
                device_sums.push(crate::ops::grad_norm::sum_of_squares_on_device(g)?);
            }
        }
    }
    if !device_sums.is_empty() {
        sum += Tensor::stack(&device_sums, 0)?
            .sum_all()?
            .to_scalar::<f64>()?;
    }
    Ok(sum.sqrt())
}

/// Multiplies every gradient by `factor`.
fn scale_grads(params: &Params, grads: &mut GradStore, factor: f64) -> Result<()> {
    for var in params.vars() {
        if let Some(g) = grads.remove(var.as_tensor()) {
            grads.insert(var.as_tensor(), (g * factor)?);
        }
    }
    Ok(())
}

fn print_config(
    cfg: &TrainConfig,
    model_cfg: &GptConfig,
    run_dir: &Path,
    n_train: usize,
    n_val: usize,
) -> Result<()> {
    println!("run directory: {}", run_dir.display());
    println!("---- resolved config ----");
    print!("{}", cfg.to_toml()?);
    println!("-------------------------");
    println!(
        "model: {} layers, {} heads, {} wide, block {}, vocab {} ({:.2}M parameters)",
        model_cfg.n_layer,
        model_cfg.n_head,
        model_cfg.n_embd,
        model_cfg.block_size,
        model_cfg.vocab_size,
        model_cfg.n_params() as f64 / 1e6
    );
    println!("data: {n_train} train tokens, {n_val} validation tokens");
    Ok(())
}

/// The training loop's state between steps.
struct Trainer {
    cfg: TrainConfig,
    run_dir: PathBuf,
    device: Device,
    data: TokenData,
    model_cfg: GptConfig,
    params: Params,
    model: Gpt,
    optimizer: Box<dyn Optimizer>,
    sampler: BatchSampler,
    step: u64,
    tokens: u64,
    best_val_loss: Option<f64>,
    skipped_steps: u64,
    metrics: Metrics,
    config_hash: String,
    quiet: bool,
}

/// What one optimizer step produced.
struct StepOutcome {
    loss: f64,
    norm: f64,
    lr: f64,
    /// Skipped for a non-finite loss or gradient (`nan_policy = "skip"`).
    skipped: bool,
}

impl Trainer {
    /// Evaluates both splits on the fixed windows and logs the result.
    fn evaluate(&mut self) -> Result<(f64, f64)> {
        let val = evaluate(&self.model, &self.data, Split::Val, &self.cfg, &self.device)?;
        let train = evaluate(
            &self.model,
            &self.data,
            Split::Train,
            &self.cfg,
            &self.device,
        )?;
        if !val.is_finite() {
            bail!(
                "validation loss became {val} at step {}; stopped without saving a checkpoint",
                self.step
            );
        }
        if self.best_val_loss.is_none_or(|b| val < b) {
            self.best_val_loss = Some(val);
        }
        self.metrics.write(serde_json::json!({
            "step": self.step, "tokens": self.tokens, "split": "val", "loss": val, "train_loss": train,
        }))?;
        Ok((val, train))
    }

    /// Writes a checkpoint of the current step (metrics are synced first, so every saved step has
    /// its events on disk).
    fn checkpoint(&mut self) -> Result<PathBuf> {
        self.metrics.sync()?;
        let state = TrainState {
            step: self.step,
            tokens: self.tokens,
            data_seed: self.cfg.seed,
            data_word_pos: self.sampler.word_pos().to_string(),
            best_val_loss: self.best_val_loss,
            config_hash: self.config_hash.clone(),
            skipped_steps: self.skipped_steps,
            checksums: Default::default(),
        };
        checkpoint::save(
            &self.run_dir,
            &self.params.tensors(),
            &self.optimizer.state_tensors()?,
            state,
            self.cfg.keep_last,
        )
    }

    /// Evaluates, then checkpoints unless this is the step-0 evaluation; returns the val loss.
    fn evaluate_and_checkpoint(&mut self) -> Result<f64> {
        let (val, train) = self.evaluate()?;
        let saved = if self.step > 0 {
            format!(", saved {}", self.checkpoint()?.display())
        } else {
            self.metrics.sync()?;
            String::new()
        };
        if !self.quiet {
            println!(
                "step {}: val loss {val:.4}, train loss {train:.4}{saved}",
                self.step
            );
        }
        Ok(val)
    }

    /// One optimizer step: micro-steps with gradient accumulation, clipping, update.
    fn train_step(&mut self, schedule: &Schedule) -> Result<StepOutcome> {
        let cfg = &self.cfg;
        let block = self.model_cfg.block_size;
        let lr = schedule.lr_at(self.step as usize);
        let mut grads: Option<GradStore> = None;
        // Micro-step losses stay on the device until the step ends: one transfer per step.
        let mut losses = Vec::with_capacity(cfg.grad_accum);
        for micro in 0..cfg.grad_accum {
            let starts =
                self.sampler
                    .next_starts(self.data.split_len(Split::Train), block, cfg.batch_size);
            let (x, y) = self
                .data
                .batch(Split::Train, &starts, block, &self.device)?;
            // Dropout masks come from a stream keyed by (seed, micro-step index): no state to save.
            let mut dropout_rng = (self.model_cfg.dropout > 0.0).then(|| {
                let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
                rng.set_stream(1 + self.step * cfg.grad_accum as u64 + micro as u64);
                rng
            });
            let mut loss = self.model.loss(&x, &y, dropout_rng.as_mut())?;
            if faults::nan_at(self.step + 1) {
                loss = (loss * f64::NAN)?;
            }
            losses.push(loss.detach().to_dtype(DType::F64)?);
            let loss = if cfg.grad_accum > 1 {
                (loss / cfg.grad_accum as f64)?
            } else {
                loss
            };
            let g = loss.backward()?;
            match grads.as_mut() {
                None => grads = Some(g),
                Some(acc) => {
                    for var in self.params.vars() {
                        if let Some(gi) = g.get(var.as_tensor()) {
                            let sum = match acc.get(var.as_tensor()) {
                                Some(a) => (a + gi)?,
                                None => gi.clone(),
                            };
                            acc.insert(var.as_tensor(), sum);
                        }
                    }
                }
            }
        }
        let loss =
            Tensor::stack(&losses, 0)?.sum_all()?.to_scalar::<f64>()? / cfg.grad_accum as f64;
        let mut grads = grads.expect("grad_accum >= 1");
        let norm = grad_norm(&self.params, &grads)?;
        let finite = loss.is_finite() && norm.is_finite();
        if !finite {
            match cfg.nan_policy {
                NanPolicy::Stop => {
                    let last = checkpoint::list_complete(&self.run_dir)?
                        .last()
                        .map(|(_, d)| d.display().to_string())
                        .unwrap_or_else(|| "none".into());
                    bail!(
                        "loss became {loss} (gradient norm {norm}) at step {}; stopped without saving (last good checkpoint: {last})",
                        self.step + 1
                    );
                }
                NanPolicy::Skip => self.skipped_steps += 1,
            }
        } else {
            if cfg.grad_clip > 0.0 && norm > cfg.grad_clip {
                // torch.nn.utils.clip_grad_norm_'s coefficient.
                scale_grads(&self.params, &mut grads, cfg.grad_clip / (norm + 1e-6))?;
            }
            self.optimizer.update(&grads, lr)?;
        }
        self.step += 1;
        self.tokens += (cfg.batch_size * cfg.grad_accum * block) as u64;
        Ok(StepOutcome {
            loss,
            norm,
            lr,
            skipped: !finite,
        })
    }
}

fn run(setup: Setup, reporting: &Reporting) -> Result<TrainSummary> {
    let Setup {
        cfg,
        run_dir,
        device,
        data,
        model_cfg,
        params,
        optimizer,
        sampler,
        step,
        tokens,
        best_val_loss,
        skipped_steps,
        lock: _lock,
    } = setup;
    signals::install().context("cannot install signal handlers")?;
    let schedule = Schedule {
        kind: cfg.schedule,
        lr: cfg.lr.expect("resolved"),
        min_lr: cfg.min_lr.expect("resolved"),
        warmup_steps: cfg.warmup_steps,
        decay_steps: cfg.lr_decay_steps.expect("resolved"),
    };
    let quiet = reporting.quiet;
    if !quiet {
        print_config(
            &cfg,
            &model_cfg,
            &run_dir,
            data.split_len(Split::Train),
            data.split_len(Split::Val),
        )?;
    }
    let mut t = Trainer {
        model: Gpt::with_compute_dtype(&model_cfg, &params, cfg.dtype.compute_dtype())?,
        metrics: Metrics::open(&run_dir)?,
        config_hash: identity_hash(&cfg)?,
        cfg,
        run_dir,
        device,
        data,
        model_cfg,
        params,
        optimizer,
        sampler,
        step,
        tokens,
        best_val_loss,
        skipped_steps,
        quiet,
    };
    let mut last_val = None;
    if t.step == 0 {
        last_val = Some(t.evaluate_and_checkpoint()?);
    }
    let max_steps = t.cfg.max_steps as u64;
    let progress = (!quiet && std::io::stderr().is_terminal()).then(|| {
        let bar = indicatif::ProgressBar::new(max_steps);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:30} {pos}/{len} steps | {msg} | eta {eta}",
            )
            .expect("valid template"),
        );
        bar.set_position(t.step);
        bar
    });
    let tokens_per_step = (t.cfg.batch_size * t.cfg.grad_accum * t.model_cfg.block_size) as f64;

    while t.step < max_steps {
        let started = Instant::now();
        let out = t.train_step(&schedule)?;
        let step = t.step;
        let secs = started.elapsed().as_secs_f64();
        let tok_per_s = tokens_per_step / secs;
        let mut event = serde_json::json!({
            "step": step, "tokens": t.tokens, "split": "train", "loss": out.loss, "lr": out.lr,
            "grad_norm": out.norm, "ms": secs * 1e3, "tok_per_s": tok_per_s,
        });
        if out.skipped {
            // JSON has no NaN: a skipped step logs null loss and norm, and says it was skipped.
            event["loss"] = serde_json::Value::Null;
            event["grad_norm"] = serde_json::Value::Null;
            event["skipped"] = true.into();
            event["skipped_steps"] = t.skipped_steps.into();
            eprintln!(
                "warning: step {step} skipped: non-finite loss {} or gradient norm {} ({} skipped so far)",
                out.loss, out.norm, t.skipped_steps
            );
        }
        t.metrics.write(event)?;
        if let Some(bar) = &progress {
            bar.set_position(step);
            bar.set_message(format!("loss {:.4} | {tok_per_s:.0} tok/s", out.loss));
        } else if !quiet && (step.is_multiple_of(t.cfg.log_interval as u64) || step == 1) {
            println!(
                "step {step}/{max_steps} | loss {:.4} | lr {:.3e} | grad norm {:.3} | {:.0} ms | {tok_per_s:.0} tok/s",
                out.loss,
                out.lr,
                out.norm,
                secs * 1e3
            );
        }
        if let Some(signal) = signals::requested() {
            // Finish what this step started: checkpoint it, then stop.
            let checkpoint = t.checkpoint()?;
            if let Some(bar) = &progress {
                bar.abandon();
            }
            return Err(Interrupted {
                signal,
                step,
                checkpoint,
                run_dir: t.run_dir.clone(),
            }
            .into());
        }
        if step.is_multiple_of(t.cfg.eval_interval as u64) || step == max_steps {
            // Keep the progress bar from overwriting the evaluation line.
            let val = match &progress {
                Some(bar) => bar.suspend(|| t.evaluate_and_checkpoint())?,
                None => t.evaluate_and_checkpoint()?,
            };
            last_val = Some(val);
        }
    }
    if let Some(bar) = progress {
        bar.finish_and_clear();
    }
    Ok(TrainSummary {
        run_dir: t.run_dir,
        step: t.step,
        val_loss: last_val,
        best_val_loss: t.best_val_loss,
    })
}
