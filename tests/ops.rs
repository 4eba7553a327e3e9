//! The fused ops against plain candle ops (values and gradients, f64 and f32), their edge cases,
//! and the numerics they rely on (the vectorized exp, row-ordered sums).

use candle_core::{DType, Device, Tensor, Var};
use gpt_pretrain::ops::cross_entropy::cross_entropy;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

mod common;
use common::{as_f64_vec, max_abs_diff};

/// The oneDNN paths are tested wherever the suite runs (CI installs libdnnl2); a machine without
/// the library fails here rather than skipping them silently. `GPT_PRETRAIN_ONEDNN=0` runs the
/// gemm fallbacks instead, on purpose.
fn require_onednn() -> bool {
    if std::env::var("GPT_PRETRAIN_ONEDNN").is_ok_and(|v| v == "0") {
        return false;
    }
    assert!(
        gpt_pretrain::ops::onednn::onednn().is_some(),
        "oneDNN is not loaded ({}); install it (apt-get install libdnnl2) or set GPT_PRETRAIN_ONEDNN=0",
        gpt_pretrain::ops::onednn::backend_description()
    );
    true
}

/// Whether bf16 matmuls run here: oneDNN is loaded (where oneDNN has no bf16 kernel for the CPU,
/// as oneDNN 2.x without AVX-512, the bf16 operands are widened to f32 for gemm, and these cases
/// check that route); when they do not, the bf16 cases are left out, saying so.
fn cpu_bf16() -> bool {
    let unavailable = gpt_pretrain::ops::onednn::bf16_matmuls_unavailable();
    if let Some(reason) = &unavailable {
        eprintln!("bf16 cases skipped: {reason}");
    }
    unavailable.is_none()
}

#[test]
fn fused_linear_matches_f64_ops_in_value_and_gradient() {
    use gpt_pretrain::ops::linear::{fused_linear, fused_linear_applies, Precision};
    if !require_onednn() {
        return;
    }
    let mut rng = ChaCha8Rng::seed_from_u64(77);
    // (rows, in, out): below one task's rows, uneven splits, and the `baby` MLP's shape.
    for (m, k, n, bias) in [
        (5, 3, 4, true),
        (131, 40, 70, false),
        (2048, 384, 1536, true),
    ] {
        let randoms = |len: usize, rng: &mut ChaCha8Rng| -> Vec<f64> {
            (0..len).map(|_| rng.random_range(-1.0..1.0)).collect()
        };
        let (xs, ws, bs, up) = (
            randoms(m * k, &mut rng),
            randoms(n * k, &mut rng),
            randoms(n, &mut rng),
            randoms(m * n, &mut rng),
        );
        let f64_tensor =
            |v: &[f64], shape: &[usize]| Tensor::from_slice(v, shape, &Device::Cpu).unwrap();
        let upstream = f64_tensor(&up, &[m, n]);
        let precisions = match cpu_bf16() {
            true => vec![Precision::F32, Precision::Bf16],
            false => vec![Precision::F32],
        };
        for precision in precisions {
            let var = |v: &[f64], shape: &[usize]| {
                Var::from_tensor(&f64_tensor(v, shape).to_dtype(DType::F32).unwrap()).unwrap()
            };
            let (x, w, b) = (var(&xs, &[m, k]), var(&ws, &[n, k]), var(&bs, &[n]));
            assert!(fused_linear_applies(x.as_tensor(), w.as_tensor()));
            let y = fused_linear(
                x.as_tensor(),
                w.as_tensor(),
                bias.then(|| b.as_tensor()),
                precision,
            )
            .unwrap();
            let grads = (y.to_dtype(DType::F64).unwrap() * &upstream)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            // The reference: f64 matmuls of the operands as the precision rounds them (bf16 by
            // candle's own conversion), the output gradient rounded likewise for dx and dW.
            let rounded = |t: &Tensor| match precision {
                Precision::F32 => t.to_dtype(DType::F64).unwrap(),
                Precision::Bf16 => t
                    .to_dtype(DType::BF16)
                    .unwrap()
                    .to_dtype(DType::F64)
                    .unwrap(),
            };
            let (rx, rw) = (rounded(x.as_tensor()), rounded(w.as_tensor()));
            let mut y_ref = rx.matmul(&rw.t().unwrap()).unwrap();
            if bias {
                y_ref = y_ref
                    .broadcast_add(&b.as_tensor().to_dtype(DType::F64).unwrap())
                    .unwrap();
            }
            let dy = rounded(&upstream.to_dtype(DType::F32).unwrap());
            let dx_ref = dy.matmul(&rw).unwrap();
            let dw_ref = dy.t().unwrap().matmul(&rx).unwrap();
            let db_ref = upstream.sum(0).unwrap();
            // f32 accumulation over k (or m) terms of size ≤ 1: a few f32 ulps of √k·|terms|.
            let close = |name: &str, a: &Tensor, b: &Tensor, depth: usize| {
                let (a, b) = (as_f64_vec(a), as_f64_vec(b));
                let worst = max_abs_diff(&a, &b);
                let bound = 1e-6 * depth as f64;
                assert!(
                    worst <= bound,
                    "({m}, {k}, {n}) {precision:?} {name}: off by {worst:e} (bound {bound:e})"
                );
            };
            close("y", &y, &y_ref, k);
            close("dx", grads.get(x.as_tensor()).unwrap(), &dx_ref, n);
            close("dw", grads.get(w.as_tensor()).unwrap(), &dw_ref, m);
            match grads.get(b.as_tensor()) {
                Some(db) => close("db", db, &db_ref, m),
                None => assert!(!bias, "no bias gradient"),
            }
            if precision == Precision::Bf16 {
                // And against the exact f64 product: bf16 rounding, 2⁻⁹ relative per operand.
                let exact = f64_tensor(&xs, &[m, k])
                    .matmul(&f64_tensor(&ws, &[n, k]).t().unwrap())
                    .unwrap();
                let exact = if bias {
                    exact.broadcast_add(&f64_tensor(&bs, &[n])).unwrap()
                } else {
                    exact
                };
                let off = max_abs_diff(&as_f64_vec(&y), &as_f64_vec(&exact));
                assert!(
                    off > 1e-4 && off < 2.0 * (k as f64).sqrt() / 256.0,
                    "({m}, {k}, {n}) bf16 against the exact product: off by {off:e}"
                );
            }
        }
    }
}

/// LayerNorm and GELU storing their output in bf16 for a bf16 linear layer that alone reads it
/// (`fused_linear_takes_bf16`): the stored values are the f32 outputs rounded as `half` rounds
/// them, and the layer's output and every gradient (the producer's input and parameters, the
/// layer's weight and bias) are bitwise those of the f32 output the layer rounds itself.
#[test]
fn producers_storing_bf16_for_a_bf16_linear_change_no_value_or_gradient() {
    use gpt_pretrain::ops::gelu::{fused_gelu_tanh, fused_gelu_tanh_rounded};
    use gpt_pretrain::ops::layer_norm::{fused_layer_norm, fused_layer_norm_rounded};
    use gpt_pretrain::ops::linear::{fused_linear, fused_linear_takes_bf16, Precision};
    if !require_onednn() || !cpu_bf16() {
        return;
    }
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    // (rows, width in, width out): one LayerNorm row group and less, several and a partial one;
    // GELU chunks whole and partial.
    for (m, k, n) in [(3, 8, 5), (37, 64, 24), (300, 384, 96)] {
        let mut random = |shape: &[usize], scale: f64| {
            let len: usize = shape.iter().product();
            let v: Vec<f32> = (0..len)
                .map(|_| (rng.random_range(-1.0..1.0) * scale) as f32)
                .collect();
            Var::from_tensor(&Tensor::from_vec(v, shape, &Device::Cpu).unwrap()).unwrap()
        };
        let (x, ln_w, ln_b) = (random(&[m, k], 3.0), random(&[k], 1.0), random(&[k], 0.5));
        let (w, b, up) = (
            random(&[n, k], 0.2),
            random(&[n], 0.1),
            random(&[m, n], 1.0),
        );
        assert!(fused_linear_takes_bf16(w.as_tensor(), Precision::Bf16));
        assert!(!fused_linear_takes_bf16(w.as_tensor(), Precision::F32));
        type Producer<'a> = Box<dyn Fn(bool) -> Tensor + 'a>;
        let producers: [(&str, Producer); 2] = [
            (
                "layer norm",
                Box::new(|rounded| {
                    let (x, w, b) = (x.as_tensor(), ln_w.as_tensor(), Some(ln_b.as_tensor()));
                    match rounded {
                        true => fused_layer_norm_rounded(x, w, b, 1e-5).unwrap(),
                        false => fused_layer_norm(x, w, b, 1e-5).unwrap(),
                    }
                }),
            ),
            (
                "gelu",
                Box::new(|rounded| match rounded {
                    true => fused_gelu_tanh_rounded(x.as_tensor()).unwrap(),
                    false => fused_gelu_tanh(x.as_tensor()).unwrap(),
                }),
            ),
        ];
        for (name, produce) in producers {
            let run = |rounded: bool| {
                let h = produce(rounded);
                let y =
                    fused_linear(&h, w.as_tensor(), Some(b.as_tensor()), Precision::Bf16).unwrap();
                let grads = (&y * up.as_tensor())
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap();
                let flat = |t: &Tensor| t.flatten_all().unwrap();
                let grads: Vec<Option<Vec<f32>>> = [&x, &ln_w, &ln_b, &w, &b]
                    .into_iter()
                    .map(|v| grads.get(v.as_tensor()).map(|g| flat(g).to_vec1().unwrap()))
                    .collect();
                (h, flat(&y).to_vec1::<f32>().unwrap(), grads)
            };
            let (h_f32, y_f32, grads_f32) = run(false);
            let (h_bf16, y_bf16, grads_bf16) = run(true);
            assert_eq!(h_bf16.dtype(), DType::BF16, "{name}");
            let stored: Vec<u16> = flat_bits(&h_bf16);
            let rounded: Vec<u16> = h_f32
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .iter()
                .map(|&v| half::bf16::from_f32(v).to_bits())
                .collect();
            assert_eq!(stored, rounded, "({m}, {k}, {n}) {name}: stored values");
            assert_eq!(y_bf16, y_f32, "({m}, {k}, {n}) {name}: the layer's output");
            assert_eq!(grads_bf16, grads_f32, "({m}, {k}, {n}) {name}: gradients");
            assert!(
                grads_f32[0].is_some() && grads_f32[3].is_some(),
                "{name}: no gradients"
            );
        }
    }
}

/// The bits of a bf16 tensor, flattened.
fn flat_bits(t: &Tensor) -> Vec<u16> {
    t.flatten_all()
        .unwrap()
        .to_vec1::<half::bf16>()
        .unwrap()
        .iter()
        .map(|v| v.to_bits())
        .collect()
}

#[test]
fn fused_cross_entropy_matches_candle_ops_in_value_and_gradient() {
    use gpt_pretrain::ops::cross_entropy::cross_entropy_ops;
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    for (dtype, tol) in [(DType::F64, 1e-12), (DType::F32, 1e-5)] {
        for (n, v) in [(7, 5), (64, 1000), (3, 50304)] {
            let values: Vec<f64> = (0..n * v).map(|_| rng.random_range(-8.0..8.0)).collect();
            let targets: Vec<u32> = (0..n).map(|_| rng.random_range(0..v as u32)).collect();
            let logits = Var::from_tensor(
                &Tensor::from_vec(values, (n, v), &Device::Cpu)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap(),
            )
            .unwrap();
            let t = Tensor::new(targets.as_slice(), &Device::Cpu).unwrap();
            let fused = cross_entropy(logits.as_tensor(), &t).unwrap();
            let plain = cross_entropy_ops(logits.as_tensor(), &t).unwrap();
            let (a, b) = (
                fused
                    .to_dtype(DType::F64)
                    .unwrap()
                    .to_scalar::<f64>()
                    .unwrap(),
                plain
                    .to_dtype(DType::F64)
                    .unwrap()
                    .to_scalar::<f64>()
                    .unwrap(),
            );
            assert!(
                (a - b).abs() <= tol * b.abs(),
                "{dtype:?} {n}x{v}: loss {a} vs {b}"
            );
            // Scale the loss so the upstream gradient is not 1.
            let ga = (fused * 3.0).unwrap().backward().unwrap();
            let gb = (plain * 3.0).unwrap().backward().unwrap();
            let grad_of_logits = |g: &candle_core::backprop::GradStore| -> Vec<f64> {
                g.get(logits.as_tensor())
                    .unwrap()
                    .to_dtype(DType::F64)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap()
            };
            let (fa, fb) = (grad_of_logits(&ga), grad_of_logits(&gb));
            let worst = max_abs_diff(&fa, &fb);
            let scale = fb.iter().map(|x| x.abs()).fold(0.0, f64::max);
            assert!(
                worst <= tol * scale.max(1e-12) * 10.0,
                "{dtype:?} {n}x{v}: gradient differs by {worst:e} (max {scale:e})"
            );
        }
    }
    // A target outside the vocabulary is an error, not a read out of bounds.
    let logits = Tensor::zeros((2, 4), DType::F32, &Device::Cpu).unwrap();
    assert!(cross_entropy(&logits, &Tensor::new(&[1u32, 4], &Device::Cpu).unwrap()).is_err());
}

#[test]
fn sum_of_squares_matches_f64_ops() {
    use gpt_pretrain::ops::grad_norm::sum_of_squares;
    let mut rng = ChaCha8Rng::seed_from_u64(12);
    let values: Vec<f64> = (0..10_007).map(|_| rng.random_range(-3.0..3.0)).collect();
    let expected: f64 = values.iter().map(|x| x * x).sum();
    let t64 = Tensor::new(values.as_slice(), &Device::Cpu).unwrap();
    assert_eq!(sum_of_squares(&t64).unwrap(), expected);
    let t32 = t64.to_dtype(DType::F32).unwrap();
    let expected32: f64 = values.iter().map(|&x| (x as f32 as f64).powi(2)).sum();
    assert!((sum_of_squares(&t32).unwrap() - expected32).abs() < 1e-9 * expected32);
    // A non-contiguous view takes the op path and agrees.
    let m = t64
        .narrow(0, 0, 10_000)
        .unwrap()
        .reshape((100, 100))
        .unwrap()
        .t()
        .unwrap();
    let direct: f64 = values[..10_000].iter().map(|x| x * x).sum();
    assert!((sum_of_squares(&m).unwrap() - direct).abs() < 1e-9 * direct);
}

#[test]
fn sums_over_leading_dims_are_row_ordered_f32_sums_at_every_size() {
    // The vendored candle-core sums over leading dimensions row by row, columns in parallel
    // (vendor/candle-core/PATCHED.md). The reference is that definition written out: per column,
    // f32 additions in row order from zero, which is also what upstream's generic loop computes.
    let mut rng = ChaCha8Rng::seed_from_u64(21);
    // (3, 5, 7): the serial path; (4, 128, 384): the parallel one (≥ 64K elements, ≥ 128 columns).
    for (b, t, c) in [(3, 5, 7), (4, 128, 384), (2, 300, 1000)] {
        let values: Vec<f32> = (0..b * t * c)
            .map(|_| rng.random_range(-3.0f32..3.0))
            .collect();
        let x = Tensor::from_vec(values.clone(), (b, t, c), &Device::Cpu).unwrap();
        let mut rows_ordered = vec![0f32; c];
        for row in values.chunks(c) {
            for (d, &v) in rows_ordered.iter_mut().zip(row) {
                *d += v;
            }
        }
        let ours: Vec<f32> = x.sum((0, 1)).unwrap().to_vec1().unwrap();
        assert_eq!(ours, rows_ordered, "({b}, {t}, {c}) over dims 0 and 1");
        let kept = x.sum_keepdim(0).unwrap();
        assert_eq!(kept.dims(), &[1, t, c]);
        let mut over_batch = vec![0f32; t * c];
        for block in values.chunks(t * c) {
            for (d, &v) in over_batch.iter_mut().zip(block) {
                *d += v;
            }
        }
        assert_eq!(
            kept.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            over_batch
        );
        // A middle dimension still takes the generic path: against an f64 sum.
        let middle: Vec<f32> = x.sum(1).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        for i in 0..b {
            for j in 0..c {
                let exact: f64 = (0..t).map(|k| values[(i * t + k) * c + j] as f64).sum();
                assert!(
                    (middle[i * c + j] as f64 - exact).abs() < 1e-3,
                    "({i}, {j})"
                );
            }
        }
    }
}

#[test]
fn fused_gelu_matches_candle_ops_in_value_and_gradient() {
    use gpt_pretrain::ops::gelu::{gelu_tanh, gelu_tanh_ops};
    let mut rng = ChaCha8Rng::seed_from_u64(21);
    for (dtype, tol) in [(DType::F64, 1e-12), (DType::F32, 1e-5)] {
        let values: Vec<f64> = (0..40_000).map(|_| rng.random_range(-6.0..6.0)).collect();
        let x = Var::from_tensor(
            &Tensor::from_vec(values, (200, 200), &Device::Cpu)
                .unwrap()
                .to_dtype(dtype)
                .unwrap(),
        )
        .unwrap();
        let upstream = Tensor::rand(-1f32, 1f32, (200, 200), &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let run = |f: fn(&Tensor) -> candle_core::Result<Tensor>| -> (Vec<f64>, Vec<f64>) {
            let y = f(x.as_tensor()).unwrap();
            let g = y
                .mul(&upstream)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            (as_f64_vec(&y), as_f64_vec(g.get(x.as_tensor()).unwrap()))
        };
        let (ya, ga) = run(gelu_tanh);
        let (yb, gb) = run(gelu_tanh_ops);
        for (name, a, b) in [("value", &ya, &yb), ("gradient", &ga, &gb)] {
            // Relative to the O(1) scale of GELU and its derivative: near x = -6 both are ~1e-7
            // and carry cancellation error in any f32 formula.
            let worst = a
                .iter()
                .zip(b.iter())
                .map(|(p, q)| (p - q).abs() / q.abs().max(1.0))
                .fold(0.0, f64::max);
            assert!(worst < tol, "{dtype:?} {name}: {worst:e}");
        }
    }
}

#[test]
fn fused_causal_softmax_matches_candle_ops_in_value_and_gradient() {
    let mut rng = ChaCha8Rng::seed_from_u64(23);
    let scale = 0.125;
    // The model's square case, and Tq < Tk (queries at the end of a longer key sequence).
    for dims in [[2usize, 3, 40, 40], [2, 3, 5, 9]] {
        let (tq, tk) = (dims[2], dims[3]);
        let n: usize = dims.iter().product();
        let mask: Vec<f64> = (0..tq * tk)
            .map(|k| {
                if k % tk > k / tk + tk - tq {
                    f64::NEG_INFINITY
                } else {
                    0.0
                }
            })
            .collect();
        let values: Vec<f64> = (0..n).map(|_| rng.random_range(-8.0..8.0)).collect();
        let upstream: Vec<f64> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
        for (dtype, tol) in [(DType::F64, 1e-12), (DType::F32, 1e-6)] {
            let tensor = |v: &[f64], shape: &[usize]| {
                Tensor::from_slice(v, shape, &Device::Cpu)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap()
            };
            let x = Var::from_tensor(&tensor(&values, &dims)).unwrap();
            let (mask, upstream) = (tensor(&mask, &[tq, tk]), tensor(&upstream, &dims));
            let composed = |x: &Tensor| -> Tensor {
                let s = (x * scale).unwrap().broadcast_add(&mask).unwrap();
                let max = s.max_keepdim(3).unwrap().detach();
                let e = s.broadcast_sub(&max).unwrap().exp().unwrap();
                e.broadcast_div(&e.sum_keepdim(3).unwrap()).unwrap()
            };
            let fused = |x: &Tensor| -> Tensor {
                assert!(gpt_pretrain::ops::softmax::fused_causal_softmax_applies(x));
                gpt_pretrain::ops::softmax::fused_causal_softmax(x, scale).unwrap()
            };
            let run = |f: &dyn Fn(&Tensor) -> Tensor| -> (Vec<f64>, Vec<f64>) {
                let y = f(x.as_tensor());
                let g = y
                    .mul(&upstream)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap();
                (as_f64_vec(&y), as_f64_vec(g.get(x.as_tensor()).unwrap()))
            };
            let (ya, ga) = run(&fused);
            let (yb, gb) = run(&composed);
            for (name, a, b) in [("value", &ya, &yb), ("gradient", &ga, &gb)] {
                // Probabilities and their gradients are O(1).
                let worst = max_abs_diff(a, b);
                assert!(worst < tol, "{dims:?} {dtype:?} {name}: {worst:e}");
            }
            // Masked entries are exactly zero.
            for (k, &p) in ya.iter().enumerate() {
                let (i, j) = ((k / tk) % tq, k % tk);
                if j > i + tk - tq {
                    assert_eq!(p, 0.0, "{dims:?} masked ({i}, {j})");
                }
            }
        }
    }
}

/// Causal attention from packed qkv (B, T, 3C) with plain candle ops: split, scores, −∞ mask,
/// softmax, weighted values, heads back side by side.
fn attention_composed(qkv: &Tensor, n_head: usize) -> Tensor {
    let (b, t, c3) = qkv.dims3().unwrap();
    let (c, hd) = (c3 / 3, c3 / 3 / n_head);
    let heads = |i: usize| {
        qkv.narrow(2, i * c, c)
            .unwrap()
            .reshape((b, t, n_head, hd))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap()
    };
    let (q, k, v) = (heads(0), heads(1), heads(2));
    let mask: Vec<f64> = (0..t * t)
        .map(|i| {
            if i % t > i / t {
                f64::NEG_INFINITY
            } else {
                0.0
            }
        })
        .collect();
    let mask = Tensor::from_vec(mask, (t, t), &Device::Cpu)
        .unwrap()
        .to_dtype(qkv.dtype())
        .unwrap();
    let scores = (q.matmul(&k.t().unwrap()).unwrap() / (hd as f64).sqrt())
        .unwrap()
        .broadcast_add(&mask)
        .unwrap();
    let p = candle_nn::ops::softmax(&scores, candle_core::D::Minus1).unwrap();
    p.matmul(&v)
        .unwrap()
        .transpose(1, 2)
        .unwrap()
        .reshape((b, t, c))
        .unwrap()
}

#[test]
fn fused_attention_matches_candle_ops_in_value_and_gradient() {
    use gpt_pretrain::ops::attention::{fused_causal_attention, fused_causal_attention_applies};
    let mut rng = ChaCha8Rng::seed_from_u64(31);
    // (batch, T, heads, head_dim): one block; a partial last block; several blocks and a
    // partial one; the baby model's head shape over exactly two blocks.
    for (b, t, n_head, hd) in [
        (2, 7, 2, 4),
        (1, 70, 3, 8),
        (2, 150, 2, 16),
        (1, 128, 1, 64),
    ] {
        let c = n_head * hd;
        let n = b * t * 3 * c;
        // Scores of order 1-10 so the softmax is neither flat nor one-hot.
        let values: Vec<f64> = (0..n).map(|_| rng.random_range(-2.0..2.0)).collect();
        let upstream: Vec<f64> = (0..b * t * c)
            .map(|_| rng.random_range(-1.0..1.0))
            .collect();
        for (dtype, tol) in [(DType::F64, 1e-12), (DType::F32, 2e-5)] {
            let tensor = |v: &[f64], shape: &[usize]| {
                Tensor::from_slice(v, shape, &Device::Cpu)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap()
            };
            let qkv = Var::from_tensor(&tensor(&values, &[b, t, 3 * c])).unwrap();
            let upstream = tensor(&upstream, &[b, t, c]);
            assert!(fused_causal_attention_applies(qkv.as_tensor()));
            let run = |y: Tensor| -> (Vec<f64>, Vec<f64>) {
                let g = y
                    .mul(&upstream)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap();
                (as_f64_vec(&y), as_f64_vec(g.get(qkv.as_tensor()).unwrap()))
            };
            let (ya, ga) = run(fused_causal_attention(qkv.as_tensor(), n_head).unwrap());
            let (yb, gb) = run(attention_composed(qkv.as_tensor(), n_head));
            for (name, a, r) in [("value", &ya, &yb), ("gradient", &ga, &gb)] {
                let scale = r.iter().fold(0.0f64, |m, x| m.max(x.abs()));
                let worst = max_abs_diff(a, r);
                assert!(
                    worst < tol * scale.max(1.0),
                    "({b}, {t}, {n_head}, {hd}) {dtype:?} {name}: {worst:e} (largest {scale:e})"
                );
            }
            // The gradient reaches all of q, k and v.
            for part in 0..3 {
                let norm: f64 = (0..b * t)
                    .flat_map(|row| &ga[row * 3 * c + part * c..row * 3 * c + (part + 1) * c])
                    .map(|g| g * g)
                    .sum();
                assert!(
                    norm > 0.0,
                    "({b}, {t}, {n_head}, {hd}): part {part} has no gradient"
                );
            }
        }
    }
}

/// The bf16 attention's reference in f64, rounding to bf16 exactly where the kernels do: the
/// operands of its six products (q, k, v, the probabilities, dy and dS), and nothing else (the
/// softmax and dS's arithmetic use the unrounded probabilities). Returns (y, dqkv).
fn attention_bf16_reference(qkv: &Tensor, dy: &Tensor, n_head: usize) -> (Vec<f64>, Vec<f64>) {
    use candle_core::D;
    let (b, t, c3) = qkv.dims3().unwrap();
    let (c, hd) = (c3 / 3, c3 / 3 / n_head);
    let bf16 = |x: &Tensor| {
        x.to_dtype(DType::BF16)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
    };
    let split = |x: &Tensor| {
        x.reshape((b, t, n_head, hd))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap()
    };
    let merge = |x: &Tensor| {
        x.transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap()
            .reshape((b, t, c))
            .unwrap()
    };
    let qkv = qkv.to_dtype(DType::F64).unwrap();
    let part = |i: usize| bf16(&split(&qkv.narrow(2, i * c, c).unwrap()));
    let (q, k, v) = (part(0), part(1), part(2));
    let dy = bf16(&split(&dy.to_dtype(DType::F64).unwrap()));
    let scale = 1.0 / (hd as f64).sqrt();
    let mask: Vec<f64> = (0..t * t)
        .map(|i| {
            if i % t > i / t {
                f64::NEG_INFINITY
            } else {
                0.0
            }
        })
        .collect();
    let mask = Tensor::from_vec(mask, (t, t), &Device::Cpu).unwrap();
    let scores = (q.matmul(&k.t().unwrap()).unwrap() * scale)
        .unwrap()
        .broadcast_add(&mask)
        .unwrap();
    let p = candle_nn::ops::softmax(&scores, D::Minus1).unwrap();
    let y = merge(&bf16(&p).matmul(&v).unwrap());
    let dp = dy.matmul(&v.t().unwrap()).unwrap();
    let row_dot = (&p * &dp).unwrap().sum_keepdim(D::Minus1).unwrap();
    let ds = bf16(&((&p * dp.broadcast_sub(&row_dot).unwrap()).unwrap() * scale).unwrap());
    let dq = ds.matmul(&k).unwrap();
    let dk = ds.t().unwrap().matmul(&q).unwrap();
    let dv = bf16(&p).t().unwrap().matmul(&dy).unwrap();
    let dqkv = Tensor::cat(&[merge(&dq), merge(&dk), merge(&dv)], 2).unwrap();
    (as_f64_vec(&y), as_f64_vec(&dqkv))
}

#[test]
fn bf16_attention_matches_an_f64_reference_on_rounded_operands() {
    use gpt_pretrain::ops::attention::{
        bf16_attention_supported, fused_causal_attention_in, Precision,
    };
    if !bf16_attention_supported() {
        eprintln!("skipped: this CPU lacks AVX512-BF16, and bf16 attention runs its f32 kernel");
        return;
    }
    let mut rng = ChaCha8Rng::seed_from_u64(37);
    // (batch, T, heads, head_dim): odd T and head_dim (padded pairs and panels); head_dim 20
    // (a partial column panel) and 8 (row groups of 8); tiny's (32) and baby's (64) heads over
    // several key panels, one T not a whole number of them.
    for (b, t, n_head, hd) in [
        (1, 9, 1, 5),
        (2, 33, 2, 20),
        (1, 70, 3, 8),
        (2, 128, 2, 32),
        (1, 256, 1, 64),
        (1, 150, 2, 64),
    ] {
        let c = n_head * hd;
        let values: Vec<f32> = (0..b * t * 3 * c)
            .map(|_| rng.random_range(-2.0..2.0))
            .collect();
        let upstream: Vec<f32> = (0..b * t * c)
            .map(|_| rng.random_range(-1.0..1.0))
            .collect();
        let qkv = Var::from_slice(&values, (b, t, 3 * c), &Device::Cpu).unwrap();
        let upstream = Tensor::from_slice(&upstream, (b, t, c), &Device::Cpu).unwrap();
        let y = fused_causal_attention_in(qkv.as_tensor(), n_head, Precision::Bf16).unwrap();
        let grads = y
            .mul(&upstream)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let (y, dqkv) = (
            as_f64_vec(&y),
            as_f64_vec(grads.get(qkv.as_tensor()).unwrap()),
        );
        let (y_ref, dqkv_ref) = attention_bf16_reference(qkv.as_tensor(), &upstream, n_head);
        // The unrounded f64 attention, to show the bound tells the two apart.
        let exact = Var::from_tensor(&qkv.as_tensor().to_dtype(DType::F64).unwrap()).unwrap();
        let y_exact = attention_composed(exact.as_tensor(), n_head);
        let g_exact = y_exact
            .mul(&upstream.to_dtype(DType::F64).unwrap())
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let (y_exact, dqkv_exact) = (
            as_f64_vec(&y_exact),
            as_f64_vec(g_exact.get(exact.as_tensor()).unwrap()),
        );
        for (name, ours, reference, exact) in [
            ("value", &y, &y_ref, &y_exact),
            ("gradient", &dqkv, &dqkv_ref, &dqkv_exact),
        ] {
            let scale = reference.iter().fold(1.0f64, |m, x| m.max(x.abs()));
            let worst = max_abs_diff(ours, reference) / scale;
            let mean = |a: &[f64]| {
                a.iter()
                    .zip(reference.iter())
                    .map(|(x, r)| (x - r).abs())
                    .sum::<f64>()
                    / a.len() as f64
            };
            let (off, rounding) = (mean(ours), mean(exact));
            // f32 arithmetic where the reference has f64 can flip a probability's or dS's
            // rounding by one bf16 step (2⁻⁸ relative) here and there (measured: up to 8e-4 of
            // the largest entry), but on average the kernel is far closer to the reference than
            // the unrounded attention is (measured: 130 to 10⁵ times).
            assert!(
                worst < 2e-3,
                "({b}, {t}, {n_head}, {hd}) {name}: {worst:e} of the largest entry off"
            );
            assert!(
                off < rounding / 20.0,
                "({b}, {t}, {n_head}, {hd}) {name}: {off:e} off on average, against {rounding:e} \
                 for the unrounded attention"
            );
        }
    }
}

#[test]
fn fused_attention_is_causal_and_rejects_bad_shapes() {
    use gpt_pretrain::ops::attention::fused_causal_attention;
    // With T = 1 each head returns its own value vector, whatever q and k are.
    let qkv = Tensor::new(&[[[5.0f64, -1.0, 2.0, 3.0, 7.0, -4.0]]], &Device::Cpu).unwrap();
    let y = fused_causal_attention(&qkv, 2).unwrap();
    assert_eq!(y.to_vec3::<f64>().unwrap(), vec![vec![vec![7.0, -4.0]]]);
    // Changing the last position's q, k or v leaves the earlier outputs bitwise unchanged.
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let (t, c3) = (100, 24);
    let mut values: Vec<f32> = (0..t * c3).map(|_| rng.random_range(-1.0..1.0)).collect();
    let before = fused_causal_attention(
        &Tensor::from_slice(&values, (1, t, c3), &Device::Cpu).unwrap(),
        2,
    )
    .unwrap()
    .narrow(1, 0, t - 1)
    .unwrap()
    .flatten_all()
    .unwrap()
    .to_vec1::<f32>()
    .unwrap();
    for v in &mut values[(t - 1) * c3..] {
        *v += 3.0;
    }
    let after = fused_causal_attention(
        &Tensor::from_slice(&values, (1, t, c3), &Device::Cpu).unwrap(),
        2,
    )
    .unwrap()
    .narrow(1, 0, t - 1)
    .unwrap()
    .flatten_all()
    .unwrap()
    .to_vec1::<f32>()
    .unwrap();
    assert_eq!(before, after);
    // A width that is not 3 × a multiple of the head count is an error, not a panic.
    let bad = Tensor::zeros((1, 4, 10), DType::F32, &Device::Cpu).unwrap();
    assert!(fused_causal_attention(&bad, 2).is_err());
    let qkv = Tensor::zeros((1, 4, 18), DType::F32, &Device::Cpu).unwrap();
    assert!(fused_causal_attention(&qkv, 3).is_ok());
    assert!(fused_causal_attention(&qkv, 4).is_err());
}

#[test]
fn fused_layer_norm_matches_candle_ops_in_value_and_gradient() {
    let mut rng = ChaCha8Rng::seed_from_u64(29);
    // Rows not a multiple of the 64-row gradient chunks nor of the 16-row tasks; widths that are
    // whole 16-lane chunks, none, and both.
    for (rows, c, bias) in [(150usize, 48usize, true), (7, 13, false), (21, 37, true)] {
        let values: Vec<f64> = (0..rows * c).map(|_| rng.random_range(-4.0..6.0)).collect();
        let w: Vec<f64> = (0..c).map(|_| rng.random_range(0.5..1.5)).collect();
        let b: Vec<f64> = (0..c).map(|_| rng.random_range(-1.0..1.0)).collect();
        let upstream: Vec<f64> = (0..rows * c).map(|_| rng.random_range(-1.0..1.0)).collect();
        for (dtype, tol) in [(DType::F64, 1e-12), (DType::F32, 2e-5)] {
            let var = |v: &[f64], shape: &[usize]| {
                Var::from_tensor(
                    &Tensor::from_slice(v, shape, &Device::Cpu)
                        .unwrap()
                        .to_dtype(dtype)
                        .unwrap(),
                )
                .unwrap()
            };
            let (x, wv, bv) = (var(&values, &[rows, c]), var(&w, &[c]), var(&b, &[c]));
            let up = var(&upstream, &[rows, c]).as_tensor().detach();
            let composed = || -> Tensor {
                let xt = x.as_tensor();
                let mean = xt.mean_keepdim(1).unwrap();
                let centered = xt.broadcast_sub(&mean).unwrap();
                let v = centered.sqr().unwrap().mean_keepdim(1).unwrap();
                let y = centered
                    .broadcast_div(&(v + 1e-5).unwrap().sqrt().unwrap())
                    .unwrap()
                    .broadcast_mul(wv.as_tensor())
                    .unwrap();
                if bias {
                    y.broadcast_add(bv.as_tensor()).unwrap()
                } else {
                    y
                }
            };
            let fused = || -> Tensor {
                assert!(gpt_pretrain::ops::layer_norm::fused_layer_norm_applies(
                    x.as_tensor(),
                    wv.as_tensor()
                ));
                gpt_pretrain::ops::layer_norm::fused_layer_norm(
                    x.as_tensor(),
                    wv.as_tensor(),
                    bias.then(|| bv.as_tensor()),
                    1e-5,
                )
                .unwrap()
            };
            let run = |y: Tensor| -> Vec<Vec<f64>> {
                let g = y.mul(&up).unwrap().sum_all().unwrap().backward().unwrap();
                let mut out = vec![
                    as_f64_vec(&y),
                    as_f64_vec(g.get(x.as_tensor()).unwrap()),
                    as_f64_vec(g.get(wv.as_tensor()).unwrap()),
                ];
                if bias {
                    out.push(as_f64_vec(g.get(bv.as_tensor()).unwrap()));
                }
                out
            };
            let (a, r) = (run(fused()), run(composed()));
            for (name, a, r) in ["y", "dx", "dw", "db"]
                .iter()
                .zip(&a)
                .zip(&r)
                .map(|((n, a), r)| (n, a, r))
            {
                let worst = a
                    .iter()
                    .zip(r)
                    .map(|(p, q)| (p - q).abs() / q.abs().max(1.0))
                    .fold(0.0, f64::max);
                assert!(worst < tol, "{rows}x{c} {dtype:?} {name}: {worst:e}");
            }
        }
    }
}

#[test]
fn fast_exp_f32_is_within_two_ulp_of_the_f64_exp() {
    use gpt_pretrain::ops::simd::FastExp;
    let mut worst_ulps = 0.0f64;
    let mut x = -87.0f32;
    while x <= 88.0 {
        let exact = (x as f64).exp();
        let ulp = f32::EPSILON as f64 * exact; // one ulp of a normal f32 near e^x, within 2x
        let err = (x.fast_exp() as f64 - exact).abs() / ulp;
        worst_ulps = worst_ulps.max(err);
        x += 0.000_731;
    }
    assert!(worst_ulps <= 2.0, "worst error {worst_ulps} ulp");
    // Exact at 0, NaN stays NaN, far below the range the smallest normal, f64 is libm's.
    assert_eq!(0.0f32.fast_exp(), 1.0);
    assert!(f32::NAN.fast_exp().is_nan());
    assert!((-1000.0f32).fast_exp() < 1.2e-38);
    assert_eq!(5.0f64.fast_exp(), 5.0f64.exp());
}

#[test]
fn fused_lm_head_cross_entropy_matches_candle_ops_in_value_and_gradients() {
    use gpt_pretrain::ops::cross_entropy::cross_entropy_ops;
    use gpt_pretrain::ops::linear::Precision;
    use gpt_pretrain::ops::lm_head_loss::{
        fused_linear_cross_entropy, fused_linear_cross_entropy_applies, LossGradients,
    };
    require_onednn();
    let mut rng = ChaCha8Rng::seed_from_u64(41);
    // (rows, width, vocab): one row group; GPT-2's vocabulary, where 166 rows make a group, so
    // 400 rows are two full groups and a partial one.
    for (n, c, v) in [(37usize, 12usize, 65usize), (400, 8, 50304)] {
        let xs: Vec<f64> = (0..n * c).map(|_| rng.random_range(-1.0..1.0)).collect();
        let ws: Vec<f64> = (0..v * c).map(|_| rng.random_range(-1.0..1.0)).collect();
        let ts: Vec<u32> = (0..n).map(|_| rng.random_range(0..v as u32)).collect();
        let targets = Tensor::from_vec(ts, n, &Device::Cpu).unwrap();
        // bf16: the reference multiplies the bf16-rounded x and w (candle's rounding) in f64; the
        // fused loss also rounds the logits' gradient to bf16 for dx and dw (2⁻⁹ relative per
        // element), hence the wider gradient tolerance.
        let mut cases = vec![
            (DType::F64, Precision::F32, 1e-12, 1e-12),
            (DType::F32, Precision::F32, 1e-5, 1e-5),
        ];
        if cpu_bf16() {
            cases.push((DType::F32, Precision::Bf16, 1e-5, 1e-2));
        }
        for (dtype, precision, tol, grad_tol) in cases {
            let var = |v: &[f64], shape: (usize, usize)| {
                let t = Tensor::from_slice(v, shape, &Device::Cpu).unwrap();
                Var::from_tensor(&t.to_dtype(dtype).unwrap()).unwrap()
            };
            let (x, w) = (var(&xs, (n, c)), var(&ws, (v, c)));
            assert!(fused_linear_cross_entropy_applies(
                x.as_tensor(),
                w.as_tensor()
            ));
            // An upstream gradient of 3, which the fused backward must apply.
            let run = |loss: Tensor| -> (f64, Vec<f64>, Vec<f64>) {
                let value = loss
                    .to_dtype(DType::F64)
                    .unwrap()
                    .to_scalar::<f64>()
                    .unwrap();
                let g = (loss * 3.0).unwrap().backward().unwrap();
                (
                    value,
                    as_f64_vec(g.get(x.as_tensor()).unwrap()),
                    as_f64_vec(g.get(w.as_tensor()).unwrap()),
                )
            };
            let fused = fused_linear_cross_entropy(
                x.as_tensor(),
                w.as_tensor(),
                &targets,
                LossGradients::Eager,
                precision,
            )
            .unwrap();
            let (la, dxa, dwa) = run(fused);
            let as_computed = |t: &Tensor| match precision {
                Precision::F32 => t.clone(),
                Precision::Bf16 => t
                    .to_dtype(DType::BF16)
                    .unwrap()
                    .to_dtype(DType::F64)
                    .unwrap(),
            };
            let logits = as_computed(x.as_tensor())
                .matmul(&as_computed(w.as_tensor()).t().unwrap())
                .unwrap();
            let (lb, dxb, dwb) = run(cross_entropy_ops(&logits, &targets).unwrap());
            assert!(
                (la - lb).abs() < tol * lb.abs(),
                "({n}, {c}, {v}) {dtype:?} {precision:?} loss {la} vs {lb}"
            );
            for (name, a, b) in [("dx", &dxa, &dxb), ("dw", &dwa, &dwb)] {
                let scale = b.iter().fold(0.0f64, |m, x| m.max(x.abs()));
                let worst = max_abs_diff(a, b);
                assert!(
                    worst <= grad_tol * scale,
                    "({n}, {c}, {v}) {dtype:?} {precision:?} {name}: {worst:e} (largest {scale:e})"
                );
            }
            // Evaluation: the same loss, and no gradients to take.
            let eval = fused_linear_cross_entropy(
                x.as_tensor(),
                w.as_tensor(),
                &targets,
                LossGradients::None,
                precision,
            )
            .unwrap();
            let le = eval
                .to_dtype(DType::F64)
                .unwrap()
                .to_scalar::<f64>()
                .unwrap();
            assert_eq!(le, la);
            let err = eval.backward().unwrap_err().to_string();
            assert!(err.contains("without gradients"), "{err}");
        }
    }
    // A target outside the vocabulary is an error, not a panic.
    let x = Tensor::zeros((2, 4), DType::F32, &Device::Cpu).unwrap();
    let w = Tensor::zeros((5, 4), DType::F32, &Device::Cpu).unwrap();
    let bad = Tensor::new(&[1u32, 5], &Device::Cpu).unwrap();
    let err =
        fused_linear_cross_entropy(&x, &w, &bad, LossGradients::Eager, Precision::F32).unwrap_err();
    assert!(err.to_string().contains("outside the vocabulary"), "{err}");
}

#[test]
fn fused_z_loss_matches_an_f64_reference_in_value_and_gradients() {
    use gpt_pretrain::ops::cross_entropy::cross_entropy_ops;
    use gpt_pretrain::ops::linear::Precision;
    use gpt_pretrain::ops::lm_head_loss::{
        fused_linear_cross_entropy, fused_linear_cross_entropy_with_z_loss, LossGradients,
    };
    require_onednn();
    let mut rng = ChaCha8Rng::seed_from_u64(43);
    // A coefficient large enough that the z-term moves the gradient well beyond the tolerance;
    // logits of a few units, so log Z is far from 0. 400 rows of GPT-2's vocabulary are three
    // row groups.
    let z_loss = 0.05;
    for (n, c, v) in [(37usize, 12usize, 65usize), (400, 8, 50304)] {
        let xs: Vec<f64> = (0..n * c).map(|_| rng.random_range(-2.0..2.0)).collect();
        let ws: Vec<f64> = (0..v * c).map(|_| rng.random_range(-1.0..1.0)).collect();
        let ts: Vec<u32> = (0..n).map(|_| rng.random_range(0..v as u32)).collect();
        let targets = Tensor::from_vec(ts, n, &Device::Cpu).unwrap();
        let f64_var = |v: &[f64], shape: (usize, usize)| {
            Var::from_tensor(&Tensor::from_slice(v, shape, &Device::Cpu).unwrap()).unwrap()
        };
        // The reference: f64 candle ops and autograd, objective = CE + z · mean(logsumexp²).
        let (xr, wr) = (f64_var(&xs, (n, c)), f64_var(&ws, (v, c)));
        let logits = xr.as_tensor().matmul(&wr.as_tensor().t().unwrap()).unwrap();
        let ce = cross_entropy_ops(&logits, &targets).unwrap();
        let log_z_sq = logits
            .log_sum_exp(1)
            .unwrap()
            .sqr()
            .unwrap()
            .mean_all()
            .unwrap();
        let objective = (&ce + (&log_z_sq * z_loss).unwrap()).unwrap();
        let scalar = |t: &Tensor| t.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap();
        let (ce_ref, lz2_ref, obj_ref) = (scalar(&ce), scalar(&log_z_sq), scalar(&objective));
        let g = (objective * 3.0).unwrap().backward().unwrap();
        let dx_ref = as_f64_vec(g.get(xr.as_tensor()).unwrap());
        let dw_ref = as_f64_vec(g.get(wr.as_tensor()).unwrap());
        for (dtype, tol) in [(DType::F64, 1e-12), (DType::F32, 1e-5)] {
            let var = |v: &[f64], shape: (usize, usize)| {
                let t = Tensor::from_slice(v, shape, &Device::Cpu).unwrap();
                Var::from_tensor(&t.to_dtype(dtype).unwrap()).unwrap()
            };
            let (x, w) = (var(&xs, (n, c)), var(&ws, (v, c)));
            let terms = fused_linear_cross_entropy_with_z_loss(
                x.as_tensor(),
                w.as_tensor(),
                &targets,
                LossGradients::Eager,
                Precision::F32,
                z_loss,
            )
            .unwrap();
            let values = terms
                .to_dtype(DType::F64)
                .unwrap()
                .to_vec1::<f64>()
                .unwrap();
            for (name, got, want) in [
                ("objective", values[0], obj_ref),
                ("cross-entropy", values[1], ce_ref),
                ("log²Z", values[2], lz2_ref),
            ] {
                assert!(
                    (got - want).abs() <= tol * want.abs(),
                    "({n}, {c}, {v}) {dtype:?} {name}: {got} vs {want}"
                );
            }
            let g = (terms.get(0).unwrap() * 3.0).unwrap().backward().unwrap();
            let dx = as_f64_vec(g.get(x.as_tensor()).unwrap());
            let dw = as_f64_vec(g.get(w.as_tensor()).unwrap());
            for (name, a, b) in [("dx", &dx, &dx_ref), ("dw", &dw, &dw_ref)] {
                let scale = b.iter().fold(0.0f64, |m, x| m.max(x.abs()));
                let worst = max_abs_diff(a, b);
                assert!(
                    worst <= tol * scale,
                    "({n}, {c}, {v}) {dtype:?} {name}: {worst:e} (largest {scale:e})"
                );
            }
            // The z-term's share of the gradient is far above the tolerance: without it the
            // cross-entropy's gradient alone misses the reference.
            let plain = fused_linear_cross_entropy(
                x.as_tensor(),
                w.as_tensor(),
                &targets,
                LossGradients::Eager,
                Precision::F32,
            )
            .unwrap();
            let g = (plain * 3.0).unwrap().backward().unwrap();
            let dx_plain = as_f64_vec(g.get(x.as_tensor()).unwrap());
            let scale = dx_ref.iter().fold(0.0f64, |m, x| m.max(x.abs()));
            assert!(max_abs_diff(&dx_plain, &dx_ref) > 100.0 * tol * scale);
            // Gradients through the logged terms are refused.
            let err = (terms.get(1).unwrap() + terms.get(0).unwrap())
                .unwrap()
                .backward()
                .unwrap_err()
                .to_string();
            assert!(err.contains("for logging"), "{err}");
        }
    }
}
