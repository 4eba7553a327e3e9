//! One optimizer step over parameter sets shaped like the `baby` (10.7M) and `gpt2` (124M) models,
//! for Adam, AdamW and ADOPT, against the memory-bandwidth floor measured here too; and Muon's
//! step over the same models' block matrices (what `optimizer = "muon"` gives it), its
//! Newton–Schulz iteration in bf16 (PyTorch's default) and in f32. `OPTIM_BENCH_MUON=0` skips Muon.
//!
//! An f32 Adam-family step reads θ, g, m, v and writes θ, m, v: 28 bytes per parameter. The floor
//! is that traffic at the bandwidth this machine reaches on the same access pattern (a trivial
//! in-place update of four 256 MiB arrays, measured here); plain copy bandwidth is printed beside it.
//! `cargo bench --bench optim` prints, after criterion's own report, each median as a multiple of
//! the floor.

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use criterion::{criterion_group, criterion_main, Criterion};
use gpt_pretrain::model::{is_hidden_matrix, GptConfig};
use gpt_pretrain::optim::{
    param_groups, Adam, AdamConfig, Adopt, AdoptConfig, Muon, MuonConfig, NewtonSchulzPrecision,
    Optimizer, OptimizerKind, Param,
};
use rayon::prelude::*;
use std::time::{Duration, Instant};

const BYTES_PER_PARAM: f64 = 28.0;

/// Copy bandwidth (bytes read + written per second) of a parallel copy of 512 MiB, best of 5.
fn copy_bandwidth() -> f64 {
    let n = 128 << 20;
    let src = vec![1.0f32; n];
    let mut dst = vec![0.0f32; n];
    let mut best = f64::MAX;
    for _ in 0..5 {
        let t = Instant::now();
        dst.par_chunks_mut(1 << 16)
            .zip(src.par_chunks(1 << 16))
            .for_each(|(d, s)| d.copy_from_slice(s));
        best = best.min(t.elapsed().as_secs_f64());
        std::hint::black_box(&dst);
    }
    2.0 * 4.0 * n as f64 / best
}

/// Bandwidth (bytes per second) of the optimizer's access pattern with no arithmetic to speak of:
/// read θ, g, m, v and write θ, m, v, in parallel chunks; best of 5 over 64M elements.
fn update_pattern_bandwidth() -> f64 {
    let n = 64 << 20;
    let g = vec![1e-3f32; n];
    let (mut theta, mut m, mut v) = (vec![0.5f32; n], vec![0.0f32; n], vec![0.0f32; n]);
    let mut best = f64::MAX;
    for _ in 0..5 {
        let t = Instant::now();
        theta
            .par_chunks_mut(1 << 15)
            .zip(g.par_chunks(1 << 15))
            .zip(m.par_chunks_mut(1 << 15))
            .zip(v.par_chunks_mut(1 << 15))
            .for_each(|(((t, g), m), v)| {
                let n = t.len();
                let (g, m, v) = (&g[..n], &mut m[..n], &mut v[..n]);
                for i in 0..n {
                    m[i] += g[i];
                    v[i] += g[i];
                    t[i] -= m[i] * v[i];
                }
            });
        best = best.min(t.elapsed().as_secs_f64());
        std::hint::black_box((&theta, &m, &v));
    }
    BYTES_PER_PARAM * n as f64 / best
}

/// The model's parameters (random values) and a gradient for each.
fn parameter_set(preset: &str, vocab: usize) -> (Vec<(String, Var)>, GradStore, usize) {
    let mut cfg = GptConfig::preset(preset).unwrap();
    cfg.vocab_size = GptConfig::padded_vocab(vocab);
    let device = Device::Cpu;
    let mut vars = Vec::new();
    let mut loss = Tensor::zeros((), DType::F32, &device).unwrap();
    for spec in cfg.parameter_specs() {
        let theta = Tensor::rand(-0.1f32, 0.1, spec.shape.as_slice(), &device).unwrap();
        let g = Tensor::rand(-1e-3f32, 1e-3, spec.shape.as_slice(), &device).unwrap();
        let var = Var::from_tensor(&theta).unwrap();
        loss = (loss + var.as_tensor().mul(&g).unwrap().sum_all().unwrap()).unwrap();
        vars.push((spec.name, var));
    }
    let grads = loss.backward().unwrap();
    (vars, grads, cfg.n_params())
}

fn build(kind: &str, params: Vec<Param>, fused: bool) -> Box<dyn Optimizer> {
    match kind {
        "adopt" => {
            let mut o = Adopt::with_params(
                params,
                AdoptConfig {
                    decouple: true,
                    ..Default::default()
                },
            )
            .unwrap();
            o.set_fused(fused).unwrap();
            Box::new(o)
        }
        k => {
            let kind = if k == "adam" {
                OptimizerKind::Adam
            } else {
                OptimizerKind::AdamW
            };
            let mut o = Adam::with_params(params, AdamConfig::defaults(kind)).unwrap();
            o.set_fused(fused).unwrap();
            Box::new(o)
        }
    }
}

fn median(mut v: Vec<Duration>) -> Option<f64> {
    v.sort();
    v.get(v.len() / 2).map(|d| d.as_secs_f64())
}

fn bench(c: &mut Criterion) {
    let copy = copy_bandwidth();
    let bandwidth = update_pattern_bandwidth();
    let mut summary = vec![format!(
        "bandwidth: {:.1} GB/s on the optimizer's access pattern (floor = 28 bytes/parameter at that rate); plain copy {:.1} GB/s",
        bandwidth / 1e9,
        copy / 1e9
    )];
    // baby as nanoGPT's Shakespeare model (65-character vocabulary); gpt2 with 50304 tokens.
    // OPTIM_BENCH_PRESETS=baby skips the 124M-parameter set.
    let wanted = std::env::var("OPTIM_BENCH_PRESETS").unwrap_or_else(|_| "baby,gpt2".into());
    for (preset, vocab, samples) in [("baby", 65, 30), ("gpt2", 50304, 10)] {
        if !wanted.split(',').any(|w| w == preset) {
            continue;
        }
        let (vars, grads, n) = parameter_set(preset, vocab);
        let floor = n as f64 * BYTES_PER_PARAM / bandwidth;
        summary.push(format!(
            "{preset}: {:.1}M parameters, floor {:.2} ms",
            n as f64 / 1e6,
            floor * 1e3
        ));
        let mut group = c.benchmark_group(preset);
        group
            .sample_size(samples)
            .warm_up_time(Duration::from_secs(1));
        let variants: &[(&str, bool)] = if preset == "baby" {
            &[
                ("adam", true),
                ("adamw", true),
                ("adopt", true),
                ("adam", false),
                ("adopt", false),
            ]
        } else {
            &[("adam", true), ("adamw", true), ("adopt", true)]
        };
        let mut adam_time = None;
        for &(kind, fused) in variants {
            let mut opt = build(kind, param_groups(&vars, 0.1, false), fused);
            // Two warm-up steps: ADOPT's first step only initialises v.
            opt.update(&grads, 1e-4).unwrap();
            opt.update(&grads, 1e-4).unwrap();
            let mut times = Vec::new();
            let name = if fused {
                kind.to_string()
            } else {
                format!("{kind}-tensor-ops")
            };
            group.bench_function(&name, |b| {
                b.iter_custom(|iters| {
                    let start = Instant::now();
                    for _ in 0..iters {
                        opt.update(&grads, 1e-4).unwrap();
                    }
                    let d = start.elapsed();
                    times.push(d / iters as u32);
                    d
                })
            });
            // Filtered out on the command line.
            let Some(t) = median(times) else { continue };
            if kind == "adam" && fused {
                adam_time = Some(t);
            }
            let vs_adam = adam_time.map_or(String::new(), |a| format!(", {:.2}x Adam", t / a));
            summary.push(format!(
                "  {name:<18} {:8.2} ms = {:.2}x floor{vs_adam}",
                t * 1e3,
                t / floor
            ));
        }
        if std::env::var("OPTIM_BENCH_MUON").as_deref() != Ok("0") {
            let matrices: Vec<Param> = param_groups(&vars, 0.1, false)
                .into_iter()
                .filter(|p| is_hidden_matrix(&p.name, p.var.rank()))
                .collect();
            let count: usize = matrices.iter().map(|p| p.var.elem_count()).sum();
            summary.push(format!(
                "  muon over the {} block matrices ({:.1}M parameters):",
                matrices.len(),
                count as f64 / 1e6
            ));
            for (label, precision) in [
                ("muon-bf16", NewtonSchulzPrecision::Bf16),
                ("muon-f32", NewtonSchulzPrecision::F32),
            ] {
                let cfg = MuonConfig {
                    newton_schulz_precision: precision,
                    ..Default::default()
                };
                let mut muon = Muon::with_params(matrices.clone(), cfg).unwrap();
                muon.update(&grads, 1e-4).unwrap();
                let mut times = Vec::new();
                group.sample_size(10).bench_function(label, |b| {
                    b.iter_custom(|iters| {
                        let start = Instant::now();
                        for _ in 0..iters {
                            muon.update(&grads, 1e-4).unwrap();
                        }
                        let d = start.elapsed();
                        times.push(d / iters as u32);
                        d
                    })
                });
                if let Some(t) = median(times) {
                    summary.push(format!("  {label:<18} {:8.2} ms", t * 1e3));
                }
            }
        }
        group.finish();
        // The machine's noise swamps small differences between separate runs; alternating the
        // two optimizers step by step exposes both to the same conditions.
        let mut adam = build("adam", param_groups(&vars, 0.1, false), true);
        let mut adopt = build("adopt", param_groups(&vars, 0.1, false), true);
        let (mut ta, mut to) = (Vec::new(), Vec::new());
        for _ in 0..samples.max(20) {
            let t = Instant::now();
            adam.update(&grads, 1e-4).unwrap();
            ta.push(t.elapsed());
            let t = Instant::now();
            adopt.update(&grads, 1e-4).unwrap();
            to.push(t.elapsed());
        }
        if let (Some(a), Some(o)) = (median(ta), median(to)) {
            summary.push(format!(
                "  interleaved: adam {:.2} ms, adopt {:.2} ms: ADOPT = {:.2}x Adam",
                a * 1e3,
                o * 1e3,
                o / a
            ));
        }
    }
    println!("\n{}", summary.join("\n"));
}

criterion_group!(benches, bench);
criterion_main!(benches);
