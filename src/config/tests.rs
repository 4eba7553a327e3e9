//! The config's parsing, defaults and validation rules.
use super::*;

#[test]
fn keys_list_matches_struct_fields() {
    // Keys that are saved only when in use are put to use, with the keys they bring.
    let in_use: Vec<String> = [
        "schedule=wsd",
        "skip_loss_zscore=1",
        "diag_interval=1",
        "peak_flops=1e12",
        "sample_interval=1",
        "max_tokens=10000000",
        "z_loss=1e-4",
    ]
    .map(String::from)
    .to_vec();
    // A token budget's decay step is pinned when the run knows its ranks.
    let mut cfg = TrainConfig::from_layers(None, &in_use)
        .unwrap()
        .for_world(1)
        .unwrap();
    // Muon's keys, as a muon config resolves them.
    let muon = TrainConfig::from_layers(None, &["optimizer=\"muon\"".to_string()]).unwrap();
    cfg.momentum = muon.momentum;
    cfg.nesterov = muon.nesterov;
    cfg.ns_steps = muon.ns_steps;
    cfg.ns_coefficients = muon.ns_coefficients;
    cfg.adjust_lr = muon.adjust_lr;
    cfg.newton_schulz_dtype = muon.newton_schulz_dtype;
    cfg.adamw_lr = muon.adamw_lr;
    cfg.adamw_betas = muon.adamw_betas;
    cfg.adamw_eps = muon.adamw_eps;
    cfg.adamw_weight_decay = muon.adamw_weight_decay;
    cfg.tokenizer_path = Some("x".into());
    cfg.eval_batch_size = Some(1);
    cfg.val_data = Some("x".into());
    // The default `sampling`, `zero_stage` and `data_format` are left out of saved configs.
    cfg.sampling = crate::data::Sampling::Shuffled;
    cfg.data_format = crate::data::shards::DataFormat::NanoGpt;
    cfg.zero_stage = 1;
    let table = cfg.to_table().unwrap();
    let mut from_struct: Vec<&str> = table.keys().map(|k| k.as_str()).collect();
    // `decouple`, `clip_exponent` and `variant` are unset for AdamW, the default optimizer,
    // and one threshold of the spike policy is enough to bring its window.
    from_struct.extend(["decouple", "clip_exponent", "variant", "skip_grad_zscore"]);
    from_struct.sort();
    let mut listed = KEYS.to_vec();
    listed.sort();
    assert_eq!(from_struct, listed);
}

/// Every command reads a run back through `from_table` of the saved, resolved config, so a
/// config `train` accepted must resolve again, to itself.
#[test]
fn a_saved_config_loads_back_as_itself() {
    let cases: &[&[&str]] = &[
        &[],
        // A short run of a config with a longer warmup (lr_decay_steps defaults to 20).
        &["warmup_steps=50", "max_steps=20"],
        &["warmup_steps=50", "max_steps=50", "lr_decay_steps=10"],
        &["optimizer=adopt", "variant=\"original\""],
        &["optimizer=adopt", "clip_exponent=\"none\""],
        &["optimizer=adam", "schedule=\"constant\"", "warmup_steps=0"],
        &["init_from=\"gpt2\""],
        &["max_tokens=100000", "warmup_steps=10"],
    ];
    for overrides in cases {
        let overrides: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
        let fresh = TrainConfig::from_layers(None, &overrides).unwrap();
        let saved = fresh.to_table().unwrap();
        let loaded = TrainConfig::from_table(saved)
            .unwrap_or_else(|e| panic!("{overrides:?} does not load back: {e}"));
        assert_eq!(
            loaded.to_toml().unwrap(),
            fresh.to_toml().unwrap(),
            "{overrides:?}"
        );
    }
}

#[test]
fn overrides_parse_as_toml_or_bare_strings() {
    assert_eq!(
        parse_override("lr=3e-4").unwrap().1,
        toml::Value::Float(3e-4)
    );
    assert_eq!(
        parse_override("optimizer=adam").unwrap().1,
        toml::Value::String("adam".into())
    );
    assert_eq!(
        parse_override("betas=[0.9, 0.95]").unwrap().1,
        toml::Value::Array(vec![toml::Value::Float(0.9), toml::Value::Float(0.95)])
    );
    assert!(parse_override("lr").is_err());
}

#[test]
fn unset_optimizer_hyperparameters_take_that_optimizers_defaults() {
    let adopt = TrainConfig::from_layers(None, &["optimizer=adopt".into()]).unwrap();
    assert_eq!(adopt.betas, Some([0.9, 0.9999]));
    assert_eq!(adopt.eps, Some(1e-6));
    assert_eq!(adopt.weight_decay, Some(0.0));
    assert_eq!(adopt.clip_exponent, Some(ClipExponent::Exponent(0.25)));
    let adamw = TrainConfig::from_layers(None, &["optimizer=adamw".into()]).unwrap();
    assert_eq!(adamw.betas, Some([0.9, 0.999]));
    assert_eq!(adamw.eps, Some(1e-8));
    assert_eq!(adamw.weight_decay, Some(0.01));
    let adam = TrainConfig::from_layers(None, &["optimizer=adam".into()]).unwrap();
    assert_eq!(adam.weight_decay, Some(0.0));
    let none = TrainConfig::from_layers(
        None,
        &["optimizer=adopt".into(), "clip_exponent=\"none\"".into()],
    )
    .unwrap();
    assert_eq!(
        none.clip_exponent,
        Some(ClipExponent::Keyword(NoClip::None))
    );
}

#[test]
fn bad_values_are_rejected_with_the_key_named() {
    let err = |o: &[&str]| {
        let o: Vec<String> = o.iter().map(|s| s.to_string()).collect();
        TrainConfig::from_layers(None, &o).unwrap_err().to_string()
    };
    assert!(err(&["lr=-1"]).contains("lr must be"));
    assert!(err(&["betas=[0.9, 1.0]"]).contains("betas[1]"));
    assert!(err(&["block_size=4096"]).contains("larger than"));
    assert!(err(&["nonsense=1"]).contains("unknown config key 'nonsense'"));
    assert!(err(&["batch_size=0"]).contains("batch_size"));
    assert!(err(&["eval_batch_size=0"]).contains("eval_batch_size"));
    assert_eq!(
        err(&["optimizer=sgd"]),
        "bad value for 'optimizer' in the config: unknown variant `sgd`, expected one of \
         `adam`, `adamw`, `adopt`, `muon`"
    );
    assert!(err(&["lr=1e-3", "schedule=step"]).starts_with("bad value for 'schedule'"));
    assert!(err(&["decay_fraction=0.1"]).contains("apply to schedule = \"wsd\" only"));
    assert!(err(&["schedule=wsd", "decay_fraction=0"]).contains("decay_fraction must be"));
    assert!(err(&["schedule=wsd", "decay_shape=sqrt"]).starts_with("bad value for 'decay_shape'"));
    // 0.97 of 2000 steps leaves 60 steps before the decay, inside a 100-step warmup.
    assert!(
        err(&["schedule=wsd", "decay_fraction=0.97"]).contains("the wsd decay starts at step 60")
    );
    let wsd = TrainConfig::from_layers(None, &["schedule=wsd".into()]).unwrap();
    assert_eq!(
        (wsd.decay_fraction, wsd.decay_shape),
        (Some(0.2), Some(DecayShape::Linear))
    );
    let toml = wsd.to_toml().unwrap();
    assert!(toml.contains("decay_fraction = 0.2") && toml.contains("decay_shape = \"linear\""));
    let shape =
        TrainConfig::from_layers(None, &["schedule=wsd".into(), "decay_shape=1-sqrt".into()]);
    assert_eq!(shape.unwrap().decay_shape, Some(DecayShape::OneMinusSqrt));
    // Other schedules keep their saved configs (and checkpoint hashes) as they were.
    assert!(err(&["skip_loss_zscore=-1"]).contains("skip_loss_zscore must be"));
    assert!(err(&["zscore_window=64"]).contains("zscore_window applies only"));
    assert!(err(&["skip_grad_zscore=5", "zscore_window=1"]).contains("at least 2"));
    let spikes = TrainConfig::from_layers(None, &["skip_grad_zscore=5".into()]).unwrap();
    assert_eq!(spikes.zscore_window, Some(128));
    let cosine = TrainConfig::from_layers(None, &[])
        .unwrap()
        .to_toml()
        .unwrap();
    assert!(!cosine.contains("decay_fraction") && !cosine.contains("decay_shape"));
    assert!(!cosine.contains("zscore"));
    assert!(err(&["lr_decay_steps=50", "warmup_steps=60"])
        .contains("warmup_steps (60) exceeds lr_decay_steps (50) and max_steps (2000)"));
    // A run that ends inside its warmup never meets the drop, whether lr_decay_steps was
    // given or defaulted to max_steps.
    assert!(TrainConfig::from_layers(
        None,
        &[
            "lr_decay_steps=20".into(),
            "warmup_steps=50".into(),
            "max_steps=50".into()
        ]
    )
    .is_ok());
    assert!(TrainConfig::from_layers(
        None,
        &["lr_decay_steps=50".into(), "warmup_steps=50".into()]
    )
    .is_ok());
    assert!(err(&["optimizer=adam", "decouple=true"]).contains("adopt only"));
}

#[test]
fn a_token_budget_counts_the_tokens_of_every_rank() {
    // 10,000 tokens at batch 4 × accum 3 × block 64 = 768 tokens per step and process.
    let cfg = TrainConfig::from_layers(
        None,
        &[
            "model=\"tiny\"".into(),
            "block_size=64".into(),
            "batch_size=4".into(),
            "grad_accum=3".into(),
            "warmup_steps=2".into(),
            "max_tokens=10000".into(),
        ],
    )
    .unwrap();
    assert_eq!(cfg.max_steps, 14); // ⌈10000 / 768⌉
    assert_eq!(cfg.lr_decay_steps, None);
    let two = cfg.clone().for_world(2).unwrap();
    assert_eq!(two.max_steps, 7); // ⌈10000 / 1536⌉
    assert_eq!(two.lr_decay_steps, Some(7));
    // A resolved config resolves again to itself, pinned decay included.
    assert_eq!(two.clone().for_world(2).unwrap(), two);
    let one = cfg.for_world(1).unwrap();
    assert_eq!((one.max_steps, one.lr_decay_steps), (14, Some(14)));
}

#[test]
fn muon_fills_its_keys_and_refuses_the_adam_ones() {
    let muon = TrainConfig::from_layers(None, &["optimizer=\"muon\"".to_string()]).unwrap();
    assert_eq!(muon.lr, Some(0.02));
    assert_eq!(muon.momentum, Some(0.95));
    assert_eq!(muon.nesterov, Some(true));
    assert_eq!(muon.ns_coefficients, Some([3.4445, -4.775, 2.0315]));
    assert_eq!(muon.adamw_lr, Some(1e-3));
    assert_eq!(muon.adamw_betas, Some([0.9, 0.999]));
    assert_eq!(muon.betas, None);
    let err = |overrides: &[&str]| {
        let overrides: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
        TrainConfig::from_layers(None, &overrides)
            .unwrap_err()
            .to_string()
    };
    assert!(err(&["optimizer=\"muon\"", "betas=[0.9, 0.95]"]).contains("adamw_betas"));
    assert!(err(&["optimizer=\"adamw\"", "momentum=0.9"])
        .contains("momentum applies to optimizer = \"muon\" only"));
    assert!(err(&["optimizer=\"muon\"", "ns_steps=100"]).contains("ns_steps"));
    assert!(err(&["optimizer=\"muon\"", "adamw_betas=[0.9, 1.0]"]).contains("adamw_betas[1]"));
    assert!(err(&["optimizer=\"muon\"", "adjust_lr=\"other\""]).contains("adjust_lr"));
}
