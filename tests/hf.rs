//! Hugging Face interop against a fixture written by `scripts/hf_fixtures.py` with transformers:
//! a tiny random `GPT2LMHeadModel` saved by `save_pretrained` (`tests/fixtures/hf/tiny-gpt2/`) and
//! its logits on a fixed input (`tiny-gpt2-logits.json`).

mod common;

use candle_core::{Device, Tensor};
use common::*;
use gpt_pretrain::model::hf;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf/tiny-gpt2")
}

fn fixture_logits() -> (Vec<Vec<u32>>, Vec<f64>) {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf/tiny-gpt2-logits.json");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let ids = serde_json::from_value(v["input_ids"].clone()).unwrap();
    let logits: Vec<Vec<Vec<f64>>> = serde_json::from_value(v["logits"].clone()).unwrap();
    (ids, logits.into_iter().flatten().flatten().collect())
}

/// Our logits for `ids` from the weights in an HF directory.
fn our_logits(dir: &Path, ids: &[Vec<u32>]) -> Vec<f64> {
    let cfg = hf::read_config(dir).unwrap();
    let params = hf::read_weights(dir, &cfg, &Device::Cpu).unwrap();
    let model = gpt_pretrain::model::Gpt::new(&cfg, &params).unwrap();
    let input = Tensor::new(ids.to_vec(), &Device::Cpu).unwrap();
    let logits = model.forward(&input, None).unwrap();
    logits
        .flatten_all()
        .unwrap()
        .to_dtype(candle_core::DType::F64)
        .unwrap()
        .to_vec1()
        .unwrap()
}

#[test]
fn transformers_weights_load_and_give_the_fixture_logits() {
    let cfg = hf::read_config(&fixture_dir()).unwrap();
    assert_eq!(
        (
            cfg.n_layer,
            cfg.n_head,
            cfg.n_embd,
            cfg.block_size,
            cfg.vocab_size
        ),
        (2, 2, 32, 32, 256)
    );
    let (ids, expected) = fixture_logits();
    let diff = max_abs_diff(&our_logits(&fixture_dir(), &ids), &expected);
    eprintln!("fixture logits: max |ours - transformers| = {diff:e}");
    assert!(diff < 1e-4, "logits differ from transformers by {diff:e}");
}

/// Tensor names and shapes of a safetensors file.
fn layout(path: &Path) -> BTreeMap<String, Vec<usize>> {
    candle_core::safetensors::load(path, &Device::Cpu)
        .unwrap()
        .into_iter()
        .map(|(k, t)| (k, t.dims().to_vec()))
        .collect()
}

fn config_keys(path: &Path) -> Vec<String> {
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut keys: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
    keys.sort();
    keys
}

/// Trains the fixture's shape (2 layers, 32 wide, block 32, byte vocabulary) for a few steps.
fn trained_run(ws: &Workspace, extra: &str) -> PathBuf {
    let mut table: toml::Table = toml::from_str("max_steps = 6\neval_interval = 6").unwrap();
    table.extend(toml::from_str::<toml::Table>(extra).unwrap());
    let cfg = ws.config(
        "c",
        &common::tinyshakespeare(),
        &toml::to_string(&table).unwrap(),
    );
    ok(&ws.train(&["--config", cfg.to_str().unwrap(), "--out", "run"]));
    ws.path("run")
}

fn export(run: &Path, out: &Path) {
    ok(&bin()
        .args([
            "export",
            run.to_str().unwrap(),
            "--hf",
            out.to_str().unwrap(),
        ])
        .output()
        .unwrap());
}

#[test]
fn export_matches_the_transformers_layout_and_reloads_exactly() {
    let ws = Workspace::new();
    for (name, extra) in [("bias", ""), ("nobias", "bias = false")] {
        let run = {
            let ws_run = ws.path(name);
            let cfg = ws.config(
                name,
                &common::tinyshakespeare(),
                &format!("max_steps = 6\neval_interval = 6\n{extra}"),
            );
            ok(&ws.train(&[
                "--config",
                cfg.to_str().unwrap(),
                "--out",
                ws_run.to_str().unwrap(),
            ]));
            ws_run
        };
        let out = ws.path(&format!("{name}-hf"));
        export(&run, &out);
        assert_eq!(
            layout(&out.join("model.safetensors")),
            layout(&fixture_dir().join("model.safetensors")),
            "{name}"
        );
        assert_eq!(
            config_keys(&out.join("config.json")),
            config_keys(&fixture_dir().join("config.json")),
            "{name}"
        );
        // The export read back gives the run's own logits.
        let (ids, _) = fixture_logits();
        let scorer = gpt_pretrain::tools::eval::Scorer::load(&run, &Device::Cpu).unwrap();
        let model = scorer.model().unwrap();
        let theirs: Vec<f64> = model
            .forward(&Tensor::new(ids.clone(), &Device::Cpu).unwrap(), None)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_dtype(candle_core::DType::F64)
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(
            max_abs_diff(&our_logits(&out, &ids), &theirs),
            0.0,
            "{name}"
        );
    }
}

#[test]
fn eval_scores_a_run_and_its_export_alike() {
    let ws = Workspace::new();
    let run = trained_run(&ws, "");
    let out = ws.path("hf");
    export(&run, &out);
    let text = ws.path("held-out.txt");
    let corpus = std::fs::read_to_string(common::tinyshakespeare()).unwrap();
    std::fs::write(&text, &corpus[corpus.len() - 3000..]).unwrap();
    let eval = |model: &Path, json: &str| -> serde_json::Value {
        ok(&bin()
            .args([
                "eval",
                model.to_str().unwrap(),
                "--data",
                text.to_str().unwrap(),
                "--stride",
                "16",
                "--out",
                json,
            ])
            .current_dir(ws.dir.path())
            .output()
            .unwrap());
        serde_json::from_str(&std::fs::read_to_string(ws.path(json)).unwrap()).unwrap()
    };
    let (a, b) = (eval(&run, "a.json"), eval(&out, "b.json"));
    assert_eq!(a["loss"], b["loss"]);
    assert_eq!(
        a["scored"], 2999,
        "every token after the first is scored once"
    );
    assert_eq!(a["block"], 32);
    let (loss, ppl) = (
        a["loss"].as_f64().unwrap(),
        a["perplexity"].as_f64().unwrap(),
    );
    assert!((ppl - loss.exp()).abs() < 1e-9);
    assert!(loss < 256f64.ln(), "a trained model beats uniform: {loss}");
}

#[test]
fn sliding_windows_score_each_token_once_by_hand() {
    // With the fixture model: the windowed loss equals the mean over positions of the loss each
    // token gets from one full-context pass when the text fits in one block.
    let scorer = gpt_pretrain::tools::eval::Scorer::load(&fixture_dir(), &Device::Cpu);
    // The fixture has no tokenizer.json: supply the byte tokenizer's.
    let dir = tempfile::tempdir().unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture_dir().join(f), dir.path().join(f)).unwrap();
    }
    std::fs::write(
        dir.path().join("tokenizer.json"),
        hf::byte_tokenizer_json().unwrap(),
    )
    .unwrap();
    assert!(scorer.is_err(), "the fixture lacks a tokenizer");
    let scorer = gpt_pretrain::tools::eval::Scorer::load(dir.path(), &Device::Cpu).unwrap();
    let text = dir.path().join("t.txt");
    std::fs::write(&text, "Hello, world, hello").unwrap(); // 19 bytes, fits in one block of 32
    let one =
        gpt_pretrain::tools::eval::evaluate_text(&scorer, &text, Some(32), Some(16), &Device::Cpu)
            .unwrap();
    let many =
        gpt_pretrain::tools::eval::evaluate_text(&scorer, &text, Some(8), Some(1), &Device::Cpu)
            .unwrap();
    assert_eq!(one.scored, 18);
    assert_eq!(many.scored, 18);
    // By hand: one pass, mean of -log p(token | prefix).
    let model = scorer.model().unwrap();
    let ids: Vec<u32> = "Hello, world, hello".bytes().map(u32::from).collect();
    let logits = model
        .forward(
            &Tensor::new(&ids[..18], &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap(),
            None,
        )
        .unwrap();
    let loss = gpt_pretrain::ops::cross_entropy::cross_entropy(
        &logits.squeeze(0).unwrap(),
        &Tensor::new(&ids[1..], &Device::Cpu).unwrap(),
    )
    .unwrap()
    .to_scalar::<f32>()
    .unwrap() as f64;
    assert!((one.loss - loss).abs() < 1e-6, "{} vs {loss}", one.loss);
    // Short windows see less context: a different (here, any finite) loss.
    assert!(many.loss.is_finite() && (many.loss - one.loss).abs() > 1e-6);
}

#[test]
fn byte_tokenizer_json_reproduces_byte_ids() {
    let json = hf::byte_tokenizer_json().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokenizer.json");
    std::fs::write(&path, json).unwrap();
    let tok = gpt_pretrain::data::tokenizer::Tokenizer::from_file(&path).unwrap();
    let text = "naïve  café\n\tend — 東京 <|endoftext|>";
    let ids = tok.encode(text).unwrap();
    assert_eq!(ids, text.bytes().map(u32::from).collect::<Vec<_>>());
    assert_eq!(tok.decode(&ids).unwrap(), text);
    assert_eq!(tok.vocab_size(), 256);
}

#[test]
fn init_from_a_transformers_directory_starts_from_its_weights() {
    let ws = Workspace::new();
    // A learning rate of 1e-12 leaves the weights where they started, to within rounding.
    let run = trained_run(
        &ws,
        &format!(
            "init_from = \"{}\"\nlr = 1e-12\nmin_lr = 0.0\nmax_steps = 2\nwarmup_steps = 0",
            fixture_dir().display()
        ),
    );
    let header: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("run.json")).unwrap()).unwrap();
    assert_eq!(
        header["model"]["vocab_size"], 256,
        "no padding rows for pretrained weights"
    );
    let out = ws.path("hf");
    export(&run, &out);
    let (ids, expected) = fixture_logits();
    let diff = max_abs_diff(&our_logits(&out, &ids), &expected);
    assert!(diff < 1e-4, "{diff:e}");

    // A shape that disagrees with the weights, and Hub weights that are not available offline.
    let bad = ws.config(
        "bad",
        &common::tinyshakespeare(),
        &format!("init_from = \"{}\"\nn_layer = 3", fixture_dir().display()),
    );
    fails_with(
        &ws.train(&["--config", bad.to_str().unwrap(), "--out", "bad"]),
        "n_layer = 3 disagrees with init_from",
    );
    let hub = ws.config(
        "hub",
        &common::tinyshakespeare(),
        "init_from = \"gpt2-medium\"",
    );
    let out = bin()
        .current_dir(ws.dir.path())
        .env("HF_HOME", ws.path("empty-hf"))
        .args(["train", "--config", hub.to_str().unwrap(), "--out", "hub"])
        .output()
        .unwrap();
    fails_with(&out, "not in the Hugging Face cache");
}

/// A Python with transformers and torch: `$GPT_PRETRAIN_PYTHON`, else `python3`.
fn python_with_transformers() -> Option<String> {
    let candidates = [
        std::env::var("GPT_PRETRAIN_PYTHON").ok(),
        Some("python3".into()),
    ];
    candidates.into_iter().flatten().find(|py| {
        Command::new(py)
            .args(["-c", "import torch, transformers"])
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

#[test]
fn transformers_loads_the_export_with_the_same_logits() {
    let Some(python) = python_with_transformers() else {
        eprintln!("skipped transformers_loads_the_export_with_the_same_logits: no python with torch and transformers (set GPT_PRETRAIN_PYTHON)");
        return;
    };
    let ws = Workspace::new();
    let run = trained_run(&ws, "");
    let out = ws.path("hf");
    export(&run, &out);
    let text = "ROMEO: What, ho! naïve";
    let script = r#"
import json, sys, torch
from transformers import AutoTokenizer, GPT2LMHeadModel
tok = AutoTokenizer.from_pretrained(sys.argv[1])
ids = tok(sys.argv[2])["input_ids"]
model = GPT2LMHeadModel.from_pretrained(sys.argv[1]).eval()
with torch.no_grad():
    logits = model(torch.tensor([ids])).logits[0]
print(json.dumps({"ids": ids, "logits": logits.flatten().tolist()}))
"#;
    let output = Command::new(&python)
        .args(["-c", script, out.to_str().unwrap(), text])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    let v: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    let ids: Vec<u32> = serde_json::from_value(v["ids"].clone()).unwrap();
    assert_eq!(
        ids,
        text.bytes().map(u32::from).collect::<Vec<_>>(),
        "tokenizer ids differ"
    );
    let theirs: Vec<f64> = serde_json::from_value(v["logits"].clone()).unwrap();
    let diff = max_abs_diff(&our_logits(&out, &[ids]), &theirs);
    eprintln!("export in transformers: max |ours - transformers| = {diff:e}");
    assert!(
        diff < 1e-4,
        "transformers' logits differ from ours by {diff:e}"
    );
}

#[test]
fn older_checkpoint_layouts_load_too() {
    // The released GPT-2 files name tensors without the `transformer.` prefix and carry the
    // causal-mask buffers `attn.bias` / `attn.masked_bias` and sometimes `lm_head.weight`.
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixture_dir().join("config.json"),
        dir.path().join("config.json"),
    )
    .unwrap();
    let mut tensors = std::collections::HashMap::new();
    for (name, t) in
        candle_core::safetensors::load(fixture_dir().join("model.safetensors"), &Device::Cpu)
            .unwrap()
    {
        if name == "transformer.wte.weight" {
            tensors.insert("lm_head.weight".to_string(), t.clone());
        }
        tensors.insert(name.strip_prefix("transformer.").unwrap().to_string(), t);
    }
    for i in 0..2 {
        let mask = Tensor::tril2(32, candle_core::DType::F32, &Device::Cpu)
            .unwrap()
            .reshape((1, 1, 32, 32))
            .unwrap();
        tensors.insert(format!("h.{i}.attn.bias"), mask);
        tensors.insert(
            format!("h.{i}.attn.masked_bias"),
            Tensor::new(-1e4f32, &Device::Cpu).unwrap(),
        );
    }
    candle_core::safetensors::save(&tensors, dir.path().join("model.safetensors")).unwrap();
    let (ids, expected) = fixture_logits();
    let diff = max_abs_diff(&our_logits(dir.path(), &ids), &expected);
    assert!(diff < 1e-4, "{diff:e}");
    // A tensor the model does not have is an error naming it.
    tensors.insert(
        "h.0.attn.extra".to_string(),
        Tensor::new(1f32, &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&tensors, dir.path().join("model.safetensors")).unwrap();
    let cfg = hf::read_config(dir.path()).unwrap();
    let err = hf::read_weights(dir.path(), &cfg, &Device::Cpu)
        .err()
        .unwrap();
    assert!(
        format!("{err:#}").contains("transformer.h.0.attn.extra"),
        "{err:#}"
    );
}
