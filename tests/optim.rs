//! The optimizers against independent f64 references written straight from the formulas in
//! `src/optim` (PyTorch's Adam/AdamW and the ADOPT reference), plus hand-derived first steps.

use candle_core::{DType, Device, Tensor, Var};
use gpt_pretrain::optim::{
    param_groups, Adam, AdamConfig, Adopt, AdoptConfig, AdoptVariant, Optimizer, OptimizerKind,
    Param,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// One parameter tensor as plain f64 values.
#[derive(Clone, Debug)]
struct RefParam {
    theta: Vec<f64>,
    m: Vec<f64>,
    v: Vec<f64>,
    weight_decay: f64,
}

impl RefParam {
    fn new(theta: Vec<f64>, weight_decay: f64) -> Self {
        let n = theta.len();
        Self {
            theta,
            m: vec![0.0; n],
            v: vec![0.0; n],
            weight_decay,
        }
    }
}

/// Adam / AdamW at step t (1-based), written as the textbook formula.
#[allow(clippy::too_many_arguments, clippy::needless_range_loop)]
fn reference_adam(
    p: &mut RefParam,
    g: &[f64],
    t: i32,
    lr: f64,
    b1: f64,
    b2: f64,
    eps: f64,
    decoupled: bool,
) {
    let wd = p.weight_decay;
    for i in 0..g.len() {
        let mut gi = g[i];
        if decoupled {
            p.theta[i] *= 1.0 - lr * wd;
        } else {
            gi += wd * p.theta[i];
        }
        p.m[i] = b1 * p.m[i] + (1.0 - b1) * gi;
        p.v[i] = b2 * p.v[i] + (1.0 - b2) * gi * gi;
        let m_hat = p.m[i] / (1.0 - b1.powi(t));
        let v_hat = p.v[i] / (1.0 - b2.powi(t));
        p.theta[i] -= lr * m_hat / (v_hat.sqrt() + eps);
    }
}

/// ADOPT with its step counter s (0 before the first call).
#[allow(clippy::too_many_arguments, clippy::needless_range_loop)]
fn reference_adopt(
    p: &mut RefParam,
    g: &[f64],
    s: u64,
    lr: f64,
    b1: f64,
    b2: f64,
    eps: f64,
    decouple: bool,
    clip_exponent: Option<f64>,
) {
    let wd = p.weight_decay;
    for i in 0..g.len() {
        let mut gi = g[i];
        if wd != 0.0 && !decouple {
            gi += wd * p.theta[i];
        }
        if s == 0 {
            p.v[i] = gi * gi;
            continue;
        }
        if wd != 0.0 && decouple {
            p.theta[i] *= 1.0 - lr * wd;
        }
        let mut normed = gi / p.v[i].sqrt().max(eps);
        if let Some(c) = clip_exponent {
            let clip = (s as f64).powf(c);
            normed = normed.clamp(-clip, clip);
        }
        p.m[i] = b1 * p.m[i] + (1.0 - b1) * normed;
        p.theta[i] -= lr * p.m[i];
        p.v[i] = b2 * p.v[i] + (1.0 - b2) * gi * gi;
    }
}

/// The original ADOPT (6e94fbc): s counted from 1, weight decay first, m ← ĝ at s = 2, no clip.
#[allow(clippy::too_many_arguments, clippy::needless_range_loop)]
fn reference_adopt_original(
    p: &mut RefParam,
    g: &[f64],
    s: u64,
    lr: f64,
    b1: f64,
    b2: f64,
    eps: f64,
    decouple: bool,
) {
    let wd = p.weight_decay;
    for i in 0..g.len() {
        let mut gi = g[i];
        if wd != 0.0 {
            if decouple {
                p.theta[i] -= lr * wd * p.theta[i];
            } else {
                gi += wd * p.theta[i];
            }
        }
        if s == 1 {
            p.v[i] = gi * gi;
            continue;
        }
        let normed = gi / p.v[i].sqrt().max(eps);
        p.m[i] = if s == 2 {
            normed
        } else {
            b1 * p.m[i] + (1.0 - b1) * normed
        };
        p.theta[i] -= lr * p.m[i];
        p.v[i] = b2 * p.v[i] + (1.0 - b2) * gi * gi;
    }
}

/// Runs gradients through one of our optimizers: the gradient of `sum(θ ⊙ G)` is exactly G.
struct Harness {
    vars: Vec<(String, Var)>,
}

impl Harness {
    fn new(values: &[(&str, Vec<usize>, Vec<f64>)], dtype: DType) -> Self {
        let vars = values
            .iter()
            .map(|(name, shape, v)| {
                let t = Tensor::from_vec(v.clone(), shape.as_slice(), &Device::Cpu)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap();
                (name.to_string(), Var::from_tensor(&t).unwrap())
            })
            .collect();
        Self { vars }
    }

    fn values(&self) -> Vec<Vec<f64>> {
        self.vars
            .iter()
            .map(|(_, v)| {
                v.as_tensor()
                    .to_dtype(DType::F64)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap()
            })
            .collect()
    }

    fn step(&self, opt: &mut dyn Optimizer, grads: &[Vec<f64>], lr: f64) {
        let mut loss = Tensor::new(0.0, &Device::Cpu)
            .unwrap()
            .to_dtype(self.vars[0].1.dtype())
            .unwrap();
        for ((_, var), g) in self.vars.iter().zip(grads) {
            let g = Tensor::from_vec(g.clone(), var.shape(), &Device::Cpu)
                .unwrap()
                .to_dtype(var.dtype())
                .unwrap();
            loss = (loss + var.as_tensor().mul(&g).unwrap().sum_all().unwrap()).unwrap();
        }
        let store = loss.backward().unwrap();
        opt.update(&store, lr).unwrap();
    }
}

/// Either optimizer family under test.
#[derive(Clone, Debug)]
enum Case {
    Adam(AdamConfig, bool),
    Adopt(AdoptConfig, bool),
}

fn initial() -> Vec<(&'static str, Vec<usize>, Vec<f64>)> {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let mut draw = |n: usize| {
        (0..n)
            .map(|_| rng.random_range(-1.0..1.0))
            .collect::<Vec<f64>>()
    };
    vec![("b", vec![4], draw(4)), ("w", vec![3, 4], draw(12))]
}

/// Step-t gradients: a quadratic loss ½·Σ a_i(θ_i − c_i)² (so they depend on θ) plus noise, with a
/// spike at step 6 that makes ADOPT's clipping bite.
fn gradients(theta: &[Vec<f64>], t: usize, rng: &mut ChaCha8Rng) -> Vec<Vec<f64>> {
    theta
        .iter()
        .map(|th| {
            th.iter()
                .enumerate()
                .map(|(i, &x)| {
                    let a = 0.5 + i as f64 * 0.25;
                    let c = (i as f64 * 0.7).sin();
                    let noise: f64 = rng.random_range(-0.3..0.3);
                    let spike = if t == 6 && i % 3 == 0 { 50.0 } else { 1.0 };
                    (a * (x - c) + noise) * spike
                })
                .collect()
        })
        .collect()
}

/// Runs `steps` steps of `case` in `dtype` and of the f64 reference, side by side (each on its
/// own parameters), and returns the largest relative difference over all steps.
fn max_relative_error(case: &Case, dtype: DType, steps: usize, fused: bool) -> f64 {
    let init = initial();
    let harness = Harness::new(&init, dtype);
    let (wd, decay_1d) = match case {
        Case::Adam(c, d) => (c.weight_decay, *d),
        Case::Adopt(c, d) => (c.weight_decay, *d),
    };
    let params: Vec<Param> = param_groups(&harness.vars, wd, decay_1d);
    let mut reference: Vec<RefParam> = init
        .iter()
        .zip(&params)
        .map(|((_, _, v), p)| RefParam::new(v.clone(), p.weight_decay))
        .collect();
    let mut opt: Box<dyn Optimizer> = match case {
        Case::Adam(c, _) => {
            let mut o = Adam::with_params(params, c.clone()).unwrap();
            o.set_fused(fused).unwrap();
            Box::new(o)
        }
        Case::Adopt(c, _) => {
            let mut o = Adopt::with_params(params, c.clone()).unwrap();
            o.set_fused(fused).unwrap();
            Box::new(o)
        }
    };
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let mut worst: f64 = 0.0;
    for t in 1..=steps {
        let theta: Vec<Vec<f64>> = reference.iter().map(|p| p.theta.clone()).collect();
        let g = gradients(&theta, t, &mut rng);
        let base_lr = match case {
            Case::Adam(c, _) => c.lr,
            Case::Adopt(c, _) => c.lr,
        };
        // A different learning rate every step: the optimizer must use the one it is given.
        let lr = base_lr * (1.0 + 0.1 * t as f64);
        for (p, gi) in reference.iter_mut().zip(&g) {
            match case {
                Case::Adam(c, _) => {
                    reference_adam(p, gi, t as i32, lr, c.beta1, c.beta2, c.eps, c.decoupled)
                }
                Case::Adopt(c, _) if c.variant == AdoptVariant::Original => {
                    reference_adopt_original(
                        p, gi, t as u64, lr, c.beta1, c.beta2, c.eps, c.decouple,
                    )
                }
                Case::Adopt(c, _) => reference_adopt(
                    p,
                    gi,
                    t as u64 - 1,
                    lr,
                    c.beta1,
                    c.beta2,
                    c.eps,
                    c.decouple,
                    c.clip_exponent,
                ),
            }
        }
        // Feed our optimizer the same gradients (computed from the reference θ, so an error
        // does not compound through the quadratic).
        harness.step(opt.as_mut(), &g, lr);
        for (ours, theirs) in harness.values().iter().zip(&reference) {
            for (a, b) in ours.iter().zip(&theirs.theta) {
                let rel = (a - b).abs() / b.abs().max(1e-3);
                worst = worst.max(rel);
            }
        }
    }
    assert_eq!(opt.steps_taken(), steps as u64);
    worst
}

fn all_cases() -> Vec<(&'static str, Case)> {
    let adam = AdamConfig::defaults(OptimizerKind::Adam);
    let adamw = AdamConfig::defaults(OptimizerKind::AdamW);
    let adopt = AdoptConfig::default();
    let original = AdoptConfig {
        variant: AdoptVariant::Original,
        clip_exponent: None,
        ..adopt.clone()
    };
    vec![
        ("adam defaults", Case::Adam(adam.clone(), false)),
        (
            "adam l2 0.1",
            Case::Adam(
                AdamConfig {
                    weight_decay: 0.1,
                    lr: 1e-2,
                    ..adam.clone()
                },
                false,
            ),
        ),
        (
            "adam l2 0.1 on 1-d too",
            Case::Adam(
                AdamConfig {
                    weight_decay: 0.1,
                    ..adam.clone()
                },
                true,
            ),
        ),
        (
            "adam betas 0.8 0.95",
            Case::Adam(
                AdamConfig {
                    beta1: 0.8,
                    beta2: 0.95,
                    eps: 1e-6,
                    ..adam
                },
                false,
            ),
        ),
        ("adamw defaults", Case::Adam(adamw.clone(), false)),
        (
            "adamw 0.1 lr 1e-2",
            Case::Adam(
                AdamConfig {
                    weight_decay: 0.1,
                    lr: 1e-2,
                    ..adamw
                },
                true,
            ),
        ),
        ("adopt defaults", Case::Adopt(adopt.clone(), false)),
        (
            "adopt no clipping",
            Case::Adopt(
                AdoptConfig {
                    clip_exponent: None,
                    ..adopt.clone()
                },
                false,
            ),
        ),
        (
            "adopt coupled decay",
            Case::Adopt(
                AdoptConfig {
                    weight_decay: 0.1,
                    lr: 1e-2,
                    ..adopt.clone()
                },
                true,
            ),
        ),
        (
            "adopt decoupled decay",
            Case::Adopt(
                AdoptConfig {
                    weight_decay: 0.1,
                    decouple: true,
                    ..adopt.clone()
                },
                false,
            ),
        ),
        (
            "adopt beta1 0.5 clip 0.5",
            Case::Adopt(
                AdoptConfig {
                    beta1: 0.5,
                    clip_exponent: Some(0.5),
                    ..adopt
                },
                false,
            ),
        ),
        ("adopt original", Case::Adopt(original.clone(), false)),
        (
            "adopt original coupled decay",
            Case::Adopt(
                AdoptConfig {
                    weight_decay: 0.1,
                    lr: 1e-2,
                    ..original.clone()
                },
                true,
            ),
        ),
        (
            "adopt original decoupled decay",
            Case::Adopt(
                AdoptConfig {
                    weight_decay: 0.1,
                    decouple: true,
                    ..original
                },
                false,
            ),
        ),
    ]
}

#[test]
fn f64_matches_reference_within_1e_12() {
    for fused in [true, false] {
        for (name, case) in all_cases() {
            let err = max_relative_error(&case, DType::F64, 12, fused);
            assert!(
                err < 1e-12,
                "{name} (fused {fused}): relative error {err:e}"
            );
        }
    }
}

#[test]
fn f32_matches_reference_within_1e_5() {
    for fused in [true, false] {
        for (name, case) in all_cases() {
            let err = max_relative_error(&case, DType::F32, 12, fused);
            assert!(err < 1e-5, "{name} (fused {fused}): relative error {err:e}");
        }
    }
}

fn single(value: f64) -> Harness {
    Harness::new(&[("x", vec![1], vec![value])], DType::F64)
}

#[test]
fn adam_first_step_moves_by_lr_times_sign() {
    // m̂ = g and v̂ = g² at t = 1, so the step is lr·g/(|g| + eps).
    let h = single(1.0);
    let params = param_groups(&h.vars, 0.0, false);
    let mut adam = Adam::with_params(params, AdamConfig::defaults(OptimizerKind::Adam)).unwrap();
    h.step(&mut adam, &[vec![2.0]], 0.1);
    let expected = 1.0 - 0.1 * 2.0 / (2.0 + 1e-8);
    assert!((h.values()[0][0] - expected).abs() < 1e-15);
}

#[test]
fn adamw_decays_before_the_update_and_adam_adds_l2() {
    // Zero gradient: AdamW only shrinks θ by (1 − lr·λ); the Adam update of m = 0 is 0.
    let h = single(2.0);
    let params = vec![Param {
        name: "x".into(),
        var: h.vars[0].1.clone(),
        weight_decay: 0.5,
    }];
    let mut adamw = Adam::with_params(params, AdamConfig::defaults(OptimizerKind::AdamW)).unwrap();
    h.step(&mut adamw, &[vec![0.0]], 0.1);
    assert!((h.values()[0][0] - 2.0 * (1.0 - 0.1 * 0.5)).abs() < 1e-15);
    // Adam with L2: g = 0 + λθ = 1, so the first step is lr·1/(1 + eps).
    let h = single(2.0);
    let params = vec![Param {
        name: "x".into(),
        var: h.vars[0].1.clone(),
        weight_decay: 0.5,
    }];
    let mut adam = Adam::with_params(params, AdamConfig::defaults(OptimizerKind::Adam)).unwrap();
    h.step(&mut adam, &[vec![0.0]], 0.1);
    assert!((h.values()[0][0] - (2.0 - 0.1 / (1.0 + 1e-8))).abs() < 1e-15);
}

#[test]
fn adopt_first_steps_by_hand() {
    let h = single(1.0);
    let params = param_groups(&h.vars, 0.0, false);
    let mut adopt = Adopt::with_params(params, AdoptConfig::default()).unwrap();
    let lr = 0.1;
    // s = 0: only v ← g² = 4; θ stays.
    h.step(&mut adopt, &[vec![2.0]], lr);
    assert_eq!(h.values()[0][0], 1.0);
    // s = 1: ĝ = 3/sqrt(4) = 1.5, clipped to 1^0.25 = 1; m = 0.1; θ = 1 − 0.1·0.1.
    h.step(&mut adopt, &[vec![3.0]], lr);
    let theta2 = 1.0 - 0.1 * 0.1;
    assert!((h.values()[0][0] - theta2).abs() < 1e-15);
    // v = 0.9999·4 + 0.0001·9; s = 2: ĝ = −1/sqrt(v) (inside ±2^0.25); m = 0.9·0.1 + 0.1·ĝ.
    h.step(&mut adopt, &[vec![-1.0]], lr);
    let v: f64 = 0.9999 * 4.0 + 0.0001 * 9.0;
    let m = 0.9 * 0.1 + 0.1 * (-1.0 / v.sqrt());
    assert!((h.values()[0][0] - (theta2 - lr * m)).abs() < 1e-15);
    let state = adopt.state_tensors().unwrap();
    let step: Vec<i64> = state["step.x"].to_vec1().unwrap();
    assert_eq!(step, vec![3]);
}

#[test]
fn adopt_eps_is_a_floor_not_an_addend() {
    // v = (2e-6)² after the first step, so sqrt(v) = 2e-6 > eps = 1e-6: the floor leaves it alone
    // and ĝ = 1e-6 / 2e-6 = 0.5 (an additive eps would give 1e-6 / 3e-6 = 1/3).
    let h = single(0.0);
    let params = param_groups(&h.vars, 0.0, false);
    let mut adopt = Adopt::with_params(
        params,
        AdoptConfig {
            clip_exponent: None,
            ..Default::default()
        },
    )
    .unwrap();
    h.step(&mut adopt, &[vec![2e-6]], 1.0);
    h.step(&mut adopt, &[vec![1e-6]], 1.0);
    // m = 0.1·0.5; θ = −lr·m.
    assert!(
        (h.values()[0][0] + 0.05).abs() < 1e-12,
        "{}",
        h.values()[0][0]
    );
    // Below the floor: v = 0 after a zero gradient, so ĝ = g / eps.
    let h = single(0.0);
    let params = param_groups(&h.vars, 0.0, false);
    let mut adopt = Adopt::with_params(
        params,
        AdoptConfig {
            clip_exponent: None,
            ..Default::default()
        },
    )
    .unwrap();
    h.step(&mut adopt, &[vec![0.0]], 1.0);
    h.step(&mut adopt, &[vec![1e-7]], 1.0);
    assert!((h.values()[0][0] + 0.01).abs() < 1e-12);
}

#[test]
fn state_round_trip_continues_bitwise() {
    for (name, case) in all_cases() {
        let init = initial();
        let run = |split: Option<usize>| -> Vec<Vec<f64>> {
            let mut harness = Harness::new(&init, DType::F32);
            let make = |h: &Harness| -> Box<dyn Optimizer> {
                match &case {
                    Case::Adam(c, d) => Box::new(
                        Adam::with_params(param_groups(&h.vars, c.weight_decay, *d), c.clone())
                            .unwrap(),
                    ),
                    Case::Adopt(c, d) => Box::new(
                        Adopt::with_params(param_groups(&h.vars, c.weight_decay, *d), c.clone())
                            .unwrap(),
                    ),
                }
            };
            let mut opt = make(&harness);
            let mut rng = ChaCha8Rng::seed_from_u64(5);
            for t in 1..=10 {
                if split == Some(t) {
                    // Rebuild everything from saved values, as a resumed run does.
                    let state: std::collections::HashMap<_, _> =
                        opt.state_tensors().unwrap().into_iter().collect();
                    let values = harness.values();
                    let snapshot: Vec<_> = init
                        .iter()
                        .zip(values)
                        .map(|((n, s, _), v)| (*n, s.clone(), v))
                        .collect();
                    harness = Harness::new(&snapshot, DType::F32);
                    opt = make(&harness);
                    opt.load_state_tensors(&state).unwrap();
                }
                let g = gradients(&harness.values(), t, &mut rng);
                harness.step(opt.as_mut(), &g, 1e-2);
            }
            harness.values()
        };
        let whole = run(None);
        let resumed = run(Some(6));
        assert_eq!(whole, resumed, "{name}");
    }
}

#[test]
fn nanogpt_groups_decay_only_matrices() {
    let h = Harness::new(&initial(), DType::F32);
    let groups = param_groups(&h.vars, 0.1, false);
    let decay: Vec<(&str, f64)> = groups
        .iter()
        .map(|p| (p.name.as_str(), p.weight_decay))
        .collect();
    assert_eq!(decay, vec![("b", 0.0), ("w", 0.1)]);
    let all = param_groups(&h.vars, 0.1, true);
    assert!(all.iter().all(|p| p.weight_decay == 0.1));
}

#[test]
fn load_state_rejects_wrong_shapes_and_missing_tensors() {
    let h = Harness::new(&initial(), DType::F32);
    let mut adam = Adam::with_params(
        param_groups(&h.vars, 0.0, false),
        AdamConfig::defaults(OptimizerKind::Adam),
    )
    .unwrap();
    let mut state: std::collections::HashMap<_, _> =
        adam.state_tensors().unwrap().into_iter().collect();
    state.insert(
        "exp_avg.w".into(),
        Tensor::zeros((4, 3), DType::F32, &Device::Cpu).unwrap(),
    );
    let err = adam.load_state_tensors(&state).unwrap_err().to_string();
    assert!(err.contains("exp_avg.w") && err.contains("shape"), "{err}");
    state.remove("exp_avg.w");
    assert!(adam.load_state_tensors(&state).is_err());
}

#[test]
fn original_adopt_first_steps_by_hand() {
    let h = single(1.0);
    let cfg = AdoptConfig {
        variant: AdoptVariant::Original,
        clip_exponent: None,
        ..Default::default()
    };
    let mut adopt = Adopt::with_params(param_groups(&h.vars, 0.0, false), cfg).unwrap();
    let lr = 0.1;
    // s = 1: v ← 4 only.
    h.step(&mut adopt, &[vec![2.0]], lr);
    assert_eq!(h.values()[0][0], 1.0);
    // s = 2: m ← 3/2 with no (1−β1) factor and no clipping; θ = 1 − 0.1·1.5.
    h.step(&mut adopt, &[vec![3.0]], lr);
    assert!(
        (h.values()[0][0] - 0.85).abs() < 1e-15,
        "{}",
        h.values()[0][0]
    );
    // s = 3: m = 0.9·1.5 + 0.1·(−1/sqrt(v)), v = 0.9999·4 + 0.0001·9.
    h.step(&mut adopt, &[vec![-1.0]], lr);
    let v: f64 = 0.9999 * 4.0 + 0.0001 * 9.0;
    let m = 0.9 * 1.5 + 0.1 * (-1.0 / v.sqrt());
    assert!((h.values()[0][0] - (0.85 - lr * m)).abs() < 1e-15);
    // Clipping is refused for the original variant.
    let h = single(1.0);
    let clipped = AdoptConfig {
        variant: AdoptVariant::Original,
        ..Default::default()
    };
    assert!(Adopt::with_params(param_groups(&h.vars, 0.0, false), clipped).is_err());
}

#[test]
fn original_adopt_decays_before_its_first_step() {
    // Decoupled decay comes first in the original, so even the v-only first step shrinks θ.
    let h = single(2.0);
    let cfg = AdoptConfig {
        variant: AdoptVariant::Original,
        clip_exponent: None,
        decouple: true,
        ..Default::default()
    };
    let params = vec![Param {
        name: "x".into(),
        var: h.vars[0].1.clone(),
        weight_decay: 0.5,
    }];
    let mut adopt = Adopt::with_params(params, cfg).unwrap();
    h.step(&mut adopt, &[vec![1.0]], 0.1);
    assert!((h.values()[0][0] - (2.0 - 0.1 * 0.5 * 2.0)).abs() < 1e-15);
}

#[test]
fn fused_kernel_matches_tensor_ops_on_large_tensors() {
    // Large enough for the parallel chunked path, with both the decay and clipping branches active.
    let n = 200_003;
    let mut rng = ChaCha8Rng::seed_from_u64(8);
    let init: Vec<f64> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
    let grads: Vec<Vec<f64>> = (0..4)
        .map(|_| (0..n).map(|_| rng.random_range(-1.0..1.0)).collect())
        .collect();
    let run = |fused: bool, adopt: bool, dtype: DType| -> Vec<f64> {
        let h = Harness::new(&[("x", vec![n], init.clone())], dtype);
        let params = vec![Param {
            name: "x".into(),
            var: h.vars[0].1.clone(),
            weight_decay: 0.1,
        }];
        let mut opt: Box<dyn Optimizer> = if adopt {
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
        } else {
            let mut o =
                Adam::with_params(params, AdamConfig::defaults(OptimizerKind::AdamW)).unwrap();
            o.set_fused(fused).unwrap();
            Box::new(o)
        };
        for g in &grads {
            h.step(opt.as_mut(), std::slice::from_ref(g), 1e-2);
        }
        h.values()[0].clone()
    };
    for (dtype, tolerance) in [(DType::F64, 1e-12), (DType::F32, 1e-5)] {
        for adopt in [false, true] {
            let (a, b) = (run(true, adopt, dtype), run(false, adopt, dtype));
            let worst = a
                .iter()
                .zip(&b)
                .map(|(x, y)| (x - y).abs() / y.abs().max(1e-3))
                .fold(0.0, f64::max);
            assert!(
                worst < tolerance,
                "adopt {adopt} {dtype:?}: fused and tensor ops differ by {worst:e}"
            );
            let moved = a
                .iter()
                .zip(&init)
                .filter(|(x, y)| (*x - *y).abs() > 1e-4)
                .count();
            assert!(moved > n / 2, "the update did not reach every chunk");
        }
    }
}

#[test]
fn usable_as_a_candle_nn_optimizer() {
    use candle_nn::Optimizer as _;
    // Fit y = 3x − 1 with ADOPT through candle's own Optimizer API, as one would candle's AdamW.
    let w = Var::new(&[[0.0f32]], &Device::Cpu).unwrap();
    let b = Var::new(&[0.0f32], &Device::Cpu).unwrap();
    let xs = Tensor::new(&[[-1.0f32], [0.0], [1.0], [2.0]], &Device::Cpu).unwrap();
    let ys = Tensor::new(&[[-4.0f32], [-1.0], [2.0], [5.0]], &Device::Cpu).unwrap();
    let cfg = AdoptConfig {
        lr: 0.05,
        ..Default::default()
    };
    let mut opt = Adopt::new(vec![w.clone(), b.clone()], cfg).unwrap();
    for _ in 0..2000 {
        let pred = xs
            .matmul(w.as_tensor())
            .unwrap()
            .broadcast_add(b.as_tensor())
            .unwrap();
        let loss = (pred - &ys).unwrap().sqr().unwrap().mean_all().unwrap();
        opt.backward_step(&loss).unwrap();
    }
    opt.set_learning_rate(0.01);
    assert_eq!(opt.learning_rate(), 0.01);
    let w = w
        .as_tensor()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()[0];
    let b = b.as_tensor().to_vec1::<f32>().unwrap()[0];
    assert!(
        (w - 3.0).abs() < 0.05 && (b + 1.0).abs() < 0.05,
        "w {w}, b {b}"
    );
    // State is named by position.
    let state = gpt_pretrain::optim::Optimizer::state_tensors(&opt).unwrap();
    assert!(state.contains_key("exp_avg.0") && state.contains_key("exp_avg_sq.1"));
}

#[test]
fn tensor_op_state_keeps_no_backward_graph() {
    // Ops on a variable record a graph; state built from them would keep every earlier step's
    // tensors alive. Coupled decay reads θ, so it is the case that would leak.
    let h = Harness::new(&initial(), DType::F32);
    let mut adam = Adam::with_params(
        param_groups(&h.vars, 0.1, true),
        AdamConfig::defaults(OptimizerKind::Adam),
    )
    .unwrap();
    adam.set_fused(false).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    for t in 1..=3 {
        let g = gradients(&h.values(), t, &mut rng);
        h.step(&mut adam, &g, 1e-3);
    }
    for (name, t) in adam.state_tensors().unwrap() {
        assert!(!t.track_op(), "{name} keeps a backward graph");
    }
}
