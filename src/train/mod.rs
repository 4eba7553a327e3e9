//! The training loop, in nanoGPT's order: set lr → micro-steps with gradient accumulation → clip →
//! optimizer step → log → (every `eval_interval` steps and at the end) evaluate and checkpoint.
//!
//! A run directory holds `config.toml` (the resolved config), `run.json` (reproducibility header),
//! `metrics.jsonl` (one JSON object per event), `tokenizer.json` (trained BPE only) and
//! `checkpoints/`. On CPU a resumed run is bitwise identical to an uninterrupted one: parameters,
//! optimizer moments and the data stream position are restored exactly, the schedule is a pure
//! function of the step, and dropout masks are drawn from a stream keyed by the step.
//!
//! Data parallel ([`crate::distributed`]): each of N ranks draws `batch_size × grad_accum` sequences of a
//! global step of N × `grad_accum` micro-batches (every rank walks the whole sample stream and
//! computes its own contiguous share), the gradients are summed in rank order, and every rank
//! applies the same update. Rank 0 alone writes the run directory. On CPU in f32 this is bitwise
//! one process with `grad_accum` N times as large.

pub mod checkpoint;
pub mod diagnostics;
pub mod faults;
pub mod metrics;
mod run_dir;
pub mod runlock;
pub mod schedule;
pub mod signals;
pub mod spikes;
mod start;
mod step;
pub mod tensorboard;
mod zero;

pub use run_dir::{
    load_run_config, load_run_header, load_run_model, load_run_tokenizer, RunHeader, RunModel,
    RunTotals,
};

use crate::config::{NanPolicy, TrainConfig};
use crate::data::{eval_windows, BatchSampler, Split, TokenData};
use crate::distributed::gradients::{ReducedStep, StepGradients};
use crate::distributed::World;
use crate::model::{Gpt, GptConfig, Params};
use crate::ops::cpu::on_worker_thread_if_cpu;
use crate::optim::Optimizer;
use anyhow::{bail, Context, Result};
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor};
use checkpoint::TrainState;
use diagnostics::{BeforeUpdate, DiagGranularity};
use metrics::Metrics;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use runlock::RunLock;
use schedule::Schedule;
use spikes::{SkipReason, SpikeWindows, StepZScores};
use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::Instant;

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

impl std::fmt::Display for TrainSummary {
    /// `done: RUN_DIR at step N, best val loss L`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "done: {} at step {}", self.run_dir.display(), self.step)?;
        match self.best_val_loss {
            Some(best) => write!(f, ", best val loss {best:.4}"),
            None => Ok(()),
        }
    }
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

/// Starts a new run in `run_dir`, which must not exist yet (or be empty), and trains it to
/// `max_steps`.
pub fn train_new(cfg: TrainConfig, run_dir: &Path, reporting: &Reporting) -> Result<TrainSummary> {
    train_new_in(Rc::new(World::single()), cfg, run_dir, reporting)
}

/// [`train_new`] as one rank of `world` (every rank calls it with the same arguments).
pub fn train_new_in(
    world: Rc<World>,
    cfg: TrainConfig,
    run_dir: &Path,
    reporting: &Reporting,
) -> Result<TrainSummary> {
    Trainer::start(world, cfg, run_dir, reporting)?.run()
}

/// Continues the run in `run_dir` from its newest complete checkpoint to `max_steps`.
/// `config_file` (if given) and `overrides` may change only
/// [`RESUME_OVERRIDABLE`](crate::config::RESUME_OVERRIDABLE) keys.
pub fn train_resume(
    run_dir: &Path,
    config_file: Option<toml::Table>,
    overrides: &[String],
    options: &ResumeOptions,
    reporting: &Reporting,
) -> Result<TrainSummary> {
    let world = Rc::new(World::single());
    train_resume_in(world, run_dir, config_file, overrides, options, reporting)
}

/// [`train_resume`] as one rank of `world` (every rank calls it with the same arguments).
pub fn train_resume_in(
    world: Rc<World>,
    run_dir: &Path,
    config_file: Option<toml::Table>,
    overrides: &[String],
    options: &ResumeOptions,
    reporting: &Reporting,
) -> Result<TrainSummary> {
    Trainer::resume(world, run_dir, config_file, overrides, options, reporting)?.run()
}

/// Mean loss over fixed windows, without dropout. Ranks share the windows; the mean is summed in
/// window order whatever the world size, so it does not depend on it.
fn evaluate(
    world: &World,
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
    let mut per_window = vec![0.0; windows.len()];
    for (i, starts) in windows.iter().enumerate() {
        if i % world.size() != world.rank() {
            continue;
        }
        let (x, y) = data.batch(split, starts, block, device)?;
        per_window[i] = model
            .eval_loss(&x, &y)?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?;
    }
    world.sum_disjoint_f64(&mut per_window);
    let mut total = 0.0;
    for loss in per_window {
        total += loss;
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
    if cfg.cpu_bf16() && !crate::ops::onednn::bf16_kernels() {
        println!(
            "bf16: {} has no bf16 matmul for this CPU (it needs AVX-512): the bf16 operands are \
             widened to f32 once each and multiplied in f32 (the same products)",
            crate::ops::onednn::backend_description()
        );
    }
    Ok(())
}

/// A run in progress: its inputs, the model and optimizer, and where it stands. Built by
/// [`Trainer::start`] (new run) or [`Trainer::resume`] (from a checkpoint), consumed by
/// [`Trainer::run`].
struct Trainer {
    /// The ranks this run is spread over (a world of one unless launched by MPI).
    world: Rc<World>,
    cfg: TrainConfig,
    run_dir: PathBuf,
    device: Device,
    data: TokenData,
    params: Params,
    model: Gpt,
    optimizer: Box<dyn Optimizer>,
    /// For the samples written during training.
    tokenizer: crate::data::tokenizer::Tokenizer,
    position: Position,
    /// Rank 0's; the other ranks write nothing.
    metrics: Option<Metrics>,
    config_hash: String,
    quiet: bool,
    /// Rank 0 holds it for the trainer's life: no second process trains in the same directory.
    _lock: Option<RunLock>,
    /// `zero_stage = 1` on several ranks: who updates which parameter.
    shards: Option<zero::Shards>,
}

/// Where a run stands between steps: what a checkpoint saves besides the tensors.
struct Position {
    step: u64,
    tokens: u64,
    best_val_loss: Option<f64>,
    skipped_steps: u64,
    /// Steps whose gradients `grad_clip` scaled down.
    clipped_steps: u64,
    /// The spike policy's windows, when it is on.
    spikes: Option<SpikeWindows>,
    sampler: BatchSampler,
}

impl Position {
    /// Step 0 of a run of `cfg`.
    fn start(cfg: &TrainConfig) -> Self {
        Position {
            step: 0,
            tokens: 0,
            best_val_loss: None,
            skipped_steps: 0,
            clipped_steps: 0,
            spikes: cfg.zscore_window.map(SpikeWindows::new),
            sampler: BatchSampler::new(cfg.seed, cfg.sampling),
        }
    }
}

impl Trainer {
    /// Evaluates both splits on the fixed windows and logs the result.
    fn evaluate(&mut self) -> Result<(f64, f64)> {
        let val = evaluate(
            &self.world,
            &self.model,
            &self.data,
            Split::Val,
            &self.cfg,
            &self.device,
        )?;
        let train = evaluate(
            &self.world,
            &self.model,
            &self.data,
            Split::Train,
            &self.cfg,
            &self.device,
        )?;
        if !val.is_finite() {
            bail!(
                "validation loss became {val} at step {}; stopped without saving a checkpoint",
                self.position.step
            );
        }
        if self.position.best_val_loss.is_none_or(|b| val < b) {
            self.position.best_val_loss = Some(val);
        }
        self.log(serde_json::json!({
            "step": self.position.step, "tokens": self.position.tokens, "split": "val", "loss": val, "train_loss": train,
        }))?;
        Ok((val, train))
    }

    /// Generates a sample of `sample_tokens` after `sample_prompt` (temperature 0.8 among the
    /// 200 likeliest tokens, as `sample`'s defaults, from a seed keyed by the run's and the
    /// step) and logs it; reading the model only.
    fn sample(&mut self) -> Result<String> {
        let prompt = self.cfg.sample_prompt.clone().unwrap_or_default();
        let how = crate::model::generate::Generation {
            max_new_tokens: self
                .cfg
                .sample_tokens
                .unwrap_or(crate::config::SAMPLE_TOKENS),
            temperature: 0.8,
            top_k: Some(200),
            seed: self.cfg.seed.wrapping_add(self.position.step),
        };
        let (model, tokenizer, device) = (&self.model, &self.tokenizer, &self.device);
        let text = on_worker_thread_if_cpu(device, || {
            crate::model::generate::generate(model, tokenizer, &prompt, &how, device, |_| {})
        })?;
        self.log(serde_json::json!({
            "step": self.position.step, "tokens": self.position.tokens, "split": "sample",
            "prompt": prompt, "text": text,
        }))?;
        Ok(text)
    }

    /// Appends an event to the metrics (rank 0).
    fn log(&mut self, event: serde_json::Value) -> Result<()> {
        match &mut self.metrics {
            Some(metrics) => metrics.write(event),
            None => Ok(()),
        }
    }

    /// Flushes the metrics to disk (rank 0).
    fn sync_metrics(&mut self) -> Result<()> {
        match &mut self.metrics {
            Some(metrics) => metrics.sync(),
            None => Ok(()),
        }
    }

    /// Micro-batches per optimizer step, over all ranks.
    fn global_accum(&self) -> usize {
        self.cfg.grad_accum * self.world.size()
    }

    /// Writes a checkpoint of the current step (metrics are synced first, so every saved step has
    /// its events on disk). Ranks first compare digests of their parameters and optimizer state,
    /// and stop on any difference; rank 0 writes while the others wait.
    fn checkpoint(&mut self) -> Result<PathBuf> {
        let model = self.params.tensors();
        let optimizer = self.optimizer.state_tensors()?;
        if self.world.size() > 1 {
            // Sharded optimizer state differs between ranks by design: compare the model only.
            let (what, compared) = match &self.shards {
                Some(_) => ("model", BTreeMap::new()),
                None => ("model and optimizer state", optimizer.clone()),
            };
            self.world.require_same(
                &format!("{what} after step {}", self.position.step),
                &checkpoint::digest(&model, &compared)?,
            )?;
        }
        let optimizer = match &self.shards {
            Some(shards) => shards.gather_state(&self.world, optimizer, &self.device)?,
            None => Some(optimizer),
        };
        let Some(optimizer) = optimizer.filter(|_| self.world.is_root()) else {
            self.world.barrier();
            return Ok(checkpoint::step_dir(&self.run_dir, self.position.step));
        };
        self.sync_metrics()?;
        let state = TrainState {
            step: self.position.step,
            tokens: self.position.tokens,
            data_seed: self.cfg.seed,
            data_word_pos: self.position.sampler.position().to_string(),
            best_val_loss: self.position.best_val_loss,
            config_hash: self.config_hash.clone(),
            skipped_steps: self.position.skipped_steps,
            clipped_steps: self.position.clipped_steps,
            spike_windows: self.position.spikes.clone(),
            world_size: self.world.size(),
            checksums: Default::default(),
        };
        let saved = checkpoint::save(&self.run_dir, &model, &optimizer, state, self.cfg.keep_last)?;
        self.world.barrier();
        Ok(saved)
    }

    /// Evaluates, then checkpoints unless this is the step-0 evaluation; returns the val loss.
    fn evaluate_and_checkpoint(&mut self) -> Result<f64> {
        let (val, train) = self.evaluate()?;
        let saved = if self.position.step > 0 {
            format!(", saved {}", self.checkpoint()?.display())
        } else {
            self.sync_metrics()?;
            String::new()
        };
        if !self.quiet {
            println!(
                "step {}: val loss {val:.4}, train loss {train:.4}{saved}",
                self.position.step
            );
        }
        Ok(val)
    }

    /// Trains to `max_steps`: evaluates and checkpoints every `eval_interval` steps and at the
    /// end, and on SIGINT/SIGTERM checkpoints the step in hand and returns [`Interrupted`].
    fn run(mut self) -> Result<TrainSummary> {
        signals::install().context("cannot install signal handlers")?;
        let cfg = &self.cfg;
        let schedule = cfg.schedule();
        let quiet = self.quiet;
        if !quiet {
            print_config(
                cfg,
                self.model.config(),
                &self.run_dir,
                self.data.split_len(Split::Train),
                self.data.split_len(Split::Val),
            )?;
            if let Some(shards) = &self.shards {
                println!("{}", shards.describe(self.world.rank(), &self.params));
            }
        }
        let mut last_val = None;
        if self.position.step == 0 {
            last_val = Some(self.evaluate_and_checkpoint()?);
        }
        let max_steps = self.cfg.max_steps as u64;
        let progress = (!quiet && std::io::stderr().is_terminal()).then(|| {
            let bar = indicatif::ProgressBar::new(max_steps);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{bar:30} {pos}/{len} steps | {msg} | eta {eta}",
                )
                .expect("valid template"),
            );
            bar.set_position(self.position.step);
            bar
        });
        let tokens_per_step =
            (self.cfg.batch_size * self.global_accum() * self.model.config().block_size) as f64;
        let flops_per_token = self.model.config().training_flops_per_token();
        let peak_flops = self.cfg.peak_flops.or_else(|| {
            let name = crate::device::device_name(&self.device)?;
            crate::device::nominal_peak_gflops(&name, self.cfg.dtype.compute_dtype())
                .map(|gflops| gflops * 1e9)
        });

        while self.position.step < max_steps {
            let started = Instant::now();
            let out = self.train_step(&schedule)?;
            let step = self.position.step;
            let secs = started.elapsed().as_secs_f64();
            let tok_per_s = tokens_per_step / secs;
            let mut event = serde_json::json!({
                "step": step, "tokens": self.position.tokens, "split": "train", "loss": out.loss, "lr": out.lr,
                "grad_norm": out.norm, "ms": secs * 1e3, "tok_per_s": tok_per_s,
            });
            let mfu = peak_flops.map(|peak| tok_per_s * flops_per_token / peak);
            if let Some(mfu) = mfu {
                event["mfu"] = mfu.into();
            }
            if let Some(reduce) = out.reduce_secs {
                event["reduce_ms"] = (reduce * 1e3).into();
            }
            if let Some(z_loss) = out.z_loss {
                event["z_loss"] = z_loss.into();
            }
            if self.cfg.grad_clip > 0.0 {
                event["clipped"] = out.clipped.into();
            }
            if let Some(z) = out.z.loss {
                event["loss_z"] = z.into();
            }
            if let Some(z) = out.z.grad_norm {
                event["grad_norm_z"] = z.into();
            }
            if let Some(reason) = out.skip {
                let why = match reason {
                    SkipReason::NonFinite => {
                        // JSON has no NaN: a non-finite step logs null loss and norm.
                        event["loss"] = serde_json::Value::Null;
                        event["grad_norm"] = serde_json::Value::Null;
                        format!("non-finite loss {} or gradient norm {}", out.loss, out.norm)
                    }
                    SkipReason::LossZScore(z) => format!(
                        "loss {:.4} is {z:.2} standard deviations above the window's mean \
                         (skip_loss_zscore = {})",
                        out.loss, self.cfg.skip_loss_zscore
                    ),
                    SkipReason::GradZScore(z) => format!(
                        "gradient norm {:.4} is {z:.2} standard deviations above the window's \
                         mean (skip_grad_zscore = {})",
                        out.norm, self.cfg.skip_grad_zscore
                    ),
                };
                event["skipped"] = true.into();
                event["skip_reason"] = reason.name().into();
                event["skipped_steps"] = self.position.skipped_steps.into();
                eprintln!(
                    "warning: step {step} skipped: {why} ({} skipped so far)",
                    self.position.skipped_steps
                );
            }
            self.log(event)?;
            if let Some(figures) = out.diagnostics {
                let mut event = serde_json::json!({
                    "step": step, "tokens": self.position.tokens, "split": "diag",
                });
                event.as_object_mut().expect("an object").extend(figures);
                self.log(event)?;
            }
            if self.cfg.sample_interval > 0
                && step.is_multiple_of(self.cfg.sample_interval as u64)
                && self.world.is_root()
            {
                let text = match &progress {
                    Some(bar) => bar.suspend(|| self.sample())?,
                    None => self.sample()?,
                };
                if !quiet {
                    println!("step {step} sample: {text:?}");
                }
            }
            let mfu_text = mfu.map_or_else(String::new, |m| format!(" | MFU {:.1}%", m * 100.0));
            if let Some(bar) = &progress {
                bar.set_position(step);
                bar.set_message(format!(
                    "loss {:.4} | {tok_per_s:.0} tok/s{mfu_text}",
                    out.loss
                ));
            } else if !quiet && (step.is_multiple_of(self.cfg.log_interval as u64) || step == 1) {
                println!(
                "step {step}/{max_steps} | loss {:.4} | lr {:.3e} | grad norm {:.3} | {:.0} ms | {tok_per_s:.0} tok/s{mfu_text}",
                out.loss,
                out.lr,
                out.norm,
                secs * 1e3
            );
            }
            // Ranks agree on stopping: a signal that reached only some of them stops all of them
            // after the same step.
            let signal = self.world.max_i32(signals::requested().unwrap_or(0));
            if signal != 0 {
                // Finish what this step started: checkpoint it, then stop.
                let checkpoint = self.checkpoint()?;
                if let Some(bar) = &progress {
                    bar.abandon();
                }
                return Err(Interrupted {
                    signal,
                    step,
                    checkpoint,
                    run_dir: self.run_dir.clone(),
                }
                .into());
            }
            if step.is_multiple_of(self.cfg.eval_interval as u64) || step == max_steps {
                // Keep the progress bar from overwriting the evaluation line.
                let val = match &progress {
                    Some(bar) => bar.suspend(|| self.evaluate_and_checkpoint())?,
                    None => self.evaluate_and_checkpoint()?,
                };
                last_val = Some(val);
            }
        }
        if let Some(bar) = progress {
            bar.finish_and_clear();
        }
        if self.world.is_root() {
            let p = &self.position;
            run_dir::record_totals(
                &self.run_dir,
                RunTotals {
                    steps: p.step,
                    skipped_steps: p.skipped_steps,
                    clipped_steps: p.clipped_steps,
                    clipped_share: p.clipped_steps as f64 / p.step.max(1) as f64,
                },
            )?;
        }
        Ok(TrainSummary {
            run_dir: self.run_dir,
            step: self.position.step,
            val_loss: last_val,
            best_val_loss: self.position.best_val_loss,
        })
    }
}
