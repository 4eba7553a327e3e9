//! Training from token files: llm.c shards (`prepare`'s and ones written by llm.c's own
//! `write_datafile`, via tests/fixtures/prepare/make_fixtures.py) and nanoGPT's `.bin` pair;
//! exact resume; and every bad file refused with a one-line error naming it.

mod common;

use common::*;
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    prepare_fixtures()
}

#[test]
fn prepare_writes_the_bytes_llm_c_writes() {
    // One 2,196-token training shard, as make_fixtures.py wrote it with llm.c's write_datafile.
    let ws = Workspace::new();
    let dir = ws.path("one-shard");
    let args = [
        "--shard-tokens",
        "10000",
        "--val-tokens",
        "300",
        "--name",
        "fx",
    ];
    ok(&prepare_fixture_documents(&dir, &args, &[]));
    for name in ["fx_val_000000.bin", "fx_train_000001.bin"] {
        assert!(
            std::fs::read(dir.join(name)).unwrap()
                == std::fs::read(fixtures().join("llmc").join(name)).unwrap(),
            "{name} differs from llm.c's write_datafile"
        );
    }
}

#[test]
fn training_on_shards_resumes_bitwise() {
    let ws = Workspace::new();
    let shards = prepared(&ws);
    let cfg = shard_config(&ws, "shards", &shards, "");
    ok(&ws.train(&["--config", &cfg, "--out", "whole"]));
    ok(&ws.train(&["--config", &cfg, "--out", "halves", "--set", "max_steps=10"]));
    ok(&ws.train(&["--resume", "halves", "--set", "max_steps=20"]));
    let (whole, halves) = (ws.path("whole"), ws.path("halves"));
    let losses = train_losses(&whole);
    assert_eq!(losses.len(), 20);
    assert_eq!(losses, train_losses(&halves));
    for file in ["model.safetensors", "optimizer.safetensors"] {
        assert!(
            file_bytes(&whole, 20, file) == file_bytes(&halves, 20, file),
            "{file} differs after resume"
        );
    }
    assert!(losses[19].1 < losses[0].1 - 0.5, "{losses:?}");
    // run.json names the files; the llm.c-written copies of the same stream (a glob, and
    // val_data) train to the same losses, since the windows index the same token stream.
    let run: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(whole.join("run.json")).unwrap()).unwrap();
    assert!(
        run["corpus"]
            .as_str()
            .unwrap()
            .contains("3 training and 1 validation token files"),
        "{run}"
    );
    let llmc = fixtures().join("llmc");
    let glob = shard_config(
        &ws,
        "llmc",
        &llmc.join("fx_train_*.bin"),
        &format!(
            "val_data = {:?}",
            llmc.join("fx_val_000000.bin").display().to_string()
        ),
    );
    ok(&ws.train(&["--config", &glob, "--out", "llmc"]));
    assert_eq!(train_losses(&ws.path("llmc")), losses);
}

#[test]
fn a_changed_shard_set_stops_resume() {
    let ws = Workspace::new();
    let shards = prepared(&ws);
    let cfg = shard_config(&ws, "shards", &shards, "max_steps = 10");
    ok(&ws.train(&["--config", &cfg, "--out", "run"]));
    std::fs::rename(shards.join("fx_train_000003.bin"), ws.path("moved.bin")).unwrap();
    fails_with(
        &ws.train(&["--resume", "run", "--set", "max_steps=20"]),
        "changed since the run started",
    );
}

#[test]
fn nanogpt_bin_files_train() {
    let ws = Workspace::new();
    let cfg = shard_config(
        &ws,
        "nanogpt",
        &fixtures().join("nanogpt"),
        "max_steps = 10",
    );
    ok(&ws.train(&["--config", &cfg, "--out", "run"]));
    let losses = train_losses(&ws.path("run"));
    assert_eq!(losses.len(), 10);
    // A single file with val_data names the same pair.
    let nanogpt = fixtures().join("nanogpt");
    let single = shard_config(
        &ws,
        "single",
        &nanogpt.join("train.bin"),
        &format!(
            "max_steps = 10\nval_data = {:?}",
            nanogpt.join("val.bin").display().to_string()
        ),
    );
    ok(&ws.train(&["--config", &single, "--out", "single"]));
    assert_eq!(train_losses(&ws.path("single")), losses);
}

#[test]
fn bad_token_files_are_refused_naming_the_file() {
    let ws = Workspace::new();
    let shards = prepared(&ws);
    let train = |name: &str, data: &Path, extra: &str| {
        let cfg = shard_config(&ws, name, data, extra);
        ws.train(&["--config", &cfg, "--out", name])
    };
    let copy = |name: &str, edit: &dyn Fn(&mut Vec<u8>)| -> PathBuf {
        let dir = ws.path(name);
        std::fs::create_dir_all(&dir).unwrap();
        for f in ["fx_val_000000.bin", "fx_train_000001.bin"] {
            let mut bytes = std::fs::read(shards.join(f)).unwrap();
            if f.contains("train") {
                edit(&mut bytes);
            }
            std::fs::write(dir.join(f), bytes).unwrap();
        }
        dir
    };
    let truncated = copy("truncated", &|b| b.truncate(b.len() - 2));
    fails_with(
        &train("t", &truncated, ""),
        "fx_train_000001.bin is 3022 bytes, but its header counts 1000 tokens",
    );
    let version = copy("version", &|b| b[4] = 2);
    fails_with(
        &train("v", &version, ""),
        "has llm.c's magic 20240520 but version 2 (expected 1)",
    );
    // The last token set to 60000 (> GPT-2's 50,257): found when the file is opened, wherever
    // it lies and whether or not a window would read it.
    let out_of_vocab = copy("oov", &|b| {
        let last = b.len() - 2;
        b[last..].copy_from_slice(&60000u16.to_le_bytes());
    });
    fails_with(
        &train("o", &out_of_vocab, ""),
        "fx_train_000001.bin holds id 60000 at token 999, outside the tokenizer's vocabulary of 50257",
    );
    let short = ws.path("short");
    std::fs::create_dir_all(&short).unwrap();
    std::fs::copy(
        shards.join("fx_val_000000.bin"),
        short.join("fx_val_000000.bin"),
    )
    .unwrap();
    std::fs::copy(
        shards.join("fx_train_000001.bin"),
        short.join("fx_train_000001.bin"),
    )
    .unwrap();
    fails_with(
        &train(
            "s",
            &short,
            "block_size = 512\nmodel = \"gpt2\"\nn_layer = 1\nn_head = 2\nn_embd = 32",
        ),
        "holds 300 tokens, fewer than one window of block_size + 1 = 513",
    );
    // Shards from prepare with another tokenizer than the run's.
    let cfg_bpe = format!(
        "tokenizer_path = {:?}",
        project_root()
            .join("configs/lr-study/gutenberg-bpe-8192.json")
            .display()
            .to_string()
    );
    fails_with(
        &train("b", &shards, &cfg_bpe),
        "were prepared with tokenizer gpt2",
    );
    fails_with(
        &train("n", &ws.path("nowhere/*.bin"), "val_data = \"x.bin\""),
        "matches no files",
    );
    fails_with(
        &train("m", &shards.join("fx_train_000001.bin"), ""),
        "names token files but no validation files: set val_data",
    );
    fails_with(
        &train("bpe", &shards, "tokenizer = \"bpe\""),
        "trains on a text corpus",
    );
}

#[test]
fn token_file_layouts_are_never_guessed_and_manifests_are_verified() {
    let ws = Workspace::new();
    let shards = prepared(&ws);
    let train = |name: &str, data: &Path, extra: &str| {
        let cfg = shard_config(&ws, name, data, extra);
        ws.train(&["--config", &cfg, "--out", name])
    };
    // A copy of the prepared directory with one training shard edited.
    let edited = |name: &str, with_manifest: bool, edit: &dyn Fn(&mut Vec<u8>)| -> PathBuf {
        let dir = ws.path(name);
        std::fs::create_dir_all(&dir).unwrap();
        for entry in std::fs::read_dir(&shards).unwrap() {
            let entry = entry.unwrap();
            let file = entry.file_name().to_string_lossy().into_owned();
            if file == "manifest.json" && !with_manifest {
                continue;
            }
            let mut bytes = std::fs::read(entry.path()).unwrap();
            if file == "fx_train_000001.bin" {
                edit(&mut bytes);
            }
            std::fs::write(dir.join(&file), bytes).unwrap();
        }
        dir
    };
    // One bit of the magic flipped (20240520 → 20240521): read as nanoGPT's layout, the header
    // would be 512 tokens of training data. Refused, with or without the manifest.
    let flip = |b: &mut Vec<u8>| b[0] ^= 1;
    fails_with(
        &train("flip", &edited("flipped", false, &flip), ""),
        "fx_train_000001.bin has a damaged llm.c header (first int32 20240521",
    );
    fails_with(
        &train("flipm", &edited("flipped-listed", true, &flip), ""),
        "fx_train_000001.bin is not an llm.c shard: its first int32 is 20240521",
    );
    // A token changed within the vocabulary: only the manifest's SHA-256 can tell.
    let retoken = |b: &mut Vec<u8>| b[1024] ^= 1;
    fails_with(
        &train("sum", &edited("changed", true, &retoken), ""),
        "but its manifest.json lists",
    );
    // A shard the manifest does not list.
    let extra = edited("extra", true, &|_| {});
    std::fs::copy(
        extra.join("fx_train_000001.bin"),
        extra.join("fx_train_000009.bin"),
    )
    .unwrap();
    fails_with(
        &train("unlisted", &extra, ""),
        "fx_train_000009.bin lies beside a prepare manifest.json that does not list it",
    );
    // A headerless file is nanoGPT's only under nanoGPT's names or with data_format.
    let nanogpt = fixtures().join("nanogpt");
    let renamed = ws.path("renamed");
    std::fs::create_dir_all(&renamed).unwrap();
    std::fs::copy(nanogpt.join("train.bin"), renamed.join("tokens.bin")).unwrap();
    let val = format!(
        "max_steps = 10\nval_data = {:?}",
        nanogpt.join("val.bin").display().to_string()
    );
    fails_with(
        &train("named", &renamed.join("tokens.bin"), &val),
        "tokens.bin has no llm.c header and is not named train.bin or val.bin",
    );
    ok(&train(
        "declared",
        &renamed.join("tokens.bin"),
        &format!("{val}\ndata_format = \"nanogpt\""),
    ));
    assert_eq!(
        train_losses(&ws.path("declared")),
        train_losses_of_nanogpt_fixture(&ws)
    );
    fails_with(
        &train(
            "wrong",
            &edited("plain", false, &|_| {}),
            "data_format = \"nanogpt\"",
        ),
        "starts with llm.c's header, but data_format = \"nanogpt\" says it has none",
    );
    fails_with(
        &train("listed", &shards, "data_format = \"nanogpt\""),
        "holds a prepare manifest.json, which describes llm.c shards",
    );
    fails_with(
        &train("text", &tinyshakespeare(), "data_format = \"llmc\""),
        "data_format goes with token files",
    );
    // The prepared directory itself, untouched, trains.
    ok(&train("intact", &shards, "max_steps = 5"));
}

/// nanoGPT's fixture pair trained for 10 steps by the workspace config.
fn train_losses_of_nanogpt_fixture(ws: &Workspace) -> Vec<(u64, f64)> {
    let cfg = shard_config(ws, "pair", &fixtures().join("nanogpt"), "max_steps = 10");
    ok(&ws.train(&["--config", &cfg, "--out", "pair"]));
    train_losses(&ws.path("pair"))
}
