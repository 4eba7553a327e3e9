//! `gpt-pretrain bench`: training-step timing on random tokens (no data needed), split into
//! forward, backward and optimizer, with achieved GFLOP/s and model-FLOPs utilisation against the
//! matmul peak measured on the same machine, and peak resident memory. The configurations match
//! PyTorch's reference GPT (`torch_gpt_bench.py`, `scripts/cpu_bench.sh`) so the two can be run
//! side by side.

use crate::config::Precision;
use crate::model::{Gpt, GptConfig, Params};
use crate::ops::cpu::on_worker_thread_if_cpu;

use crate::optim::{param_groups, Adam, AdamConfig, Optimizer, OptimizerKind};
use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use std::time::Instant;

/// The model and batch a benchmark runs.
#[derive(Debug, Clone, Serialize)]
pub struct BenchSetup {
    pub preset: String,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_embd: usize,
    pub block_size: usize,
    pub batch_size: usize,
    pub vocab_size: usize,
    /// `f32`, or `bf16` mixed precision (CUDA).
    pub dtype: Precision,
}

/// The model preset a bench preset runs (`tiny50k` is the `tiny` model).
fn model_preset(bench_preset: &str) -> &str {
    match bench_preset {
        "tiny50k" => "tiny",
        other => other,
    }
}

impl BenchSetup {
    /// The torch benchmark's configurations: tiny (batch 16, block 128, vocab 65), tiny50k (tiny
    /// with vocab 50304), baby (batch 8, block 256, vocab 65), gpt2 (batch 2, block 256, vocab
    /// 50304).
    pub fn preset(name: &str) -> Result<Self> {
        let (batch_size, block_size, vocab_size) = match name {
            "tiny" => (16, 128, 65),
            // The tiny model with GPT-2's vocabulary, as in the ADOPT-vs-Adam study: the
            // embedding, lm_head and cross-entropy dominate.
            "tiny50k" => (16, 128, 50304),
            "baby" => (8, 256, 65),
            "gpt2" => (2, 256, 50304),
            _ => bail!("bench preset must be tiny, tiny50k, baby or gpt2, got '{name}'"),
        };
        let m = GptConfig::preset(model_preset(name))?;
        Ok(Self {
            preset: name.into(),
            n_layer: m.n_layer,
            n_head: m.n_head,
            n_embd: m.n_embd,
            block_size,
            batch_size,
            vocab_size,
            dtype: Precision::F32,
        })
    }

    /// Overrides the batch size and context length (the context at most the preset's).
    pub fn with_batch(
        mut self,
        batch_size: Option<usize>,
        block_size: Option<usize>,
    ) -> Result<Self> {
        if let Some(b) = batch_size {
            if b == 0 {
                bail!("--batch-size must be at least 1");
            }
            self.batch_size = b;
        }
        if let Some(t) = block_size {
            let max = GptConfig::preset(model_preset(&self.preset))?.block_size;
            if t == 0 || t > max {
                bail!(
                    "--block-size must be in [1, {max}] for {}, got {t}",
                    self.preset
                );
            }
            self.block_size = t;
        }
        Ok(self)
    }

    fn model_config(&self) -> GptConfig {
        GptConfig {
            n_layer: self.n_layer,
            n_head: self.n_head,
            n_embd: self.n_embd,
            block_size: self.block_size,
            bias: true,
            dropout: 0.0,
            vocab_size: self.vocab_size,
        }
    }

    /// Training FLOPs per token ([`GptConfig::training_flops_per_token`]).
    pub fn flops_per_token(&self) -> f64 {
        self.model_config().training_flops_per_token()
    }
}

/// What `bench` measured (medians over the timed steps).
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub setup: BenchSetup,
    pub threads: usize,
    pub steps: usize,
    pub tokens_per_s: f64,
    pub fwd_ms: f64,
    pub bwd_ms: f64,
    pub opt_ms: f64,
    pub step_ms: f64,
    pub gflops: f64,
    /// Best measured matmul throughput in the compute dtype: on CPU on the model's MLP shape,
    /// on a GPU an 8192³ product.
    pub matmul_peak_gflops: f64,
    pub mfu: f64,
    /// The GPU's name, when on CUDA.
    pub device_name: Option<String>,
    /// The data-sheet dense peak for the compute dtype when the GPU is one we know, and MFU
    /// against it (as nanoGPT's `estimate_mfu` reports against the A100's 312 TFLOP/s).
    pub nominal_peak_gflops: Option<f64>,
    pub mfu_nominal: Option<f64>,
    pub peak_rss_mb: f64,
    /// On CPU: the matmul peaks of each backend on the MLP shape, and which backend trains.
    pub cpu_peaks: Option<CpuPeaks>,
}

/// Matmul throughput on CPU (GFLOP/s) on the model's MLP shape, per backend: the best time over
/// at least 5 calls and a quarter of a second, measured before and after the timed steps, the
/// better of the two kept (a host whose speed swings, as these VMs' does, once gave a peak low
/// enough for an MFU of 167%).
#[derive(Debug, Clone, Serialize)]
pub struct CpuPeaks {
    /// What the CPU matmuls run on ([`crate::ops::onednn::backend_description`]).
    pub backend: String,
    pub gemm_f32: f64,
    pub onednn_f32: Option<f64>,
    /// bf16 × bf16 → f32.
    pub onednn_bf16: Option<f64>,
    /// The kernels oneDNN chose for the MLP shape, f32 and bf16 (`brg:avx512_core_amx_bf16` is
    /// AMX).
    pub onednn_kernels: Option<(String, String)>,
}

impl CpuPeaks {
    fn measure(setup: &BenchSetup) -> Result<Self> {
        let loaded = crate::ops::onednn::onednn().is_some();
        let onednn = |precision| -> Result<Option<f64>> {
            if loaded {
                Ok(Some(onednn_peak(setup, precision)?))
            } else {
                Ok(None)
            }
        };
        let mlp = (
            setup.batch_size * setup.block_size,
            4 * setup.n_embd,
            setup.n_embd,
        );
        let bf16 = crate::ops::onednn::bf16_kernels();
        let onednn_kernels = match crate::ops::onednn::onednn() {
            Some(dnnl) => {
                use crate::ops::onednn::Elem;
                Some((
                    dnnl.implementation(mlp, Elem::F32)?,
                    match bf16 {
                        true => dnnl.implementation(mlp, Elem::Bf16)?,
                        false => "none (no bf16 matmul for this CPU)".into(),
                    },
                ))
            }
            None => None,
        };
        Ok(Self {
            onednn_kernels,
            backend: crate::ops::onednn::backend_description(),
            gemm_f32: matmul_peak(setup, &Device::Cpu, DType::F32)?,
            onednn_f32: onednn(Precision::F32)?,
            onednn_bf16: match bf16 {
                true => onednn(Precision::Bf16)?,
                false => None,
            },
        })
    }

    /// Each backend's better peak of two measurements.
    fn better(self, other: Self) -> Self {
        let max = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        Self {
            gemm_f32: self.gemm_f32.max(other.gemm_f32),
            onednn_f32: max(self.onednn_f32, other.onednn_f32),
            onednn_bf16: max(self.onednn_bf16, other.onednn_bf16),
            ..self
        }
    }

    /// The best peak in the precision a run computes in.
    fn best(&self, dtype: Precision) -> f64 {
        match dtype {
            Precision::F32 => self.onednn_f32.unwrap_or(0.0).max(self.gemm_f32),
            Precision::Bf16 => self.onednn_bf16.unwrap_or(f64::NAN),
        }
    }
}

impl BenchReport {
    /// The figures as one JSON object (`bench --json`'s last line).
    pub fn to_json(&self) -> serde_json::Value {
        let setup = &self.setup;
        serde_json::json!({
            "tokens_per_s": self.tokens_per_s, "fwd_ms": self.fwd_ms, "bwd_ms": self.bwd_ms,
            "opt_ms": self.opt_ms, "gflops": self.gflops, "mfu": self.mfu,
            "peak_rss_mb": self.peak_rss_mb, "preset": setup.preset, "threads": self.threads,
            "dtype": setup.dtype, "batch_size": setup.batch_size, "block_size": setup.block_size,
            "matmul_peak_gflops": self.matmul_peak_gflops, "device_name": self.device_name,
            "nominal_peak_gflops": self.nominal_peak_gflops, "mfu_nominal": self.mfu_nominal,
            "cpu_peaks": self.cpu_peaks,
        })
    }
}

impl std::fmt::Display for BenchReport {
    /// The figures for a reader: shape, step times, tokens/s, MFU, memory, the CPU peaks.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let setup = &self.setup;
        let on = match &self.device_name {
            Some(name) => name.clone(),
            None => format!("{} threads", self.threads),
        };
        writeln!(
            f,
            "{} ({} layers, {} wide, block {}, batch {}, vocab {}, {}), {on}, median of {} steps:",
            setup.preset,
            setup.n_layer,
            setup.n_embd,
            setup.block_size,
            setup.batch_size,
            setup.vocab_size,
            setup.dtype.name(),
            self.steps
        )?;
        writeln!(
            f,
            "  forward {:.1} ms, backward {:.1} ms, optimizer {:.2} ms, step {:.1} ms",
            self.fwd_ms, self.bwd_ms, self.opt_ms, self.step_ms
        )?;
        write!(
            f,
            "  {:.0} tokens/s, {:.1} GFLOP/s, MFU {:.1}% of the measured matmul peak {:.0} GFLOP/s, peak RSS {:.0} MB",
            self.tokens_per_s,
            self.gflops,
            100.0 * self.mfu,
            self.matmul_peak_gflops,
            self.peak_rss_mb
        )?;
        if let Some(p) = &self.cpu_peaks {
            let show = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.0}"));
            write!(
                f,
                "\n  CPU matmuls on {}; peaks (GFLOP/s): gemm f32 {:.0}, oneDNN f32 {}, oneDNN bf16 {}",
                p.backend,
                p.gemm_f32,
                show(p.onednn_f32),
                show(p.onednn_bf16)
            )?;
            if let Some((f32_kernel, bf16_kernel)) = &p.onednn_kernels {
                write!(
                    f,
                    "\n  oneDNN kernels: f32 {f32_kernel}, bf16 {bf16_kernel}"
                )?;
            }
        }
        if let (Some(peak), Some(mfu)) = (self.nominal_peak_gflops, self.mfu_nominal) {
            write!(
                f,
                "\n  MFU {:.1}% of the data-sheet peak {:.0} GFLOP/s",
                100.0 * mfu,
                peak
            )?;
        }
        Ok(())
    }
}

/// The shortest time `f` takes over at least `min_calls` calls and `min_secs` seconds.
fn best_time(min_calls: usize, min_secs: f64, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    let (start, mut best, mut calls) = (Instant::now(), f64::MAX, 0);
    while calls < min_calls || start.elapsed().as_secs_f64() < min_secs {
        let t = Instant::now();
        f()?;
        best = best.min(t.elapsed().as_secs_f64());
        calls += 1;
    }
    Ok(best)
}

/// Calls and seconds of a CPU peak measurement ([`CpuPeaks`]).
const CPU_PEAK_CALLS: usize = 5;
const CPU_PEAK_SECS: f64 = 0.25;

/// oneDNN's throughput on the MLP shape, operands already in `precision` ([`CpuPeaks`]).
fn onednn_peak(setup: &BenchSetup, precision: Precision) -> Result<f64> {
    use crate::ops::cpu::{matmul, Operand};
    let (m, k, n) = (
        setup.batch_size * setup.block_size,
        setup.n_embd,
        4 * setup.n_embd,
    );
    let values = |len: usize| (0..len).map(|i| ((i % 97) as f32 - 48.0) / 64.0).collect();
    let (a, b): (Vec<f32>, Vec<f32>) = (values(m * k), values(k * n));
    let (a, b) = (Operand::new(&a, precision), Operand::new(&b, precision));
    let mut c = vec![0f32; m * n];
    matmul((m, n, k), &mut c, a.view(k, 1), b.view(n, 1), None, false)?;
    let best = best_time(CPU_PEAK_CALLS, CPU_PEAK_SECS, || {
        Ok(matmul(
            (m, n, k),
            &mut c,
            a.view(k, 1),
            b.view(n, 1),
            None,
            false,
        )?)
    })?;
    Ok(2.0 * (m * k * n) as f64 / best / 1e9)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// Best matmul throughput in `dtype`: on CPU on the model's MLP shape, (B·T × C) · (C × 4C), as
/// [`CpuPeaks`] measures; on a GPU on 8192³ (big enough to saturate it), best of 10 after
/// warm-up.
fn matmul_peak(setup: &BenchSetup, device: &Device, dtype: DType) -> Result<f64> {
    let (m, k, n, calls, secs) = if device.is_cpu() {
        let m = setup.batch_size * setup.block_size;
        (
            m,
            setup.n_embd,
            4 * setup.n_embd,
            CPU_PEAK_CALLS,
            CPU_PEAK_SECS,
        )
    } else {
        (8192, 8192, 8192, 10, 0.0)
    };
    let a = Tensor::rand(-1f32, 1f32, (m, k), device)?.to_dtype(dtype)?;
    let b = Tensor::rand(-1f32, 1f32, (k, n), device)?.to_dtype(dtype)?;
    if !device.is_cpu() {
        a.matmul(&b)?;
        device.synchronize()?;
    }
    let best = best_time(calls, secs, || Ok(a.matmul(&b)?.device().synchronize()?))?;
    Ok(2.0 * (m * k * n) as f64 / best / 1e9)
}

fn peak_rss_mb() -> f64 {
    // SAFETY: getrusage fills the struct we pass.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return f64::NAN;
    }
    usage.ru_maxrss as f64 / 1024.0 // kilobytes on Linux
}

/// Times `steps` training steps (after 2 warm-up steps) of AdamW on random tokens.
pub fn run(setup: &BenchSetup, steps: usize, device: &Device) -> Result<BenchReport> {
    if steps == 0 {
        bail!("--steps must be at least 1");
    }
    let cfg = setup.model_config();
    let compute = setup.dtype.compute_dtype();
    let params = Params::init(&cfg, 0, DType::F32, device)?;
    let model = Gpt::with_precision(&cfg, &params, setup.dtype)?;
    let mut opt = Adam::with_params(
        param_groups(&params.named_vars(), 0.1, false),
        AdamConfig::defaults(OptimizerKind::AdamW),
    )?;
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let (b, t) = (setup.batch_size, setup.block_size);
    let mut batch = || -> Result<(Tensor, Tensor)> {
        let ids: Vec<u32> = (0..b * (t + 1))
            .map(|_| rng.random_range(0..setup.vocab_size as u32))
            .collect();
        let all = Tensor::from_vec(ids, (b, t + 1), device)?;
        Ok((
            all.narrow(1, 0, t)?.contiguous()?,
            all.narrow(1, 1, t)?.contiguous()?,
        ))
    };
    // The peaks before the steps, and again after them (below).
    let peaks_before = if device.is_cpu() {
        Some(CpuPeaks::measure(setup)?)
    } else {
        None
    };
    let (mut fwd, mut bwd, mut upd) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..steps + 2 {
        let (x, y) = batch()?;
        // As the trainer runs a step: on CPU, forward and backward on one of rayon's workers,
        // then the update on one.
        let forward_backward = || -> Result<_> {
            let t0 = Instant::now();
            let loss = model.loss(&x, &y, None)?;
            let _ = loss.to_scalar::<f32>()?;
            let t1 = Instant::now();
            let grads = loss.backward()?;
            device.synchronize()?;
            Ok((t0, t1, Instant::now(), grads))
        };
        let (t0, t1, t2, grads) = on_worker_thread_if_cpu(device, forward_backward)?;
        let t3 = on_worker_thread_if_cpu(device, || -> Result<Instant> {
            opt.update(&grads, 1e-4)?;
            device.synchronize()?;
            Ok(Instant::now())
        })?;
        if i >= 2 {
            fwd.push((t1 - t0).as_secs_f64());
            bwd.push((t2 - t1).as_secs_f64());
            upd.push((t3 - t2).as_secs_f64());
        }
    }
    let totals: Vec<f64> = (0..fwd.len()).map(|i| fwd[i] + bwd[i] + upd[i]).collect();
    let step = median(totals);
    let tokens_per_s = (b * t) as f64 / step;
    let gflops = setup.flops_per_token() * tokens_per_s / 1e9;
    let cpu_peaks = match peaks_before {
        Some(before) => Some(before.better(CpuPeaks::measure(setup)?)),
        None => None,
    };
    let peak = match &cpu_peaks {
        Some(peaks) => peaks.best(setup.dtype),
        None => matmul_peak(setup, device, compute)?,
    };
    let name = crate::device::device_name(device);
    let nominal = name
        .as_deref()
        .and_then(|n| crate::device::nominal_peak_gflops(n, compute));
    Ok(BenchReport {
        setup: setup.clone(),
        threads: candle_core::utils::get_num_threads(),
        steps,
        tokens_per_s,
        fwd_ms: median(fwd) * 1e3,
        bwd_ms: median(bwd) * 1e3,
        opt_ms: median(upd) * 1e3,
        step_ms: step * 1e3,
        gflops,
        matmul_peak_gflops: peak,
        mfu: gflops / peak,
        device_name: name,
        nominal_peak_gflops: nominal,
        mfu_nominal: nominal.map(|p| gflops / p),
        peak_rss_mb: peak_rss_mb(),
        cpu_peaks,
    })
}
