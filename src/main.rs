//! `gpt-pretrain`: the command line over the library.

use anyhow::{bail, Result};
use clap::{Parser, Subcommand};
use gpt_pretrain::config::TrainConfig;
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
    Train {
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
    },
    /// Tokenize text corpora (.txt, .jsonl, .jsonl.zst, .parquet) into llm.c token shards
    /// (NAME_val_000000.bin, NAME_train_000001.bin, …) with a manifest.json; rerun the same
    /// command to finish an interrupted run.
    Prepare {
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
    },
    /// Generate text from a run's newest checkpoint.
    Sample {
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
    },
    /// Write a run's newest checkpoint as a Hugging Face transformers GPT-2 directory.
    Export {
        /// The run directory.
        run_dir: PathBuf,
        /// Output directory (config.json, model.safetensors, tokenizer.json, tokenizer_config.json).
        #[arg(long, value_name = "OUT_DIR")]
        hf: PathBuf,
    },
    /// Loss and perplexity on a text file, with sliding windows.
    Eval {
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
    },
    /// Train every combination of a grid of config values × seeds (resumable).
    Sweep {
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
    },
    /// Compare runs: grouped by configuration over seeds, with statistics and plots.
    Compare {
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
    },
    /// Time training steps on random tokens: forward, backward, optimizer, tokens/s, MFU, memory.
    Bench {
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
        #[arg(long, default_value = "f32", value_parser = ["f32", "bf16"])]
        dtype: String,
        /// Sequences per step instead of the preset's.
        #[arg(long)]
        batch_size: Option<usize>,
        /// Context length instead of the preset's (at most the model's).
        #[arg(long)]
        block_size: Option<usize>,
        /// Also print the figures as one JSON object on the last line.
        #[arg(long)]
        json: bool,
    },
    /// Optimizer tools.
    Optim {
        #[command(subcommand)]
        command: OptimCommand,
    },
}

#[derive(Subcommand)]
enum OptimCommand {
    /// Replay a fixture (initial parameters + every step's gradients) and print the parameters
    /// after each step as JSON: {"steps": [{name: nested list}, ...]}.
    Replay {
        /// The fixture JSON (layout: see docs/optimizers.md).
        file: PathBuf,
        /// Compute in this dtype instead of the fixture's.
        #[arg(long, value_parser = ["f32", "f64"])]
        dtype: Option<String>,
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
    if world.size() > 1 && !matches!(cli.command, Command::Train { .. }) {
        bail!(
            "only `train` runs on several ranks; start other commands without mpirun (this job has {} ranks)",
            world.size()
        );
    }
    match cli.command {
        Command::Train {
            config,
            mut set,
            out,
            resume,
            device,
            quiet,
            allow_data_change,
        } => {
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
                match summary.best_val_loss {
                    Some(best) => println!(
                        "done: {} at step {}, best val loss {best:.4}",
                        summary.run_dir.display(),
                        summary.step
                    ),
                    None => println!(
                        "done: {} at step {}",
                        summary.run_dir.display(),
                        summary.step
                    ),
                }
            }
        }
        Command::Sample {
            run_dir,
            prompt,
            max_new_tokens,
            temperature,
            top_k,
            seed,
            device,
        } => {
            if !temperature.is_finite() || temperature < 0.0 {
                bail!("temperature must be >= 0, got {temperature}");
            }
            let opts = SampleOptions {
                prompt: prompt.clone(),
                max_new_tokens,
                temperature,
                top_k: (top_k > 0).then_some(top_k),
                seed,
                device,
            };
            let mut stdout = std::io::stdout();
            print!("{prompt}");
            sample(&run_dir, &opts, |piece| {
                print!("{piece}");
                let _ = stdout.flush();
            })?;
            println!();
        }
        Command::Sweep {
            config,
            set,
            grid,
            seeds,
            out,
            quiet,
        } => {
            let base = config.as_deref().map(TrainConfig::read_table).transpose()?;
            let axes = grid
                .iter()
                .map(|g| gpt_pretrain::study::sweep::parse_axis(g))
                .collect::<Result<Vec<_>>>()?;
            let summary = gpt_pretrain::study::sweep::sweep(
                base,
                &set,
                &axes,
                &seeds,
                &out,
                &Reporting { quiet },
            )?;
            println!(
                "sweep {}: {} runs ({} already done, {} resumed, {} started)",
                out.display(),
                summary.run_dirs.len(),
                summary.already_done,
                summary.resumed,
                summary.started
            );
        }
        Command::Compare {
            runs,
            out,
            target_loss,
            tests,
        } => {
            use gpt_pretrain::study::compare::{compare, TestPlan};
            let plan = tests.as_deref().map(TestPlan::read).transpose()?;
            let report = compare(&runs, &out, target_loss, plan.as_ref())?;
            println!("{report}");
            println!(
                "wrote {}/report.md and plots (val_loss, train_loss, lr_grad_norm, lr_sensitivity .png/.svg)",
                out.display()
            );
        }
        Command::Bench {
            preset,
            steps,
            threads,
            device,
            dtype,
            batch_size,
            block_size,
            json,
        } => {
            limit_threads(threads);
            let device = gpt_pretrain::device::parse_device(&device)?;
            let mut setup = gpt_pretrain::tools::bench::BenchSetup::preset(&preset)?
                .with_batch(batch_size, block_size)?;
            setup.dtype = if dtype == "bf16" {
                gpt_pretrain::config::Precision::Bf16
            } else {
                gpt_pretrain::config::Precision::F32
            };
            let r = gpt_pretrain::tools::bench::run(&setup, steps, &device)?;
            let on = match &r.device_name {
                Some(name) => name.clone(),
                None => format!("{} threads", r.threads),
            };
            println!(
                "{} ({} layers, {} wide, block {}, batch {}, vocab {}, {dtype}), {on}, median of {} steps:",
                setup.preset, setup.n_layer, setup.n_embd, setup.block_size, setup.batch_size, setup.vocab_size, r.steps
            );
            println!(
                "  forward {:.1} ms, backward {:.1} ms, optimizer {:.2} ms, step {:.1} ms",
                r.fwd_ms, r.bwd_ms, r.opt_ms, r.step_ms
            );
            println!(
                "  {:.0} tokens/s, {:.1} GFLOP/s, MFU {:.1}% of the measured matmul peak {:.0} GFLOP/s, peak RSS {:.0} MB",
                r.tokens_per_s,
                r.gflops,
                100.0 * r.mfu,
                r.matmul_peak_gflops,
                r.peak_rss_mb
            );
            if let Some(p) = &r.cpu_peaks {
                let show = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.0}"));
                println!(
                    "  CPU matmuls on {}; peaks (GFLOP/s): gemm f32 {:.0}, oneDNN f32 {}, oneDNN bf16 {}",
                    p.backend,
                    p.gemm_f32,
                    show(p.onednn_f32),
                    show(p.onednn_bf16)
                );
                if let Some((f32_kernel, bf16_kernel)) = &p.onednn_kernels {
                    println!("  oneDNN kernels: f32 {f32_kernel}, bf16 {bf16_kernel}");
                }
            }
            if let (Some(peak), Some(mfu)) = (r.nominal_peak_gflops, r.mfu_nominal) {
                println!(
                    "  MFU {:.1}% of the data-sheet peak {:.0} GFLOP/s",
                    100.0 * mfu,
                    peak
                );
            }
            if json {
                println!(
                    "{}",
                    serde_json::json!({
                        "tokens_per_s": r.tokens_per_s, "fwd_ms": r.fwd_ms, "bwd_ms": r.bwd_ms,
                        "opt_ms": r.opt_ms, "gflops": r.gflops, "mfu": r.mfu, "peak_rss_mb": r.peak_rss_mb,
                        "preset": setup.preset, "threads": r.threads, "dtype": dtype,
                        "batch_size": setup.batch_size, "block_size": setup.block_size,
                        "matmul_peak_gflops": r.matmul_peak_gflops, "device_name": r.device_name,
                        "nominal_peak_gflops": r.nominal_peak_gflops, "mfu_nominal": r.mfu_nominal,
                        "cpu_peaks": r.cpu_peaks,
                    })
                );
            }
        }
        Command::Prepare {
            inputs,
            out,
            name,
            tokenizer,
            tokenizer_path,
            text_field,
            shard_tokens,
            val_tokens,
            threads,
            quiet,
            skip_bad_records,
        } => {
            limit_threads(threads);
            let options = gpt_pretrain::data::prepare::PrepareOptions {
                inputs,
                out: out.clone(),
                name,
                tokenizer,
                tokenizer_path,
                text_field,
                shard_tokens,
                val_tokens,
                progress: !quiet,
                skip_bad_records,
            };
            let started = std::time::Instant::now();
            let m = gpt_pretrain::data::prepare::prepare(&options)?;
            if !quiet {
                println!(
                    "{}: {} documents, {} tokens ({} validation, {} training) in {} shards; {:.1} s; skipped records: {}",
                    out.display(),
                    m.counts.documents,
                    m.counts.tokens,
                    m.val_tokens_written,
                    m.train_tokens_written,
                    m.shards.len(),
                    started.elapsed().as_secs_f64(),
                    m.counts.skipped_summary(5)
                );
            }
        }
        Command::Export { run_dir, hf } => {
            gpt_pretrain::tools::export::export(&run_dir, &hf)?;
            println!(
                "wrote {} (load it with transformers.GPT2LMHeadModel.from_pretrained)",
                hf.display()
            );
        }
        Command::Eval {
            model,
            data,
            block,
            stride,
            out,
            device,
        } => {
            let device = gpt_pretrain::device::parse_device(&device)?;
            let scorer = gpt_pretrain::tools::eval::Scorer::load(&model, &device)?;
            let report =
                gpt_pretrain::tools::eval::evaluate_text(&scorer, &data, block, stride, &device)?;
            let stem = data
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            let out = out.unwrap_or_else(|| model.join(format!("eval-{stem}.json")));
            let json = serde_json::to_string_pretty(&report)?;
            gpt_pretrain::fsutil::write_atomic(&out, json.as_bytes())?;
            println!(
                "{}: loss {:.4}, perplexity {:.3} over {} tokens (block {}, stride {}); wrote {}",
                report.data,
                report.loss,
                report.perplexity,
                report.scored,
                report.block,
                report.stride,
                out.display()
            );
        }
        Command::Optim {
            command:
                OptimCommand::Replay {
                    file,
                    dtype,
                    tensor_ops,
                },
        } => {
            let fixture = gpt_pretrain::optim::replay::read_fixture(&file)?;
            let dtype = dtype.map(|d| match d.as_str() {
                "f32" => candle_core::DType::F32,
                _ => candle_core::DType::F64,
            });
            let steps = fixture.replay(dtype, !tensor_ops)?;
            println!("{}", serde_json::json!({ "steps": steps }));
        }
    }
    Ok(())
}

/// `--threads N`: the size of rayon's pool (candle's, gemm's and our kernels'), which reads it
/// when it starts, later than this.
fn limit_threads(threads: Option<usize>) {
    if let Some(n) = threads {
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
}
