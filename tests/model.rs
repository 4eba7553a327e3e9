//! The GPT-2 model: gradients everywhere, gradients against finite differences in f64, the loss
//! at initialisation, overfitting one batch, and checkpoint round trips.

use candle_core::{DType, Device, Tensor, Var};
use gpt_pretrain::model::{Gpt, GptConfig, Params};
use gpt_pretrain::ops::cross_entropy::cross_entropy;
use gpt_pretrain::optim::{param_groups, Adam, AdamConfig, Optimizer, OptimizerKind};
use gpt_pretrain::train::checkpoint::{self, TrainState};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn small(vocab: usize, block: usize, bias: bool) -> GptConfig {
    GptConfig {
        n_layer: 2,
        n_head: 2,
        n_embd: 16,
        block_size: block,
        bias,
        dropout: 0.0,
        vocab_size: vocab,
    }
}

fn random_ids(b: usize, t: usize, vocab: usize, seed: u64) -> Tensor {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let ids: Vec<u32> = (0..b * t)
        .map(|_| rng.random_range(0..vocab as u32))
        .collect();
    Tensor::from_vec(ids, (b, t), &Device::Cpu).unwrap()
}

#[test]
fn every_parameter_receives_a_nonzero_gradient() {
    for bias in [true, false] {
        let cfg = small(64, 8, bias);
        let params = Params::init(&cfg, 0, DType::F32, &Device::Cpu).unwrap();
        let model = Gpt::new(&cfg, &params).unwrap();
        // T = block_size so every position embedding row is used.
        let (x, y) = (random_ids(3, 8, 64, 1), random_ids(3, 8, 64, 2));
        let grads = model.loss(&x, &y, None).unwrap().backward().unwrap();
        let named = params.named_vars();
        assert_eq!(named.len(), cfg.parameter_specs().len());
        for (name, var) in named {
            let g = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{name}: no gradient"));
            let size = g
                .abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(size > 0.0, "{name}: zero gradient");
        }
    }
}

#[test]
fn parameter_names_and_count_match_gpt2() {
    let mut cfg = GptConfig::preset("gpt2").unwrap();
    cfg.vocab_size = 50257;
    // Hugging Face's GPT-2 small has 124,439,808 parameters (tied head counted once).
    assert_eq!(cfg.n_params(), 124_439_808);
    let names: Vec<String> = cfg.parameter_specs().into_iter().map(|s| s.name).collect();
    assert!(names.contains(&"transformer.h.11.attn.c_attn.weight".to_string()));
    assert!(names.contains(&"transformer.ln_f.bias".to_string()));
    assert_eq!(names.len(), 2 + 2 + 12 * 12);
}

#[test]
fn init_follows_gpt2_statistics() {
    let cfg = GptConfig {
        n_layer: 4,
        n_embd: 128,
        n_head: 4,
        block_size: 128,
        bias: true,
        dropout: 0.0,
        vocab_size: 256,
    };
    let params = Params::init(&cfg, 7, DType::F64, &Device::Cpu).unwrap();
    let std_of = |name: &str| {
        let v: Vec<f64> = params
            .get(name)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let mean = v.iter().sum::<f64>() / v.len() as f64;
        (v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / v.len() as f64).sqrt()
    };
    assert!((std_of("transformer.wte.weight") - 0.02).abs() < 0.001);
    assert!((std_of("transformer.h.0.mlp.c_fc.weight") - 0.02).abs() < 0.001);
    let proj = 0.02 / (8.0f64).sqrt();
    assert!((std_of("transformer.h.3.mlp.c_proj.weight") - proj).abs() < 0.0005);
    assert!((std_of("transformer.h.1.attn.c_proj.weight") - proj).abs() < 0.0005);
    let ln: Vec<f64> = params
        .get("transformer.h.0.ln_1.weight")
        .unwrap()
        .to_vec1()
        .unwrap();
    assert!(ln.iter().all(|&x| x == 1.0));
    // The same seed gives the same model; another seed another.
    let again = Params::init(&cfg, 7, DType::F64, &Device::Cpu).unwrap();
    let other = Params::init(&cfg, 8, DType::F64, &Device::Cpu).unwrap();
    let first = |p: &Params| -> Vec<f64> {
        p.get("transformer.wte.weight")
            .unwrap()
            .flatten_all()
            .unwrap()
            .narrow(0, 0, 5)
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    assert_eq!(first(&params), first(&again));
    assert_ne!(first(&params), first(&other));
}

#[test]
fn loss_at_init_is_close_to_ln_vocab() {
    for vocab in [256, 1024] {
        let mut cfg = GptConfig::preset("tiny").unwrap();
        cfg.vocab_size = vocab;
        let params = Params::init(&cfg, 0, DType::F32, &Device::Cpu).unwrap();
        let model = Gpt::new(&cfg, &params).unwrap();
        let (x, y) = (random_ids(4, 128, vocab, 3), random_ids(4, 128, vocab, 4));
        let loss = model
            .loss(&x, &y, None)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64;
        let expected = (vocab as f64).ln();
        assert!(
            (loss - expected).abs() < 0.05,
            "vocab {vocab}: loss {loss}, ln(vocab) {expected}"
        );
    }
}

/// Loss of a fixed batch as a function of the parameters.
fn loss_of(model: &Gpt, x: &Tensor, y: &Tensor) -> f64 {
    model.loss(x, y, None).unwrap().to_scalar::<f64>().unwrap()
}

fn set_element(var: &Var, index: usize, value: f64) {
    let mut v: Vec<f64> = var.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
    v[index] = value;
    var.set(&Tensor::from_vec(v, var.shape(), &Device::Cpu).unwrap())
        .unwrap();
}

#[test]
fn gradients_match_finite_differences_in_f64() {
    let cfg = small(32, 6, true);
    let params = Params::init(&cfg, 5, DType::F64, &Device::Cpu).unwrap();
    // Biases and LayerNorm gains start at 0 and 1; perturb them so their gradients are generic.
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    for (_, var) in params.named_vars() {
        let v: Vec<f64> = var.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        let v: Vec<f64> = v.iter().map(|x| x + rng.random_range(-0.1..0.1)).collect();
        var.set(&Tensor::from_vec(v, var.shape(), &Device::Cpu).unwrap())
            .unwrap();
    }
    let model = Gpt::new(&cfg, &params).unwrap();
    let (x, y) = (random_ids(2, 6, 32, 10), random_ids(2, 6, 32, 11));
    let grads = model.loss(&x, &y, None).unwrap().backward().unwrap();
    let h = 1e-5;
    let mut checked = 0;
    for (name, var) in params.named_vars() {
        let analytic: Vec<f64> = grads
            .get(var.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let n = analytic.len();
        for index in [0, n / 3, n / 2, n - 1] {
            let original: f64 = var
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap()[index];
            set_element(&var, index, original + h);
            let plus = loss_of(&model, &x, &y);
            set_element(&var, index, original - h);
            let minus = loss_of(&model, &x, &y);
            set_element(&var, index, original);
            let numeric = (plus - minus) / (2.0 * h);
            let a = analytic[index];
            let err = (a - numeric).abs() / a.abs().max(numeric.abs()).max(1e-4);
            assert!(
                err < 1e-6,
                "{name}[{index}]: analytic {a:e}, numeric {numeric:e}"
            );
            checked += 1;
        }
    }
    assert_eq!(checked, 4 * cfg.parameter_specs().len());
}

#[test]
fn cross_entropy_matches_hand_computation() {
    // logits [0, ln 2, ln 3] → p = [1/6, 2/6, 3/6]; target 2 → −ln(1/2); target 0 → −ln(1/6).
    let logits = Tensor::new(
        &[[0.0, 2f64.ln(), 3f64.ln()], [0.0, 2f64.ln(), 3f64.ln()]],
        &Device::Cpu,
    )
    .unwrap();
    let targets = Tensor::new(&[2u32, 0], &Device::Cpu).unwrap();
    let loss = cross_entropy(&logits, &targets)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    let expected = (2f64.ln() + 6f64.ln()) / 2.0;
    assert!((loss - expected).abs() < 1e-14);
}

#[test]
fn attention_is_causal() {
    // Changing a later token must not change earlier logits.
    let cfg = small(32, 8, true);
    let params = Params::init(&cfg, 1, DType::F64, &Device::Cpu).unwrap();
    let model = Gpt::new(&cfg, &params).unwrap();
    let a = Tensor::new(&[[1u32, 2, 3, 4, 5, 6]], &Device::Cpu).unwrap();
    let b = Tensor::new(&[[1u32, 2, 3, 4, 9, 9]], &Device::Cpu).unwrap();
    let la = model.forward(&a, None).unwrap().narrow(1, 0, 4).unwrap();
    let lb = model.forward(&b, None).unwrap().narrow(1, 0, 4).unwrap();
    let diff = (la - lb)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    assert_eq!(diff, 0.0);
    let too_long = Tensor::zeros((1, 9), DType::U32, &Device::Cpu).unwrap();
    assert!(model.forward(&too_long, None).is_err());
}

#[test]
fn overfits_one_batch() {
    let cfg = GptConfig {
        n_layer: 2,
        n_head: 2,
        n_embd: 64,
        block_size: 32,
        bias: true,
        dropout: 0.0,
        vocab_size: 64,
    };
    let params = Params::init(&cfg, 0, DType::F32, &Device::Cpu).unwrap();
    let model = Gpt::new(&cfg, &params).unwrap();
    let (x, y) = (random_ids(4, 32, 64, 20), random_ids(4, 32, 64, 21));
    let mut adam = Adam::with_params(
        param_groups(&params.named_vars(), 0.0, false),
        AdamConfig {
            lr: 3e-3,
            ..AdamConfig::defaults(OptimizerKind::Adam)
        },
    )
    .unwrap();
    let first = model
        .loss(&x, &y, None)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let mut last = first;
    for _ in 0..300 {
        let loss = model.loss(&x, &y, None).unwrap();
        last = loss.to_scalar::<f32>().unwrap();
        adam.update(&loss.backward().unwrap(), 3e-3).unwrap();
    }
    assert!(first > 4.0, "initial loss {first}");
    assert!(last < 0.05, "loss after 300 steps on one batch: {last}");
}

#[test]
fn checkpoint_round_trip_is_exact_and_checksummed() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = small(64, 8, true);
    let params = Params::init(&cfg, 3, DType::F32, &Device::Cpu).unwrap();
    let model = Gpt::new(&cfg, &params).unwrap();
    let mut adam = Adam::with_params(
        param_groups(&params.named_vars(), 0.1, false),
        AdamConfig::defaults(OptimizerKind::AdamW),
    )
    .unwrap();
    let (x, y) = (random_ids(2, 8, 64, 1), random_ids(2, 8, 64, 2));
    adam.update(&model.loss(&x, &y, None).unwrap().backward().unwrap(), 1e-3)
        .unwrap();
    let state = TrainState {
        step: 1,
        tokens: 16,
        data_seed: 4,
        data_word_pos: (u64::MAX as u128 * 3).to_string(),
        best_val_loss: Some(2.5),
        config_hash: "abc".into(),
        skipped_steps: 0,
        clipped_steps: 1,
        // Windows with values that JSON must carry to the last bit.
        spike_windows: Some({
            let mut w = gpt_pretrain::train::spikes::SpikeWindows::new(3);
            w.judge(0.1 + 0.2, 1.0 / 3.0, 4.0, 4.0);
            w.judge(f64::MIN_POSITIVE, 1e300, 4.0, 4.0);
            w
        }),
        world_size: 1,
        checksums: Default::default(),
    };
    for step in 1..=4 {
        let s = TrainState {
            step,
            ..state.clone()
        };
        checkpoint::save(
            dir.path(),
            &params.tensors(),
            &adam.state_tensors().unwrap(),
            s,
            2,
        )
        .unwrap();
    }
    let complete = checkpoint::list_complete(dir.path()).unwrap();
    assert_eq!(
        complete.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
        vec![3, 4],
        "keep_last = 2"
    );
    let loaded = checkpoint::load_latest(dir.path(), &Device::Cpu).unwrap();
    assert_eq!(loaded.state.step, 4);
    assert_eq!(loaded.state.data_word_pos, state.data_word_pos);
    assert_eq!(loaded.state.best_val_loss, Some(2.5));
    assert_eq!(loaded.state.clipped_steps, 1);
    assert_eq!(loaded.state.spike_windows, state.spike_windows);
    for (name, t) in params.tensors() {
        let a: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        let b: Vec<f32> = loaded.model[&name]
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(a, b, "{name}");
    }
    for (name, t) in adam.state_tensors().unwrap() {
        let a = t
            .flatten_all()
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let b = loaded.optimizer[&name]
            .flatten_all()
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        assert_eq!(a, b, "{name}");
    }
    // A flipped byte in the newest checkpoint: it is skipped, the previous one loads.
    let newest = dir
        .path()
        .join("checkpoints/step-00000004/model.safetensors");
    let mut bytes = std::fs::read(&newest).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&newest, bytes).unwrap();
    assert!(
        checkpoint::load_dir(&dir.path().join("checkpoints/step-00000004"), &Device::Cpu)
            .err()
            .unwrap()
            .to_string()
            .contains("checksum")
    );
    assert_eq!(
        checkpoint::load_latest(dir.path(), &Device::Cpu)
            .unwrap()
            .state
            .step,
        3
    );
    // Loading into another model shape is refused, naming the tensor.
    let other = small(64, 16, true);
    let err = Params::from_tensors(&other, loaded.model, DType::F32, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("transformer.wpe.weight") && err.contains("shape"),
        "{err}"
    );
}

#[test]
fn eval_loss_equals_the_training_loss() {
    let cfg = small(64, 8, true);
    let params = Params::init(&cfg, 3, DType::F32, &Device::Cpu).unwrap();
    let model = Gpt::new(&cfg, &params).unwrap();
    let (x, y) = (random_ids(3, 8, 64, 5), random_ids(3, 8, 64, 6));
    let train = model
        .loss(&x, &y, None)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let eval = model.eval_loss(&x, &y).unwrap().to_scalar::<f32>().unwrap();
    assert_eq!(train, eval);
}

#[test]
fn training_loss_adds_the_z_loss_of_the_models_logits() {
    // In f64, against the composed reference from the model's own logits: objective =
    // CE + z · mean(logsumexp(logits)²), in value and in every parameter's gradient.
    let cfg = small(64, 8, true);
    let params = Params::init(&cfg, 4, DType::F64, &Device::Cpu).unwrap();
    let model = Gpt::new(&cfg, &params).unwrap();
    let (x, y) = (random_ids(3, 8, 64, 7), random_ids(3, 8, 64, 8));
    let z_loss = 0.3;
    let terms = model.training_loss(&x, &y, None, z_loss).unwrap();
    let logits = model.forward(&x, None).unwrap().flatten_to(1).unwrap();
    let ce = cross_entropy(&logits, &y.flatten_all().unwrap()).unwrap();
    let term = (logits
        .log_sum_exp(1)
        .unwrap()
        .sqr()
        .unwrap()
        .mean_all()
        .unwrap()
        * z_loss)
        .unwrap();
    let reference = (&ce + &term).unwrap();
    let value = |t: &Tensor| t.to_scalar::<f64>().unwrap();
    assert!((value(&terms.objective) - value(&reference)).abs() < 1e-12);
    assert!((value(&terms.cross_entropy) - value(&ce)).abs() < 1e-12);
    assert!((value(terms.z_loss.as_ref().unwrap()) - value(&term)).abs() < 1e-12);
    assert!(
        value(&term) > 1e-3,
        "a z-term too small to test: {}",
        value(&term)
    );
    let (got, want) = (
        terms.objective.backward().unwrap(),
        reference.backward().unwrap(),
    );
    for (name, var) in params.named_vars() {
        let a: Vec<f64> = got
            .get(var.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let b: Vec<f64> = want
            .get(var.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let worst = a
            .iter()
            .zip(&b)
            .map(|(p, q)| (p - q).abs())
            .fold(0.0, f64::max);
        assert!(worst < 1e-12, "{name}: {worst:e}");
    }
    // Without a z-loss the objective is the loss itself.
    let plain = model.training_loss(&x, &y, None, 0.0).unwrap();
    assert!(plain.z_loss.is_none());
    assert_eq!(
        value(&plain.objective),
        value(&model.loss(&x, &y, None).unwrap())
    );
}
