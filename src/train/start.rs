//! How a trainer comes to be: a new run (inputs checked before the disk is touched, then the run
//! directory written) or a resumed one (the saved config, the newest complete checkpoint, and what
//! a crash may have left behind cleaned up). In a data-parallel run every rank builds the same
//! trainer, they check that they agree, and rank 0 alone touches the run directory.

use super::checkpoint;
use super::metrics::{self, Metrics};
use super::run_dir::{
    identity, identity_hash, load_run_config, load_run_header, load_run_tokenizer, RunHeader,
    CONFIG_FILE, RUN_FILE, TOKENIZER_FILE,
};
use super::runlock::RunLock;
use super::spikes::SpikeWindows;
use super::zero::Shards;
use super::{Position, Reporting, ResumeOptions, Trainer};
use crate::config::{ScheduleKind, TokenizerKind, TrainConfig, RESUME_OVERRIDABLE};
use crate::data::tokenizer::Tokenizer;
use crate::data::{BatchSampler, DataSource, TokenData};
use crate::distributed::World;
use crate::model::{Gpt, Params};
use crate::optim::{self, Optimizer};
use anyhow::{bail, Context, Result};
use candle_core::DType;
use std::path::{Path, PathBuf};
use std::rc::Rc;

impl Trainer {
    /// A new run in `run_dir`, which must not exist yet (or be empty): checks every input, then
    /// writes the config, the header and (for a trained BPE) the tokenizer.
    pub(super) fn start(
        world: Rc<World>,
        mut cfg: TrainConfig,
        run_dir: &Path,
        reporting: &Reporting,
    ) -> Result<Self> {
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
        let device = crate::device::parse_device(&world.device_spec(&cfg.device)?)?;
        world.attach_device(&device)?;
        let source = DataSource::resolve(&cfg.data, cfg.val_data.as_deref(), cfg.data_format)?;
        let tokenizer = match cfg.tokenizer {
            TokenizerKind::Byte => Tokenizer::Byte,
            TokenizerKind::Gpt2 => Tokenizer::gpt2(cfg.tokenizer_path.as_deref().map(Path::new))?,
            TokenizerKind::Bpe => match source.corpus() {
                Some(corpus) => Tokenizer::train_bpe(
                    corpus.training_text(cfg.val_fraction),
                    cfg.bpe_vocab_size,
                )?,
                None => bail!(
                    "tokenizer = \"bpe\" trains on a text corpus, and data = {:?} names token files; \
                     use the tokenizer they were made with (gpt2, with tokenizer_path if needed)",
                    cfg.data
                ),
            },
        };
        let pretrained = match cfg.pretrained() {
            true => Some(adopt_pretrained_shape(&mut cfg, tokenizer.vocab_size())?),
            false => None,
        };
        let cfg = cfg.for_world(world.size())?;
        let model_cfg = cfg.model_config(tokenizer.vocab_size())?;
        let data = token_data(
            &world,
            &source,
            &tokenizer,
            &cfg,
            model_cfg.block_size,
            reporting,
        )?;
        let params = match &pretrained {
            Some(dir) => crate::model::hf::read_weights(dir, &model_cfg, &device)?,
            None => Params::init(&model_cfg, cfg.seed, DType::F32, &device)?,
        };
        let shards = zero_shards(&world, &cfg, &params);
        let optimizer = build_optimizer(&cfg, &params, &world, shards.as_ref())?;
        let corpus_sha256 = source.sha256()?;
        let tokenizer_sha256 = tokenizer.fingerprint()?;
        require_agreement(&world, &cfg, &corpus_sha256, &tokenizer_sha256, None)?;
        let quiet = reporting.quiet || !world.is_root();
        // Rank 0 writes the run directory; the other ranks only train.
        let (lock, metrics) = if world.is_root() {
            warn_about_schedule(&cfg, false);

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
                start_time: humantime::format_rfc3339_seconds(std::time::SystemTime::now())
                    .to_string(),
                corpus: source.describe(&cfg.data),
                corpus_sha256,
                tokenizer_sha256,
                vocab_size: tokenizer.vocab_size(),
                n_tokens: data.len(),
                n_params: model_cfg.n_params(),
                model: model_cfg.clone(),
                world_size: world.size(),
                overrides: Vec::new(),
                totals: None,
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
            (Some(lock), Some(Metrics::open(run_dir, None)?))
        } else {
            (None, None)
        };
        Ok(Trainer {
            model: Gpt::with_precision(&model_cfg, &params, cfg.dtype)?,
            metrics,
            config_hash: identity_hash(&cfg)?,
            position: Position::start(&cfg),
            cfg,
            run_dir: run_dir.to_path_buf(),
            device,
            data,
            params,
            optimizer,
            tokenizer,
            quiet,
            world,
            _lock: lock,
            shards,
        })
    }

    /// The run in `run_dir` at its newest complete checkpoint. `config_file` (if given)
    /// and `overrides` may change only [`RESUME_OVERRIDABLE`] keys.
    pub(super) fn resume(
        world: Rc<World>,
        run_dir: &Path,
        config_file: Option<toml::Table>,
        overrides: &[String],
        options: &ResumeOptions,
        reporting: &Reporting,
    ) -> Result<Self> {
        let saved = load_run_config(run_dir)?;
        let root = world.is_root();
        let lock = root.then(|| RunLock::acquire(run_dir)).transpose()?;
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
            if key == "max_steps" && table.contains_key("max_tokens") {
                bail!("this run's length is set by max_tokens; extend it with --set max_tokens=N");
            }
            table.insert(key, value);
        }
        let cfg = TrainConfig::from_table(table)?.for_world(world.size())?;
        let mut header = load_run_header(run_dir)?;

        let device = crate::device::parse_device(&world.device_spec(&cfg.device)?)?;
        world.attach_device(&device)?;
        let ckpt = checkpoint::load_latest(run_dir, &device)?;
        if ckpt.state.world_size != world.size() {
            // Another count would change the global batch (world size × batch_size × grad_accum)
            // and with it the sample stream's split: not the run that was started.
            bail!(
                "checkpoint {} was trained on {} rank(s) and this job has {}; resume it with the \
                 same number of ranks (mpirun -np {1})",
                ckpt.dir.display(),
                ckpt.state.world_size,
                world.size()
            );
        }
        if ckpt.state.config_hash != identity_hash(&cfg)? {
            bail!(
                "checkpoint {} was written with a different config than {}",
                ckpt.dir.display(),
                run_dir.join(CONFIG_FILE).display()
            );
        }
        let source = DataSource::resolve(&cfg.data, cfg.val_data.as_deref(), cfg.data_format)?;
        let data_sha256 = source.sha256()?;
        let tokenizer = load_run_tokenizer(run_dir, &cfg)?;
        let fingerprint = tokenizer.fingerprint()?;
        let mut changes = Vec::new();
        if data_sha256 != header.corpus_sha256 {
            changes.push(format!(
                "corpus {} (sha256 {} then, {} now)",
                cfg.data,
                &header.corpus_sha256[..12],
                &data_sha256[..12]
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
                if root {
                    eprintln!("warning: resuming with a changed {change}");
                }
                header.overrides.push(format!(
                    "at step {}: {change}, accepted with --allow-data-change",
                    ckpt.state.step
                ));
            }
            header.corpus_sha256 = data_sha256.clone();
            header.tokenizer_sha256 = fingerprint.clone();
            if root {
                crate::fsutil::write_atomic(
                    &run_dir.join(RUN_FILE),
                    serde_json::to_string_pretty(&header)?.as_bytes(),
                )?;
            }
        }
        let checkpoint_id = format!(
            "{} {}",
            ckpt.dir.display(),
            serde_json::to_string(&ckpt.state.checksums)?
        );
        require_agreement(
            &world,
            &cfg,
            &data_sha256,
            &fingerprint,
            Some(&checkpoint_id),
        )?;
        let model_cfg = cfg.model_config(tokenizer.vocab_size())?;
        let data = token_data(
            &world,
            &source,
            &tokenizer,
            &cfg,
            model_cfg.block_size,
            reporting,
        )?;
        let params = Params::from_tensors(&model_cfg, ckpt.model, DType::F32, &device)
            .with_context(|| format!("cannot load {}", ckpt.dir.display()))?;
        let shards = zero_shards(&world, &cfg, &params);
        let mut optimizer = build_optimizer(&cfg, &params, &world, shards.as_ref())?;
        let state = match &shards {
            Some(shards) => shards.own_state(world.rank(), &ckpt.optimizer),
            None => ckpt.optimizer,
        };
        optimizer
            .load_state_tensors(&state)
            .with_context(|| format!("cannot load optimizer state from {}", ckpt.dir.display()))?;
        let word_pos: u128 = ckpt
            .state
            .data_word_pos
            .parse()
            .with_context(|| format!("bad data_word_pos in {}", ckpt.dir.display()))?;
        if root {
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
            warn_about_schedule(&cfg, true);
            if !reporting.quiet {
                println!(
                    "resuming {} from {} (step {})",
                    run_dir.display(),
                    ckpt.dir.display(),
                    ckpt.state.step
                );
            }
        }
        Ok(Trainer {
            model: Gpt::with_precision(&model_cfg, &params, cfg.dtype)?,
            // The first step after the checkpoint opens the new session.
            metrics: root
                .then(|| Metrics::open(run_dir, Some(ckpt.state.step + 1)))
                .transpose()?,
            config_hash: identity_hash(&cfg)?,
            position: Position {
                sampler: BatchSampler::at(ckpt.state.data_seed, cfg.sampling, word_pos),
                step: ckpt.state.step,
                tokens: ckpt.state.tokens,
                best_val_loss: ckpt.state.best_val_loss,
                skipped_steps: ckpt.state.skipped_steps,
                clipped_steps: ckpt.state.clipped_steps,
                spikes: ckpt
                    .state
                    .spike_windows
                    .clone()
                    .or_else(|| cfg.zscore_window.map(SpikeWindows::new)),
            },
            cfg,
            run_dir: run_dir.to_path_buf(),
            device,
            data,
            params,
            optimizer,
            tokenizer,
            quiet: reporting.quiet || !root,
            world,
            _lock: lock,
            shards,
        })
    }
}

/// The corpus as tokens, through the token cache: rank 0 first, then the other ranks, so the
/// cache is built once and read by the rest.
fn token_data(
    world: &World,
    source: &DataSource,
    tokenizer: &Tokenizer,
    cfg: &TrainConfig,
    block_size: usize,
    reporting: &Reporting,
) -> Result<TokenData> {
    if !world.is_root() {
        world.barrier();
    }
    let started = std::time::Instant::now();
    let data = TokenData::from_source(
        source,
        tokenizer,
        Path::new(&cfg.cache_dir),
        cfg.val_fraction,
        block_size,
    );
    if world.is_root() {
        world.barrier();
    }
    if let (Ok(data), DataSource::Files { train, val, .. }) = (&data, source) {
        if !reporting.quiet && world.is_root() {
            println!(
                "token files: {} training and {} validation, {} tokens, every id checked in {:.2} s",
                train.len(),
                val.len(),
                data.len(),
                started.elapsed().as_secs_f64()
            );
        }
    }
    data
}

/// Stops every rank unless all hold the same resolved config, corpus, tokenizer, binary and (on
/// resume) checkpoint: ranks that differ would train different models and average them.
fn require_agreement(
    world: &World,
    cfg: &TrainConfig,
    corpus_sha256: &str,
    tokenizer_sha256: &str,
    checkpoint: Option<&str>,
) -> Result<()> {
    if world.size() == 1 {
        return Ok(());
    }
    let sha = crate::fsutil::sha256_hex;
    world.require_same("config", &sha(cfg.to_toml()?.as_bytes()))?;
    world.require_same("corpus", corpus_sha256)?;
    world.require_same("tokenizer", tokenizer_sha256)?;
    let exe = std::env::current_exe().context("cannot find this program's own file")?;
    world.require_same("binary", &crate::fsutil::sha256_file(&exe)?)?;
    if let Some(checkpoint) = checkpoint {
        world.require_same("checkpoint", &sha(checkpoint.as_bytes()))?;
    }
    Ok(())
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

/// The optimizer over the parameters this rank updates: all of them, or its shard.
fn build_optimizer(
    cfg: &TrainConfig,
    params: &Params,
    world: &World,
    shards: Option<&Shards>,
) -> Result<Box<dyn Optimizer>> {
    let vars = match shards {
        Some(shards) => shards.owned_by(world.rank(), params),
        None => params.named_vars(),
    };
    let settings = cfg.optimizer_settings();
    if let optim::OptimizerSettings::Muon { muon, adamw } = &settings {
        let hidden = |p: &optim::Param| crate::model::is_hidden_matrix(&p.name, p.var.rank());
        let mut groups = optim::param_groups(&vars, adamw.weight_decay, cfg.decay_1d);
        for p in groups.iter_mut().filter(|p| hidden(p)) {
            p.weight_decay = muon.weight_decay;
        }
        return Ok(optim::build_with_matrices(&settings, groups, hidden)?);
    }
    let groups = optim::param_groups(&vars, cfg.weight_decay.unwrap_or(0.0), cfg.decay_1d);
    Ok(optim::build(&settings, groups)?)
}

/// ZeRO-1's assignment of parameters to ranks, when the run shards its optimizer state.
fn zero_shards(world: &World, cfg: &TrainConfig, params: &Params) -> Option<Shards> {
    (cfg.zero_stage == 1 && world.size() > 1).then(|| Shards::new(params, world.size()))
}

/// Says on stderr what a valid schedule will do that its config may not have meant: a run that
/// ends inside its warmup, and (when resuming, since a resume keeps lr_decay_steps) steps past the
/// decay's end, which train at min_lr.
fn warn_about_schedule(cfg: &TrainConfig, resuming: bool) {
    if cfg.warmup_steps > cfg.max_steps {
        eprintln!(
            "warning: warmup_steps ({}) exceeds max_steps ({}): the run ends during the warmup, \
             below lr",
            cfg.warmup_steps, cfg.max_steps
        );
    }
    // The decay holds min_lr from lr_decay_steps on, or from the warmup's end when that is later.
    let min_lr_from = cfg.lr_decay_steps_or_default().max(cfg.warmup_steps);
    if resuming && cfg.schedule != ScheduleKind::Constant && cfg.max_steps > min_lr_from {
        eprintln!(
            "warning: max_steps ({}) is past lr_decay_steps ({}), which a resumed run keeps: \
             steps {min_lr_from}-{} train at min_lr ({:e})",
            cfg.max_steps,
            cfg.lr_decay_steps_or_default(),
            cfg.max_steps,
            cfg.min_lr_or_default()
        );
    }
}
