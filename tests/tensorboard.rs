//! The TensorBoard event files a run writes, read back by TensorBoard's own EventAccumulator
//! (tests/fixtures/read_tensorboard.py), against metrics.jsonl: the same scalars at the same steps,
//! also after a crash and a resume.

mod common;

use common::*;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A python with the `tensorboard` package: $TENSORBOARD_PYTHON, else the virtual environment
/// scripts/setup.sh makes. Its absence fails the test, saying how to get it.
fn tensorboard_python() -> PathBuf {
    if let Ok(p) = std::env::var("TENSORBOARD_PYTHON") {
        return PathBuf::from(p);
    }
    let venv = project_root().join(".venv-tensorboard/bin/python");
    assert!(
        venv.is_file(),
        "no python with tensorboard: run bash scripts/setup.sh (it makes .venv-tensorboard) or set TENSORBOARD_PYTHON"
    );
    venv
}

/// Every line the TensorBoard reader prints for the run's event files.
fn tensorboard_lines(run: &Path) -> Vec<serde_json::Value> {
    let out = Command::new(tensorboard_python())
        .arg(project_root().join("tests/fixtures/read_tensorboard.py"))
        .arg(run)
        .output()
        .unwrap();
    ok(&out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// (tag, step) → value, as TensorBoard reads the run's event files.
fn tensorboard_scalars(run: &Path) -> BTreeMap<(String, u64), f64> {
    let mut scalars = BTreeMap::new();
    for v in tensorboard_lines(run) {
        if v.get("text").is_some() {
            continue;
        }
        let key = (
            v["tag"].as_str().unwrap().to_string(),
            v["step"].as_u64().unwrap(),
        );
        assert!(
            scalars
                .insert(key.clone(), v["value"].as_f64().unwrap())
                .is_none(),
            "{key:?} twice"
        );
    }
    scalars
}

/// (split/field, step) → value for every number in metrics.jsonl but step and tokens.
fn metrics_scalars(run: &Path) -> BTreeMap<(String, u64), f64> {
    let mut scalars = BTreeMap::new();
    for v in read_json_lines(&run.join("metrics.jsonl")) {
        let step = v["step"].as_u64().unwrap();
        let split = v["split"].as_str().unwrap().to_string();
        for (k, x) in v.as_object().unwrap() {
            if let (false, Some(x)) = (
                matches!(k.as_str(), "step" | "tokens" | "split"),
                x.as_f64(),
            ) {
                let key = (format!("{split}/{k}"), step);
                assert!(scalars.insert(key.clone(), x).is_none(), "{key:?} twice");
            }
        }
    }
    scalars
}

fn assert_same_scalars(run: &Path) {
    let (tb, metrics) = (tensorboard_scalars(run), metrics_scalars(run));
    assert_eq!(
        tb.keys().collect::<Vec<_>>(),
        metrics.keys().collect::<Vec<_>>(),
        "different (tag, step) sets"
    );
    for (key, m) in &metrics {
        // TensorBoard keeps f32.
        let t = tb[key];
        assert!(
            (t - m).abs() <= 1e-6 * m.abs().max(1e-30),
            "{key:?}: TensorBoard {t}, metrics.jsonl {m}"
        );
    }
    for tag in [
        "train/loss",
        "train/lr",
        "train/grad_norm",
        "train/tok_per_s",
        "val/loss",
    ] {
        assert!(tb.keys().any(|(t, _)| t == tag), "no {tag}");
    }
}

#[test]
fn tensorboard_scalars_equal_the_metrics_also_after_a_crash_and_resume() {
    let ws = Workspace::new();
    let corpus = tinyshakespeare();
    let cfg = ws.config(
        "tb",
        &corpus,
        "max_steps = 12\neval_interval = 4\noptimizer = \"adamw\"",
    );
    let cfg = cfg.to_str().unwrap();
    ok(&ws.train(&["--config", cfg, "--out", "whole"]));
    assert_same_scalars(&ws.path("whole"));

    // The checkpoint of step 8 fails: steps 5-8 are logged, the run restarts from step 4, and
    // TensorBoard must drop the first attempt's steps 5-8 as metrics.jsonl sets them aside.
    let out = ws.train_env(
        &["--config", cfg, "--out", "crashed"],
        &[("GPT_PRETRAIN_ENOSPC_AT_STEP", "8")],
    );
    assert!(!out.status.success());
    let crashed = ws.path("crashed");
    assert!(metrics_scalars(&crashed).contains_key(&("train/loss".to_string(), 8)));
    ok(&ws.train(&["--resume", "crashed"]));
    let events = std::fs::read_dir(&crashed)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with("events.out.tfevents.")
        })
        .count();
    assert_eq!(events, 2, "one event file per session");
    assert_same_scalars(&crashed);
    // The resumed history is the uninterrupted one.
    assert_eq!(
        train_losses(&crashed),
        train_losses(&ws.path("whole")),
        "resume is bitwise"
    );
}

#[test]
fn samples_during_training_reach_the_metrics_and_tensorboard_and_change_nothing() {
    let ws = Workspace::new();
    let corpus = tinyshakespeare();
    let cfg = ws.config("s", &corpus, "max_steps = 12\neval_interval = 4");
    let cfg = cfg.to_str().unwrap();
    ok(&ws.train(&["--config", cfg, "--out", "plain"]));
    let sampling = [
        "--set",
        "sample_interval=4",
        "--set",
        "sample_prompt=ROMEO:",
        "--set",
        "sample_tokens=16",
    ];
    let mut args = vec!["--config", cfg, "--out", "sampled"];
    args.extend(sampling);
    ok(&ws.train(&args));
    let (plain, sampled) = (ws.path("plain"), ws.path("sampled"));
    assert_eq!(train_losses(&plain), train_losses(&sampled));
    assert!(
        file_bytes(&plain, 12, "model.safetensors")
            == file_bytes(&sampled, 12, "model.safetensors")
    );
    let samples: Vec<serde_json::Value> = read_json_lines(&sampled.join("metrics.jsonl"))
        .into_iter()
        .filter(|v| v["split"] == "sample")
        .collect();
    assert_eq!(
        samples
            .iter()
            .map(|v| v["step"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        [4, 8, 12]
    );
    for s in &samples {
        assert_eq!(s["prompt"], "ROMEO:");
        // 16 byte tokens decode to at most 16 bytes (fewer where bytes do not form UTF-8).
        let text = s["text"].as_str().unwrap();
        assert!(!text.is_empty() && text.len() <= 16 * 3, "{text:?}");
    }
    let texts: BTreeMap<(String, u64), String> = tensorboard_lines(&sampled)
        .into_iter()
        .filter_map(|v| {
            let text = v.get("text")?.as_str()?.to_string();
            Some(((v["tag"].as_str()?.to_string(), v["step"].as_u64()?), text))
        })
        .collect();
    for s in &samples {
        let step = s["step"].as_u64().unwrap();
        assert_eq!(
            texts[&("sample/text".to_string(), step)],
            s["text"].as_str().unwrap()
        );
        assert_eq!(texts[&("sample/prompt".to_string(), step)], "ROMEO:");
    }
    assert_same_scalars(&sampled);
}
