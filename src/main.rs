//! `gpt-pretrain`: the command line over the library.

use anyhow::{bail, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use gpt_pretrain::config::{Precision, TrainConfig};
use gpt_pretrain::distributed::World;
use gpt_pretrain::tools::sample::{sample, SampleOptions};
use gpt_pretrain::train::{train_new_in, train_resume_in, Interrupted, Reporting, ResumeOptions};
use std::io::Write;
use std::path::PathBuf;
use std::rc::Rc;

#[derive(Parser)]
#[command(
    name = "gpt-pretrain",
    version,
    about = "Pretrain GPT-2-style models with Adam, AdamW or ADOPT"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a model (a new run, or --resume an existing one).
    Train(TrainArgs),
    /// Tokenize text corpora (.txt, .jsonl, .jsonl.zst, .parquet) into llm.c token shards
    /// (NAME_val_000000.bin, NAME_train_000001.bin, …) with a manifest.json; rerun the same
    /// command to finish an interrupted run.
    Prepare(PrepareArgs),
    /// Generate text from a run's newest checkpoint.
    Sample(SampleArgs),
    /// Write a run's newest checkpoint as a Hugging Face transformers GPT-2 directory.
    Export(ExportArgs),
    /// Loss and perplexity on a text file, with sliding windows.
    Eval(EvalArgs),
    /// Train every combination of a grid of config values × seeds (resumable).
    Sweep(SweepArgs),
    /// Compare runs: grouped by configuration over seeds, with statistics and plots.
    Compare(CompareArgs),
    /// Time training steps on random tokens: forward, backward, optimizer, tokens/s, MFU, memory.
    Bench(BenchArgs),
    /// Optimizer tools.
    Optim {
        #[command(subcommand)]
        command: OptimCommand,
    },
}

#[derive(Args)]
struct TrainArgs {
    /// TOML config file (keys: see the README).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Override a config key, e.g. --set lr=3e-4 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Run directory for a new run (default: runs/<config name>).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Continue the run in this directory from its newest complete checkpoint.
    #[arg(long, value_name = "RUN_DIR", conflicts_with = "out")]
    resume: Option<PathBuf>,
    /// Device: cpu, cuda or cuda:N (same as --set device=...).
    #[arg(long)]
    device: Option<String>,
    /// Print only errors.
    #[arg(long)]
    quiet: bool,
    /// With --resume: accept a corpus or tokenizer that changed since the run started
    /// (recorded in run.json).
    #[arg(long, requires = "resume")]
    allow_data_change: bool,
}

#[derive(Args)]
struct PrepareArgs {
    /// Input files, directories or globs, in stream order.
    #[arg(required = true)]
    inputs: Vec<String>,
    /// Output directory for the shards and manifest.json.
    #[arg(long)]
    out: PathBuf,
    /// Shard name prefix (default: the output directory's name).
    #[arg(long)]
    name: Option<String>,
    /// gpt2, or a tokenizer.json path.
    #[arg(long, default_value = "gpt2")]
    tokenizer: String,
    /// GPT-2's tokenizer.json (default: the Hugging Face cache).
    #[arg(long)]
    tokenizer_path: Option<PathBuf>,
    /// The JSON key or parquet column holding each document's text.
    #[arg(long, default_value = "text")]
    text_field: String,
    /// Tokens per shard.
    #[arg(long, default_value_t = gpt_pretrain::data::prepare::DEFAULT_SHARD_TOKENS)]
    shard_tokens: u64,
    /// Tokens of the validation split, from the start of the stream (default: one shard).
    #[arg(long)]
    val_tokens: Option<u64>,
    /// Worker threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
    /// Skip malformed records (invalid UTF-8, not a JSON object, no text field), listing
    /// them, instead of stopping at the first. Empty documents are always skipped.
    #[arg(long)]
    skip_bad_records: bool,
}

#[derive(Args)]
struct SampleArgs {
    /// The run directory.
    run_dir: PathBuf,
    #[arg(long, default_value = "")]
    prompt: String,
    #[arg(long, default_value_t = 200)]
    max_new_tokens: usize,
    /// 0 samples greedily.
    #[arg(long, default_value_t = 0.8)]
    temperature: f64,
    /// Sample among the k most likely tokens (0 = all).
    #[arg(long, default_value_t = 200)]
    top_k: usize,
    #[arg(long, default_value_t = 1337)]
    seed: u64,
    /// Device: cpu, cuda or cuda:N (default: the run's).
    #[arg(long)]
    device: Option<String>,
}

#[derive(Args)]
struct ExportArgs {
    /// The run directory.
    run_dir: PathBuf,
    /// Output directory (config.json, model.safetensors, tokenizer.json, tokenizer_config.json).
    #[arg(long, value_name = "OUT_DIR")]
    hf: PathBuf,
}

#[derive(Args)]
struct EvalArgs {
    /// A run directory or a Hugging Face GPT-2 directory.
    model: PathBuf,
    /// The UTF-8 text file to score.
    #[arg(long)]
    data: PathBuf,
    /// Window length in tokens (default: the model's block size).
    #[arg(long)]
    block: Option<usize>,
    /// Tokens between window starts (default: block / 2).
    #[arg(long)]
    stride: Option<usize>,
    /// Where to write the JSON report (default: MODEL/eval-<data name>.json).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Device: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
}

#[derive(Args)]
struct SweepArgs {
    /// Base TOML config.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Override a base key for every run (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// A grid axis, e.g. --grid optimizer=adam,adamw,adopt (repeatable).
    #[arg(long, value_name = "KEY=V1,V2,...")]
    grid: Vec<String>,
    /// Seeds, e.g. 0,1,2.
    #[arg(long, value_delimiter = ',', default_value = "0")]
    seeds: Vec<u64>,
    /// Folder for the run directories.
    #[arg(long)]
    out: PathBuf,
    /// Print only errors and warnings.
    #[arg(long)]
    quiet: bool,
}

#[derive(Args)]
struct CompareArgs {
    /// Run directories, or folders of run directories (a sweep's --out).
    #[arg(required = true)]
    runs: Vec<PathBuf>,
    /// Report folder (report.md and PNG/SVG plots).
    #[arg(long, default_value = "reports/compare")]
    out: PathBuf,
    /// Report the tokens each run needed to reach this validation loss.
    #[arg(long)]
    target_loss: Option<f64>,
    /// Tests fixed in advance (TOML: families of arm pairs, each Holm-corrected on its own)
    /// instead of every pair that differs only in the optimizer.
    #[arg(long, value_name = "FILE")]
    tests: Option<PathBuf>,
    /// Also plot and test a logged metric by its metrics.jsonl name, e.g.
    /// update_weight_ratio/block.3.mlp or grad_norm (repeatable); each run enters as its mean.
    #[arg(long, value_name = "NAME")]
    metric: Vec<String>,
}

#[derive(Args)]
struct BenchArgs {
    /// tiny, tiny50k, baby or gpt2 (the shapes of PyTorch's reference torch_gpt_bench.py).
    #[arg(long, default_value = "baby")]
    preset: String,
    /// Timed steps (after 2 warm-up steps).
    #[arg(long, default_value_t = 10)]
    steps: usize,
    /// Worker threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// f32, or bf16 mixed precision (CUDA; or CPU with oneDNN).
    #[arg(long, value_enum, default_value_t = Precision::F32)]
    dtype: Precision,
    /// Sequences per step instead of the preset's.
    #[arg(long)]
    batch_size: Option<usize>,
    /// Context length instead of the preset's (at most the model's).
    #[arg(long)]
    block_size: Option<usize>,
    /// Also print the figures as one JSON object on the last line.
    #[arg(long)]
    json: bool,
}

/// The dtypes `optim replay` computes in.
#[derive(Clone, Copy, ValueEnum)]
enum ReplayDtype {
    F32,
    F64,
}

#[derive(Subcommand)]
enum OptimCommand {
    /// Replay a fixture (initial parameters + every step's gradients) and print the parameters
    /// after each step as JSON: {"steps": [{name: nested list}, ...]}.
    Replay {
        /// The fixture JSON (layout: see docs/optimizers.md).
        file: PathBuf,
        /// Compute in this dtype instead of the fixture's.
        #[arg(long, value_enum)]
        dtype: Option<ReplayDtype>,
        /// Use plain candle tensor ops instead of the fused CPU kernel.
        #[arg(long)]
        tensor_ops: bool,
    },
}

fn main() {
    // candle allocates a fresh buffer per op; glibc's default thresholds return large ones to the
    // kernel and fault them back in every step (~15% of CPU time; see CANDLE-NOTES).
    gpt_pretrain::fsutil::tune_allocator();
    let cli = Cli::parse();
    let world = match World::from_launcher() {
        Ok(world) => Rc::new(world),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(1);
        }
    };
    if let Err(e) = run(cli, &world) {
        // Output of rank 0 reads as a single process's; other ranks say who they are.
        let rank = match world.rank() {
            0 => String::new(),
            r => format!("rank {r}: "),
        };
        if let Some(stop) = e.downcast_ref::<Interrupted>() {
            if world.is_root() {
                eprintln!("{stop}");
            }
            // Every rank stopped after the same step: finish MPI cleanly, or the launcher would
            // count the exit as a crash.
            std::mem::forget(world);
            std::process::exit(128 + stop.signal);
        }
        eprintln!("{rank}error: {e:#}");
        // The other ranks may be waiting for this one in a collective: end them too.
        world.abort(1);
        std::process::exit(1);
    }
}

fn run(cli: Cli, world: &Rc<World>) -> Result<()> {
    if world.size() > 1 && !matches!(cli.command, Command::Train(_)) {
        bail!(
            "only `train` runs on several ranks; start other commands without mpirun (this job has {} ranks)",
            world.size()
        );
    }
    match cli.command {
        Command::Train(args) => train(args, world),
        Command::Prepare(args) => prepare(args),
        Command::Sample(args) => sample_text(args),
        Command::Export(args) => export(args),
        Command::Eval(args) => eval(args),
        Command::Sweep(args) => sweep(args),
        Command::Compare(args) => compare(args),
        Command::Bench(args) => bench(args),
        Command::Optim {
            command:
                OptimCommand::Replay {
                    file,
                    dtype,
                    tensor_ops,
                },
        } => replay(&file, dtype, tensor_ops),
    }
}

/// A new run in `--out` (default `runs/<config name>`), or `--resume` of an existing one.
fn train(args: TrainArgs, world: &Rc<World>) -> Result<()> {
    let TrainArgs {
        config,
        mut set,
        out,
        resume,
        device,
        quiet,
        allow_data_change,
    } = args;
    if let Some(d) = device {
        set.push(format!("device=\"{d}\""));
    }
    let file = config.as_deref().map(TrainConfig::read_table).transpose()?;
    let reporting = Reporting { quiet };
    let summary = match resume {
        Some(run_dir) => train_resume_in(
            Rc::clone(world),
            &run_dir,
            file,
            &set,
            &ResumeOptions { allow_data_change },
            &reporting,
        )?,
        None => {
            let cfg = TrainConfig::from_layers(file, &set)?;
            let name = config
                .as_deref()
                .and_then(|p| p.file_stem())
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "default".into());
            let run_dir = out.unwrap_or_else(|| PathBuf::from("runs").join(name));
            train_new_in(Rc::clone(world), cfg, &run_dir, &reporting)?
        }
    };
    if !quiet && world.is_root() {
        println!("{summary}");
    }
    Ok(())
}

fn prepare(args: PrepareArgs) -> Result<()> {
    limit_threads(args.threads);
    let options = gpt_pretrain::data::prepare::PrepareOptions {
        inputs: args.inputs,
        out: args.out.clone(),
        name: args.name,
        tokenizer: args.tokenizer,
        tokenizer_path: args.tokenizer_path,
        text_field: args.text_field,
        shard_tokens: args.shard_tokens,
        val_tokens: args.val_tokens,
        progress: !args.quiet,
        skip_bad_records: args.skip_bad_records,
    };
    let started = std::time::Instant::now();
    let manifest = gpt_pretrain::data::prepare::prepare(&options)?;
    if !args.quiet {
        println!("{}", manifest.summary(&args.out, started.elapsed()));
    }
    Ok(())
}

fn sample_text(args: SampleArgs) -> Result<()> {
    if !args.temperature.is_finite() || args.temperature < 0.0 {
        bail!("temperature must be >= 0, got {}", args.temperature);
    }
    let opts = SampleOptions {
        prompt: args.prompt.clone(),
        max_new_tokens: args.max_new_tokens,
        temperature: args.temperature,
        top_k: (args.top_k > 0).then_some(args.top_k),
        seed: args.seed,
        device: args.device,
    };
    let mut stdout = std::io::stdout();
    print!("{}", args.prompt);
    sample(&args.run_dir, &opts, |piece| {
        print!("{piece}");
        let _ = stdout.flush();
    })?;
    println!();
    Ok(())
}

fn export(args: ExportArgs) -> Result<()> {
    gpt_pretrain::tools::export::export(&args.run_dir, &args.hf)?;
    println!(
        "wrote {} (load it with transformers.GPT2LMHeadModel.from_pretrained)",
        args.hf.display()
    );
    Ok(())
}

fn eval(args: EvalArgs) -> Result<()> {
    use gpt_pretrain::tools::eval::{evaluate_text, Scorer};
    let device = gpt_pretrain::device::parse_device(&args.device)?;
    let scorer = Scorer::load(&args.model, &device)?;
    let report = evaluate_text(&scorer, &args.data, args.block, args.stride, &device)?;
    let stem = args
        .data
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let out = args
        .out
        .unwrap_or_else(|| args.model.join(format!("eval-{stem}.json")));
    let json = serde_json::to_string_pretty(&report)?;
    gpt_pretrain::fsutil::write_atomic(&out, json.as_bytes())?;
    println!("{report}; wrote {}", out.display());
    Ok(())
}

fn sweep(args: SweepArgs) -> Result<()> {
    use gpt_pretrain::study::sweep::{parse_axis, sweep};
    let base = args
        .config
        .as_deref()
        .map(TrainConfig::read_table)
        .transpose()?;
    let axes = args
        .grid
        .iter()
        .map(|g| parse_axis(g))
        .collect::<Result<Vec<_>>>()?;
    let reporting = Reporting { quiet: args.quiet };
    let summary = sweep(base, &args.set, &axes, &args.seeds, &args.out, &reporting)?;
    println!("sweep {}: {summary}", args.out.display());
    Ok(())
}

fn compare(args: CompareArgs) -> Result<()> {
    use gpt_pretrain::study::compare::{compare, TestPlan};
    let plan = args.tests.as_deref().map(TestPlan::read).transpose()?;
    let report = compare(
        &args.runs,
        &args.out,
        args.target_loss,
        plan.as_ref(),
        &args.metric,
    )?;
    println!("{report}");
    println!(
        "wrote {}/report.md and plots (val_loss, train_loss, lr_grad_norm, lr_sensitivity, beta2 .png/.svg)",
        args.out.display()
    );
    Ok(())
}

fn bench(args: BenchArgs) -> Result<()> {
    use gpt_pretrain::tools::bench::{run, BenchSetup};
    limit_threads(args.threads);
    let device = gpt_pretrain::device::parse_device(&args.device)?;
    let mut setup =
        BenchSetup::preset(&args.preset)?.with_batch(args.batch_size, args.block_size)?;
    setup.dtype = args.dtype;
    let report = run(&setup, args.steps, &device)?;
    println!("{report}");
    if args.json {
        println!("{}", report.to_json());
    }
    Ok(())
}

fn replay(file: &std::path::Path, dtype: Option<ReplayDtype>, tensor_ops: bool) -> Result<()> {
    let fixture = gpt_pretrain::optim::replay::read_fixture(file)?;
    let dtype = dtype.map(|d| match d {
        ReplayDtype::F32 => candle_core::DType::F32,
        ReplayDtype::F64 => candle_core::DType::F64,
    });
    let steps = fixture.replay(dtype, !tensor_ops)?;
    println!("{}", serde_json::json!({ "steps": steps }));
    Ok(())
}

/// `--threads N`: the size of rayon's pool (candle's, gemm's and our kernels'), which reads it
/// when it starts, later than this.
fn limit_threads(threads: Option<usize>) {
    if let Some(n) = threads {
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
}
