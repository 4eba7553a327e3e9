//! CUDA: the fused optimizer kernels against the CPU kernel and the PyTorch fixtures, optimizer
//! state round trips, and short training runs (f32 and bf16, with resume). Each test runs when the
//! build has the `cuda` feature and a device answers; otherwise it prints that it was skipped.
//! scripts/gpu_check.sh runs these on a GPU machine.

mod common;

use candle_core::{DType, Device, Tensor, Var};
use common::{as_f64_vec, ok, read_json_lines, tinyshakespeare, train_losses, Workspace};
use gpt_pretrain::optim::replay::{flat, flat_values, read_fixture};
use gpt_pretrain::optim::{
    self, AdamConfig, AdoptConfig, AdoptVariant, Optimizer, OptimizerKind, OptimizerSettings, Param,
};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};
use std::collections::HashMap;

fn cuda(test: &str) -> Option<Device> {
    match Device::new_cuda(0) {
        Ok(d) => Some(d),
        Err(e) => {
            eprintln!("skipped {test}: no CUDA device ({e})");
            None
        }
    }
}

#[test]
fn fixtures_replay_on_cuda() {
    let Some(device) = cuda("fixtures_replay_on_cuda") else {
        return;
    };
    let dir = common::project_root().join("tests/fixtures/optim");
    let mut checked = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let fixture = read_fixture(&path).unwrap();
        let expected: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        for fused in [true, false] {
            for (dtype, tolerance) in [(DType::F64, 1e-12), (DType::F32, 1e-5)] {
                let ours = fixture.replay_on(&device, Some(dtype), fused).unwrap();
                for (step, theirs) in ours
                    .iter()
                    .zip(expected["expected"]["steps"].as_array().unwrap())
                {
                    for (name, values) in flat_values(step).unwrap() {
                        for (x, y) in values.iter().zip(flat(&theirs[&name]).unwrap()) {
                            let err = (x - y).abs() / y.abs().max(1e-3);
                            assert!(
                                err < tolerance,
                                "{} {dtype:?} fused={fused} {name}: {err:e}",
                                path.display()
                            );
                            checked += 1;
                        }
                    }
                }
            }
        }
    }
    assert!(checked > 0, "no fixture values compared");
}

/// Each optimizer as the study configures it, plus the variants with other code paths.
fn optimizer_cases() -> Vec<(&'static str, OptimizerSettings)> {
    let adam = |kind, wd| {
        OptimizerSettings::Adam(AdamConfig {
            beta2: 0.95,
            weight_decay: wd,
            ..AdamConfig::defaults(kind)
        })
    };
    vec![
        ("adam-l2", adam(OptimizerKind::Adam, 0.1)),
        ("adamw", adam(OptimizerKind::AdamW, 0.1)),
        (
            "adopt",
            OptimizerSettings::Adopt(AdoptConfig {
                weight_decay: 0.1,
                decouple: true,
                ..AdoptConfig::default()
            }),
        ),
        (
            "adopt-coupled",
            OptimizerSettings::Adopt(AdoptConfig {
                weight_decay: 0.01,
                ..AdoptConfig::default()
            }),
        ),
        (
            "adopt-original",
            OptimizerSettings::Adopt(AdoptConfig {
                weight_decay: 0.1,
                decouple: true,
                clip_exponent: None,
                variant: AdoptVariant::Original,
                ..AdoptConfig::default()
            }),
        ),
    ]
}

/// Shapes that cover a partial block, a 1-D tensor and one larger than the kernels' grid (3.1M
/// elements > 8192 blocks × 256 threads), so the grid-stride loop runs.
const SHAPES: [&[usize]; 3] = [&[7, 5], &[1000], &[1536, 2049]];

/// Initial values and 4 steps of gradients, the first row of every gradient zero on step 1 (an
/// embedding row no batch used: ADOPT's v starts at 0 there).
fn problem() -> (Vec<Vec<f32>>, Vec<Vec<Vec<f32>>>) {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let normal = Normal::new(0.0f32, 1.0).unwrap();
    let mut draw = |n: usize, scale: f32| -> Vec<f32> {
        (0..n).map(|_| normal.sample(&mut rng) * scale).collect()
    };
    let sizes: Vec<usize> = SHAPES.iter().map(|s| s.iter().product()).collect();
    let init = sizes.iter().map(|&n| draw(n, 0.02)).collect();
    let grads = (0..4)
        .map(|step| {
            SHAPES
                .iter()
                .zip(&sizes)
                .map(|(shape, &n)| {
                    let mut g = draw(n, 1e-3);
                    if step == 0 {
                        let row = shape.last().copied().unwrap_or(n).min(n);
                        g[..row].iter_mut().for_each(|x| *x = 0.0);
                    }
                    g
                })
                .collect()
        })
        .collect();
    (init, grads)
}

/// Every parameter's values after each step: `[step][param][element]`.
type Trajectory = Vec<Vec<Vec<f32>>>;

/// Runs the optimizer over the problem on `device`; returns θ after every step and the final state.
fn run(
    settings: &OptimizerSettings,
    device: &Device,
    fused: bool,
) -> (Trajectory, HashMap<String, Vec<f32>>) {
    let (init, grads) = problem();
    let vars: Vec<Var> = init
        .iter()
        .zip(SHAPES)
        .map(|(v, shape)| Var::from_tensor(&Tensor::from_slice(v, shape, device).unwrap()).unwrap())
        .collect();
    let params = vars
        .iter()
        .enumerate()
        .map(|(i, var)| Param {
            name: format!("p{i}"),
            var: var.clone(),
            weight_decay: if var.rank() >= 2 { 0.1 } else { 0.0 },
        })
        .collect();
    let mut opt = optim::build(settings, params).unwrap();
    if !fused {
        opt = match settings {
            OptimizerSettings::Adam(cfg) => {
                let mut o = optim::Adam::with_params(named(&vars), cfg.clone()).unwrap();
                o.set_fused(false).unwrap();
                Box::new(o)
            }
            OptimizerSettings::Adopt(cfg) => {
                let mut o = optim::Adopt::with_params(named(&vars), cfg.clone()).unwrap();
                o.set_fused(false).unwrap();
                Box::new(o)
            }
            OptimizerSettings::Muon { .. } => unreachable!("Muon has no fused kernel"),
        };
    }
    let mut thetas = Vec::new();
    for step_grads in &grads {
        // d/dθ Σ sum(θ ⊙ G) = G exactly.
        let mut loss = Tensor::zeros((), DType::F32, device).unwrap();
        for ((var, g), shape) in vars.iter().zip(step_grads).zip(SHAPES) {
            let g = Tensor::from_slice(g, shape, device).unwrap();
            loss = (loss + var.as_tensor().mul(&g).unwrap().sum_all().unwrap()).unwrap();
        }
        opt.update(&loss.backward().unwrap(), 3e-3).unwrap();
        thetas.push(
            vars.iter()
                .map(|v| v.as_tensor().flatten_all().unwrap().to_vec1().unwrap())
                .collect(),
        );
    }
    let state = opt
        .state_tensors()
        .unwrap()
        .into_iter()
        .filter(|(name, _)| !name.starts_with("step."))
        .map(|(name, t)| (name, t.flatten_all().unwrap().to_vec1().unwrap()))
        .collect();
    (thetas, state)
}

fn named(vars: &[Var]) -> Vec<Param> {
    vars.iter()
        .enumerate()
        .map(|(i, var)| Param {
            name: format!("p{i}"),
            var: var.clone(),
            weight_decay: if var.rank() >= 2 { 0.1 } else { 0.0 },
        })
        .collect()
}

/// Largest |a − b| / max(|b|, 1e-3) (as the fixture tests: an update of lr 3e-3 can cancel θ to
/// near zero) and how many elements differ at all.
fn compare(a: &[f32], b: &[f32]) -> (f64, usize) {
    assert_eq!(a.len(), b.len());
    let mut worst = 0f64;
    let mut differing = 0;
    for (&x, &y) in a.iter().zip(b) {
        if x.to_bits() != y.to_bits() {
            differing += 1;
            worst = worst.max(((x - y).abs() / y.abs().max(1e-3)) as f64);
        }
    }
    (worst, differing)
}

#[test]
fn cuda_kernels_match_the_cpu_kernel() {
    let Some(gpu) = cuda("cuda_kernels_match_the_cpu_kernel") else {
        return;
    };
    for (label, settings) in optimizer_cases() {
        let (cpu_thetas, cpu_state) = run(&settings, &Device::Cpu, true);
        for fused in [true, false] {
            let (gpu_thetas, gpu_state) = run(&settings, &gpu, fused);
            let mut total_differing = 0;
            for (step, (c, g)) in cpu_thetas.iter().zip(&gpu_thetas).enumerate() {
                for (i, (c, g)) in c.iter().zip(g).enumerate() {
                    let (worst, differing) = compare(g, c);
                    total_differing += differing;
                    // The fused kernel does the CPU kernel's operations in its order with no
                    // contracted multiply-adds: bitwise equal. Tensor ops round differently.
                    if fused {
                        assert_eq!(differing, 0, "{label} step {} p{i}", step + 1);
                    }
                    // Tensor ops: ADOPT divides by sqrt(v) of gradients ~1e-3, which magnifies
                    // rounding differences; 1e-3 still catches a wrong rule.
                    assert!(
                        worst <= 1e-3,
                        "{label} fused={fused} step {} p{i}: relative error {worst:e}",
                        step + 1
                    );
                }
            }
            for (name, c) in &cpu_state {
                let (worst, _) = compare(&gpu_state[name], c);
                if fused {
                    assert_eq!(compare(&gpu_state[name], c).1, 0, "{label} {name}");
                }
                assert!(worst <= 1e-3, "{label} fused={fused} {name}: {worst:e}");
            }
            eprintln!(
                "{label} fused={fused}: {total_differing} of {} values differ from the CPU kernel's",
                cpu_thetas.len() * cpu_thetas[0].iter().map(Vec::len).sum::<usize>()
            );
        }
    }
}

#[test]
fn cuda_optimizer_state_round_trips() {
    let Some(gpu) = cuda("cuda_optimizer_state_round_trips") else {
        return;
    };
    for (label, settings) in optimizer_cases() {
        let var = Var::from_tensor(
            &Tensor::arange(0f32, 4096., &gpu)
                .unwrap()
                .affine(1e-3, -2.0)
                .unwrap(),
        )
        .unwrap();
        let param = |v: &Var| Param {
            name: "w".into(),
            var: v.clone(),
            weight_decay: 0.1,
        };
        let grad_step = |opt: &mut Box<dyn Optimizer>, v: &Var, k: f64| {
            let g = (v.as_tensor().sin().unwrap() * k).unwrap().detach();
            let loss = v.as_tensor().mul(&g).unwrap().sum_all().unwrap();
            opt.update(&loss.backward().unwrap(), 1e-2).unwrap();
        };
        let mut a = optim::build(&settings, vec![param(&var)]).unwrap();
        for k in 1..=3 {
            grad_step(&mut a, &var, k as f64);
        }
        let saved = a.state_tensors().unwrap();
        let saved_theta = var.as_tensor().copy().unwrap();
        // The saved tensors are copies: further steps must not change them.
        let before: Vec<f32> = saved["exp_avg.w"].to_vec1().unwrap();
        grad_step(&mut a, &var, 4.0);
        let after: Vec<f32> = saved["exp_avg.w"].to_vec1().unwrap();
        assert_eq!(before, after, "{label}: saved state aliases the live state");
        let continued: Vec<f32> = var.as_tensor().to_vec1().unwrap();

        let var_b = Var::from_tensor(&saved_theta).unwrap();
        let mut b = optim::build(&settings, vec![param(&var_b)]).unwrap();
        let on_host: HashMap<String, Tensor> = saved
            .iter()
            .map(|(k, t)| (k.clone(), t.to_device(&Device::Cpu).unwrap()))
            .collect();
        b.load_state_tensors(&on_host).unwrap();
        assert_eq!(b.steps_taken(), 3, "{label}");
        grad_step(&mut b, &var_b, 4.0);
        let resumed: Vec<f32> = var_b.as_tensor().to_vec1().unwrap();
        assert_eq!(
            continued, resumed,
            "{label}: restored state steps differently"
        );
    }
}

/// A 4-layer, 128-wide model on Tiny Shakespeare on the GPU for `steps` steps.
fn gpu_workspace_config(
    ws: &Workspace,
    name: &str,
    steps: usize,
    extra: &str,
) -> std::path::PathBuf {
    ws.config(
        name,
        &tinyshakespeare(),
        &format!(
            "device = \"cuda\"\nn_layer = 4\nn_head = 4\nn_embd = 128\nblock_size = 128\n\
             batch_size = 16\nmax_steps = {steps}\nlr_decay_steps = {steps}\nwarmup_steps = 10\n\
             lr = 3e-3\neval_interval = {}\neval_iters = 4\nlog_interval = 10\n{extra}",
            steps / 2
        ),
    )
}

fn val_losses(run: &std::path::Path) -> Vec<f64> {
    read_json_lines(&run.join("metrics.jsonl"))
        .into_iter()
        .filter(|v| v["split"] == "val")
        .map(|v| v["loss"].as_f64().unwrap())
        .collect()
}

#[test]
fn training_on_cuda_learns_and_resumes_f32_and_bf16() {
    if cuda("training_on_cuda_learns_and_resumes_f32_and_bf16").is_none() {
        return;
    }
    let ws = Workspace::new();
    let mut first_val = Vec::new();
    for dtype in ["f32", "bf16"] {
        let cfg = gpu_workspace_config(
            &ws,
            dtype,
            60,
            &format!("dtype = \"{dtype}\"\noptimizer = \"adopt\""),
        );
        let cfg = cfg.to_str().unwrap();
        let full = ws.path(&format!("{dtype}-full"));
        ok(&ws.train(&["--config", cfg, "--out", full.to_str().unwrap()]));
        let vals = val_losses(&full);
        eprintln!("{dtype}: validation losses {vals:?}");
        assert!(
            (vals[0] - 256f64.ln()).abs() < 0.1,
            "{dtype}: initial loss {} is not ≈ ln 256",
            vals[0]
        );
        assert!(
            *vals.last().unwrap() < vals[0] - 1.5,
            "{dtype}: loss did not fall: {vals:?}"
        );
        first_val.push(vals[0]);

        // 30 steps, stop, resume to 60: the same losses as the uninterrupted run.
        let split = ws.path(&format!("{dtype}-split"));
        let split_s = split.to_str().unwrap();
        ok(&ws.train(&["--config", cfg, "--out", split_s, "--set", "max_steps=30"]));
        ok(&ws.train(&["--resume", split_s, "--set", "max_steps=60"]));
        let (a, b) = (train_losses(&full), train_losses(&split));
        assert_eq!(a.len(), b.len());
        let mut bitwise = true;
        for ((step, x), (_, y)) in a.iter().zip(&b) {
            bitwise &= x.to_bits() == y.to_bits();
            assert!(
                (x - y).abs() <= 1e-5 * x.abs(),
                "{dtype} step {step}: uninterrupted {x}, resumed {y}"
            );
        }
        eprintln!("{dtype}: resumed run equals the uninterrupted one (bitwise: {bitwise})");
    }
    // Same initial weights and windows: bf16 autocast changes the first loss only by rounding.
    assert!(
        (first_val[0] - first_val[1]).abs() < 0.02,
        "f32 {} vs bf16 {}",
        first_val[0],
        first_val[1]
    );
}

#[test]
fn sample_and_bench_run_on_cuda() {
    if cuda("sample_and_bench_run_on_cuda").is_none() {
        return;
    }
    let ws = Workspace::new();
    let cfg = gpu_workspace_config(&ws, "s", 10, "");
    let run = ws.path("s-run");
    ok(&ws.train(&[
        "--config",
        cfg.to_str().unwrap(),
        "--out",
        run.to_str().unwrap(),
    ]));
    let out = ok(&common::bin()
        .args(["sample", run.to_str().unwrap(), "--max-new-tokens", "20"])
        .args(["--device", "cuda"])
        .output()
        .unwrap());
    assert!(!out.trim().is_empty());
    let out = ok(&common::bin()
        .args([
            "bench", "--preset", "tiny", "--steps", "3", "--device", "cuda",
        ])
        .args(["--dtype", "bf16", "--json"])
        .output()
        .unwrap());
    let last: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert!(last["tokens_per_s"].as_f64().unwrap() > 0.0, "{out}");
    assert!(last["mfu"].as_f64().unwrap() > 0.0, "{out}");
}

/// Reference: softmax(scale·x + causal mask) in f64 on the CPU with candle ops, and the gradient
/// of Σ y ⊙ r with respect to x.
fn causal_softmax_reference(
    x: &[f64],
    dims: &[usize],
    r: &[f64],
    scale: f64,
) -> (Vec<f64>, Vec<f64>) {
    let (tq, tk) = (dims[dims.len() - 2], dims[dims.len() - 1]);
    let mask: Vec<f64> = (0..tq * tk)
        .map(|k| {
            if k % tk > k / tk + tk - tq {
                f64::NEG_INFINITY
            } else {
                0.0
            }
        })
        .collect();
    let mask = Tensor::from_vec(mask, (tq, tk), &Device::Cpu).unwrap();
    let xv = Var::from_tensor(&Tensor::from_slice(x, dims, &Device::Cpu).unwrap()).unwrap();
    let scores = (xv.as_tensor() * scale)
        .unwrap()
        .broadcast_add(&mask)
        .unwrap();
    let max = scores.max_keepdim(candle_core::D::Minus1).unwrap().detach();
    let e = scores.broadcast_sub(&max).unwrap().exp().unwrap();
    let y = e
        .broadcast_div(&e.sum_keepdim(candle_core::D::Minus1).unwrap())
        .unwrap();
    let r = Tensor::from_slice(r, dims, &Device::Cpu).unwrap();
    let grads = y.mul(&r).unwrap().sum_all().unwrap().backward().unwrap();
    let dx = grads.get(xv.as_tensor()).unwrap();
    (
        y.flatten_all().unwrap().to_vec1().unwrap(),
        dx.flatten_all().unwrap().to_vec1().unwrap(),
    )
}

#[test]
fn fused_causal_softmax_matches_f64_reference() {
    let Some(gpu) = cuda("fused_causal_softmax_matches_f64_reference") else {
        return;
    };
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let normal = Normal::new(0.0f64, 2.0).unwrap();
    // Square (the model's case), Tq < Tk, and a row longer than a warp's 32 lanes many times.
    let shapes: [&[usize]; 3] = [&[2, 3, 5, 5], &[2, 3, 4, 7], &[2, 4, 300, 300]];
    for dims in shapes {
        let n: usize = dims.iter().product();
        let x: Vec<f64> = (0..n).map(|_| normal.sample(&mut rng)).collect();
        let r: Vec<f64> = (0..n).map(|_| normal.sample(&mut rng)).collect();
        let scale = 0.125;
        let (y_ref, dx_ref) = causal_softmax_reference(&x, dims, &r, scale);
        for (dtype, tolerance) in [(DType::F32, 2e-6), (DType::BF16, 2e-2)] {
            let xv = Var::from_tensor(
                &Tensor::from_slice(&x, dims, &gpu)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap(),
            )
            .unwrap();
            let y =
                gpt_pretrain::ops::softmax::fused_causal_softmax(xv.as_tensor(), scale).unwrap();
            assert_eq!(y.dtype(), dtype);
            let rt = Tensor::from_slice(&r, dims, &gpu)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let grads = y.mul(&rt).unwrap().sum_all().unwrap().backward().unwrap();
            let dx = grads.get(xv.as_tensor()).unwrap();
            // bf16 inputs are rounded before the kernel sees them: compare against the
            // reference on those rounded values' scale (outputs ≤ 1, gradients ≤ a few).
            for (what, ours, reference) in [
                ("y", as_f64_vec(&y), &y_ref),
                ("dx", as_f64_vec(dx), &dx_ref),
            ] {
                let worst = ours
                    .iter()
                    .zip(reference.iter())
                    .map(|(a, b)| (a - b).abs() / b.abs().max(1.0))
                    .fold(0.0, f64::max);
                assert!(
                    worst < tolerance,
                    "{dims:?} {dtype:?} {what}: error {worst:e}"
                );
            }
        }
    }
}

#[test]
fn gradient_norm_on_cuda_matches_the_cpu() {
    let Some(gpu) = cuda("gradient_norm_on_cuda_matches_the_cpu") else {
        return;
    };
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let normal = Normal::new(0.0f32, 1.0).unwrap();
    // Larger than the kernel's 1024 blocks × 256 threads, and tiny.
    for n in [3usize, 1000, 1 << 20, 3_000_001] {
        let x: Vec<f32> = (0..n).map(|_| normal.sample(&mut rng)).collect();
        let exact: f64 = x.iter().map(|&v| (v as f64) * (v as f64)).sum();
        let t = Tensor::from_slice(&x, n, &gpu).unwrap();
        let ours = gpt_pretrain::ops::grad_norm::sum_of_squares_on_device(&t)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert!(
            (ours - exact).abs() <= 1e-12 * exact,
            "n={n}: {ours} vs {exact}"
        );
    }
}

/// Largest |a − b| / max(|b|, 1).
fn worst_error(ours: &[f64], reference: &[f64]) -> f64 {
    assert_eq!(ours.len(), reference.len());
    ours.iter()
        .zip(reference)
        .map(|(a, b)| (a - b).abs() / b.abs().max(1.0))
        .fold(0.0, f64::max)
}

#[test]
fn fused_gelu_on_cuda_matches_f64_reference() {
    let Some(gpu) = cuda("fused_gelu_on_cuda_matches_f64_reference") else {
        return;
    };
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let normal = Normal::new(0.0f64, 3.0).unwrap();
    let n = 70_001;
    let x: Vec<f64> = (0..n).map(|_| normal.sample(&mut rng)).collect();
    let r: Vec<f64> = (0..n).map(|_| normal.sample(&mut rng)).collect();
    let xr = Var::from_tensor(&Tensor::from_slice(&x, n, &Device::Cpu).unwrap()).unwrap();
    let yr = gpt_pretrain::ops::gelu::gelu_tanh_ops(xr.as_tensor()).unwrap();
    let rr = Tensor::from_slice(&r, n, &Device::Cpu).unwrap();
    let gr = yr.mul(&rr).unwrap().sum_all().unwrap().backward().unwrap();
    let (y_ref, dx_ref) = (as_f64_vec(&yr), as_f64_vec(gr.get(xr.as_tensor()).unwrap()));
    for (dtype, tolerance) in [(DType::F32, 1e-5), (DType::BF16, 3e-2)] {
        let xv = Var::from_tensor(
            &Tensor::from_slice(&x, n, &gpu)
                .unwrap()
                .to_dtype(dtype)
                .unwrap(),
        )
        .unwrap();
        assert!(gpt_pretrain::ops::gelu::fused_gelu_applies(xv.as_tensor()));
        let y = gpt_pretrain::ops::gelu::fused_gelu_tanh(xv.as_tensor()).unwrap();
        let rt = Tensor::from_slice(&r, n, &gpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let g = y.mul(&rt).unwrap().sum_all().unwrap().backward().unwrap();
        let dx = g.get(xv.as_tensor()).unwrap();
        let ey = worst_error(&as_f64_vec(&y), &y_ref);
        // bf16: x itself is rounded to 8 bits of mantissa before the kernel sees it, and r too.
        let edx = worst_error(&as_f64_vec(dx), &dx_ref);
        assert!(ey < tolerance, "{dtype:?} gelu: {ey:e}");
        assert!(edx < tolerance * 4.0, "{dtype:?} gelu grad: {edx:e}");
    }
}

#[test]
fn fused_layer_norm_on_cuda_matches_f64_reference() {
    let Some(gpu) = cuda("fused_layer_norm_on_cuda_matches_f64_reference") else {
        return;
    };
    let mut rng = ChaCha8Rng::seed_from_u64(13);
    let normal = Normal::new(0.0f64, 1.0).unwrap();
    // Rows not a multiple of the 64-row chunks; a width not a multiple of 32 lanes.
    for (rows, c, bias) in [(1000usize, 768usize, true), (37, 50, false)] {
        let draw = |n: usize, rng: &mut ChaCha8Rng| -> Vec<f64> {
            (0..n).map(|_| normal.sample(rng)).collect()
        };
        let x: Vec<f64> = draw(rows * c, &mut rng)
            .iter()
            .map(|v| 3.0 * v + 0.5)
            .collect();
        let w = draw(c, &mut rng);
        let b = draw(c, &mut rng);
        let r = draw(rows * c, &mut rng);
        // f64 reference with candle ops on the CPU.
        let cpu = |v: &[f64], shape: &[usize]| {
            Var::from_tensor(&Tensor::from_slice(v, shape, &Device::Cpu).unwrap()).unwrap()
        };
        let (xr, wr, br) = (cpu(&x, &[rows, c]), cpu(&w, &[c]), cpu(&b, &[c]));
        let xt = xr.as_tensor();
        let mean = xt.mean_keepdim(1).unwrap();
        let centered = xt.broadcast_sub(&mean).unwrap();
        let var = centered.sqr().unwrap().mean_keepdim(1).unwrap();
        let normed = centered
            .broadcast_div(&(var + 1e-5).unwrap().sqrt().unwrap())
            .unwrap();
        let mut yr = normed.broadcast_mul(wr.as_tensor()).unwrap();
        if bias {
            yr = yr.broadcast_add(br.as_tensor()).unwrap();
        }
        let rr = Tensor::from_slice(&r, (rows, c), &Device::Cpu).unwrap();
        let gr = yr.mul(&rr).unwrap().sum_all().unwrap().backward().unwrap();

        let gpu_var = |v: &[f64], shape: &[usize]| {
            Var::from_tensor(
                &Tensor::from_slice(v, shape, &gpu)
                    .unwrap()
                    .to_dtype(DType::F32)
                    .unwrap(),
            )
            .unwrap()
        };
        let (xg, wg, bg) = (
            gpu_var(&x, &[rows, c]),
            gpu_var(&w, &[c]),
            gpu_var(&b, &[c]),
        );
        assert!(gpt_pretrain::ops::layer_norm::fused_layer_norm_applies(
            xg.as_tensor(),
            wg.as_tensor()
        ));
        let y = gpt_pretrain::ops::layer_norm::fused_layer_norm(
            xg.as_tensor(),
            wg.as_tensor(),
            bias.then(|| bg.as_tensor()),
            1e-5,
        )
        .unwrap();
        let rt = Tensor::from_slice(&r, (rows, c), &gpu)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        let g = y.mul(&rt).unwrap().sum_all().unwrap().backward().unwrap();
        let mut pairs = vec![
            ("y", as_f64_vec(&y), as_f64_vec(&yr)),
            (
                "dx",
                as_f64_vec(g.get(xg.as_tensor()).unwrap()),
                as_f64_vec(gr.get(xr.as_tensor()).unwrap()),
            ),
            (
                "dw",
                as_f64_vec(g.get(wg.as_tensor()).unwrap()),
                as_f64_vec(gr.get(wr.as_tensor()).unwrap()),
            ),
        ];
        if bias {
            pairs.push((
                "db",
                as_f64_vec(g.get(bg.as_tensor()).unwrap()),
                as_f64_vec(gr.get(br.as_tensor()).unwrap()),
            ));
        }
        for (what, ours, reference) in pairs {
            // dw and db sum over up to 1000 rows in f32.
            let e = worst_error(&ours, &reference);
            assert!(e < 5e-5, "rows {rows} width {c} {what}: {e:e}");
        }
    }
}

#[test]
fn fused_cross_entropy_on_cuda_matches_f64_reference() {
    let Some(gpu) = cuda("fused_cross_entropy_on_cuda_matches_f64_reference") else {
        return;
    };
    let mut rng = ChaCha8Rng::seed_from_u64(17);
    let normal = Normal::new(0.0f64, 2.0).unwrap();
    // GPT-2's padded vocabulary, and a row shorter than a block's 256 threads.
    for (n, v) in [(64usize, 50304usize), (33, 100)] {
        let x: Vec<f64> = (0..n * v).map(|_| normal.sample(&mut rng)).collect();
        let targets: Vec<u32> = (0..n).map(|i| ((i * 7919) % v) as u32).collect();
        let xr = Var::from_tensor(&Tensor::from_slice(&x, (n, v), &Device::Cpu).unwrap()).unwrap();
        let tr = Tensor::from_slice(&targets, n, &Device::Cpu).unwrap();
        let loss_ref =
            gpt_pretrain::ops::cross_entropy::cross_entropy_ops(xr.as_tensor(), &tr).unwrap();
        // An upstream gradient other than 1 must scale the result.
        let g_ref = (&loss_ref * 3.0).unwrap().backward().unwrap();
        let loss_ref = loss_ref.to_scalar::<f64>().unwrap();
        let dx_ref = as_f64_vec(g_ref.get(xr.as_tensor()).unwrap());
        for (dtype, tolerance) in [(DType::F32, 1e-5), (DType::BF16, 2e-2)] {
            let xv = Var::from_tensor(
                &Tensor::from_slice(&x, (n, v), &gpu)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap(),
            )
            .unwrap();
            let t = Tensor::from_slice(&targets, n, &gpu).unwrap();
            assert!(gpt_pretrain::ops::cross_entropy::fused_cross_entropy_applies(xv.as_tensor()));
            let loss =
                gpt_pretrain::ops::cross_entropy::fused_cross_entropy(xv.as_tensor(), &t).unwrap();
            let g = (&loss * 3.0).unwrap().backward().unwrap();
            let ours = loss
                .to_dtype(DType::F64)
                .unwrap()
                .to_scalar::<f64>()
                .unwrap();
            assert!(
                (ours - loss_ref).abs() < tolerance * loss_ref.abs(),
                "{n}x{v} {dtype:?}: loss {ours} vs {loss_ref}"
            );
            // Gradients are ~1/(n·v) per element: compare on the scale of the largest.
            let dx = as_f64_vec(g.get(xv.as_tensor()).unwrap());
            let scale = dx_ref.iter().fold(0f64, |m, x| m.max(x.abs()));
            let worst = dx
                .iter()
                .zip(&dx_ref)
                .map(|(a, b)| (a - b).abs() / scale)
                .fold(0.0, f64::max);
            assert!(worst < tolerance, "{n}x{v} {dtype:?} gradient: {worst:e}");
        }
    }
}
