//! `gpt-pretrain prepare` end to end, against fixtures and a reference stream written by
//! tests/fixtures/prepare/make_fixtures.py with Hugging Face `tokenizers`, pyarrow and zstandard.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::Output;

fn fixtures() -> PathBuf {
    prepare_fixtures()
}

fn expected() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join("expected.json")).unwrap())
        .unwrap()
}

/// `prepare` on the fixtures, in expected.json's input order.
fn prepare(out: &Path, extra: &[&str], env: &[(&str, &str)]) -> Output {
    let order: Vec<&str> = vec!["docs.jsonl", "docs.jsonl.zst", "docs.parquet", "doc.txt"];
    assert_eq!(expected()["inputs"], serde_json::json!(order));
    prepare_fixture_documents(out, extra, env)
}

/// A shard read by hand from llm.c's layout (data_common.py): 256 little-endian int32, magic
/// 20240520, version 1, count; then count little-endian uint16.
fn read_llmc_u16(path: &Path) -> Vec<u32> {
    let bytes = std::fs::read(path).unwrap();
    let int = |i: usize| i32::from_le_bytes(bytes[4 * i..4 * i + 4].try_into().unwrap());
    assert_eq!((int(0), int(1)), (20240520, 1), "{}", path.display());
    assert!(bytes[12..1024].iter().all(|&b| b == 0));
    let count = int(2) as usize;
    assert_eq!(bytes.len(), 1024 + 2 * count, "{}", path.display());
    bytes[1024..]
        .chunks_exact(2)
        .map(|b| u16::from_le_bytes([b[0], b[1]]) as u32)
        .collect()
}

/// The shard files of a prepared directory, name → SHA-256 of its bytes.
fn shard_bytes(dir: &Path) -> Vec<(String, String)> {
    let mut files: Vec<(String, String)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "bin"))
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            (name, gpt_pretrain::fsutil::sha256_file(&p).unwrap())
        })
        .collect();
    files.sort();
    files
}

fn manifest(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("manifest.json")).unwrap()).unwrap()
}

#[test]
fn shards_hold_hf_tokenizers_ids_with_end_of_text_before_each_document() {
    let ws = Workspace::new();
    let out = ws.path("fx");
    ok(&prepare(
        &out,
        &["--shard-tokens", "1000", "--val-tokens", "300"],
        &[],
    ));
    let expected = expected();
    let stream: Vec<u32> = expected["stream"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    // 2,496 tokens: a 300-token validation shard, then training shards of 1,000.
    let names: Vec<String> = shard_bytes(&out).into_iter().map(|(n, _)| n).collect();
    assert_eq!(
        names,
        [
            "fx_train_000001.bin",
            "fx_train_000002.bin",
            "fx_train_000003.bin",
            "fx_val_000000.bin"
        ]
    );
    let read = |name: &str| read_llmc_u16(&out.join(name));
    let val = read("fx_val_000000.bin");
    let train: Vec<u32> = (1..=3)
        .flat_map(|i| read(&format!("fx_train_{i:06}.bin")))
        .collect();
    assert_eq!(val.len(), 300);
    assert_eq!(read("fx_train_000003.bin").len(), stream.len() - 2300);
    assert_eq!([val, train].concat(), stream);

    let m = manifest(&out);
    assert_eq!(m["documents"], expected["documents"]);
    assert_eq!(m["tokens"].as_u64().unwrap(), stream.len() as u64);
    assert_eq!(m["val_tokens_written"], 300);
    assert_eq!(m["max_token_id"], 50256);
    assert_eq!(
        m["documents_with_literal_end_of_text"],
        expected["documents_with_literal_end_of_text"]
    );
    // Every bad record counted and located (locations end with the fixtures' file:line / row).
    let skips = m["skips"].as_array().unwrap();
    let want = expected["skips"].as_array().unwrap();
    assert_eq!(skips.len(), want.len(), "{skips:?}");
    for (got, want) in skips.iter().zip(want) {
        let location = got["location"].as_str().unwrap();
        assert!(
            location.ends_with(want["location"].as_str().unwrap()),
            "{got} vs {want}"
        );
        assert!(
            got["reason"]
                .as_str()
                .unwrap()
                .starts_with(want["kind"].as_str().unwrap()),
            "{got} vs {want}"
        );
    }
    assert_eq!(m["skipped"].as_u64().unwrap(), want.len() as u64);
    // Each shard's recorded hash is its file's.
    for shard in m["shards"].as_array().unwrap() {
        let file = out.join(shard["file"].as_str().unwrap());
        assert_eq!(
            shard["sha256"].as_str().unwrap(),
            gpt_pretrain::fsutil::sha256_file(&file).unwrap()
        );
    }
    // Documents cut into pieces of about 40 bytes (as documents over 1 MB are) give the same
    // stream: the cuts never change a token.
    let pieces = ws.path("pieces");
    ok(&prepare(
        &pieces,
        &[
            "--shard-tokens",
            "1000",
            "--val-tokens",
            "300",
            "--name",
            "fx",
        ],
        &[("GPT_PRETRAIN_PIECE_BYTES", "40")],
    ));
    assert_eq!(shard_bytes(&pieces), shard_bytes(&out));
    // Our reader agrees with the hand-written one.
    let file = gpt_pretrain::data::shards::TokenFile::open(
        &out.join("fx_val_000000.bin"),
        gpt_pretrain::data::shards::DataFormat::Llmc,
        50257,
    )
    .unwrap();
    assert_eq!(file.len(), 300);
    assert_eq!(
        (0..300).map(|i| file.token(i)).collect::<Vec<_>>(),
        stream[..300]
    );
}

#[test]
fn shards_are_byte_identical_at_any_thread_count_and_after_an_abort() {
    let ws = Workspace::new();
    let args = [
        "--shard-tokens",
        "700",
        "--val-tokens",
        "250",
        "--name",
        "fx",
    ];
    let one = ws.path("one");
    ok(&prepare(
        &one,
        &[&args[..], &["--threads", "1"]].concat(),
        &[],
    ));
    let two = ws.path("two");
    ok(&prepare(
        &two,
        &[&args[..], &["--threads", "2"]].concat(),
        &[],
    ));
    let reference = shard_bytes(&one);
    assert_eq!(reference.len(), 5);
    assert_eq!(shard_bytes(&two), reference);
    // Aborted (no cleanup, as under kill -9) at a shard boundary, inside a shard, and inside
    // the validation shard; the same command again finishes with the same bytes.
    for at in ["950", "1200", "100"] {
        let dir = ws.path(&format!("abort-{at}"));
        let out = prepare(&dir, &args, &[("GPT_PRETRAIN_PREPARE_ABORT_AT_TOKEN", at)]);
        assert!(
            !out.status.success(),
            "the abort at token {at} did not happen"
        );
        assert!(!dir.join("manifest.json").exists());
        ok(&prepare(&dir, &args, &[]));
        assert_eq!(shard_bytes(&dir), reference, "after an abort at token {at}");
        // No temporary or progress file is left.
        let left: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with('.'))
            .collect();
        assert!(left.is_empty(), "{left:?}");
        let (a, b) = (manifest(&one), manifest(&dir));
        for key in [
            "documents",
            "tokens",
            "skipped",
            "skips",
            "shards",
            "max_token_id",
        ] {
            assert_eq!(a[key], b[key], "{key} after an abort at token {at}");
        }
    }
}

#[test]
fn prepare_refuses_bad_inputs_and_foreign_output_directories() {
    let ws = Workspace::new();
    let out = ws.path("fx");
    let args = ["--shard-tokens", "1000", "--val-tokens", "300"];
    ok(&prepare(&out, &args, &[]));
    let before = shard_bytes(&out);
    // The same command again is a no-op.
    ok(&prepare(&out, &args, &[]));
    // Another tokenizer or other sizes into the same directory: refused, nothing touched.
    let bpe = project_root().join("configs/lr-study/gutenberg-bpe-8192.json");
    let other_tokenizer = bin()
        .args(["prepare", "--quiet", "--out"])
        .arg(&out)
        .arg(fixtures().join("docs.jsonl"))
        .arg("--tokenizer")
        .arg(&bpe)
        .output()
        .unwrap();
    fails_with(
        &other_tokenizer,
        "already holds shards from another prepare",
    );
    fails_with(
        &prepare(&out, &["--shard-tokens", "900", "--val-tokens", "300"], &[]),
        "shard or validation sizes",
    );
    assert_eq!(shard_bytes(&out), before);
    // A directory with .bin files no manifest describes.
    let foreign = ws.path("foreign");
    std::fs::create_dir_all(&foreign).unwrap();
    std::fs::write(foreign.join("train.bin"), [0u8; 4]).unwrap();
    fails_with(
        &prepare(&foreign, &args, &[]),
        "which no prepare manifest describes",
    );
    assert_eq!(std::fs::read(foreign.join("train.bin")).unwrap(), [0u8; 4]);

    let run = |inputs: &[&Path], extra: &[&str]| {
        bin()
            .arg("prepare")
            .args(inputs)
            .arg("--out")
            .arg(ws.path("new"))
            .arg("--tokenizer-path")
            .arg(gpt2_tokenizer())
            .args(["--quiet", "--shard-tokens", "1000"])
            .args(extra)
            .output()
            .unwrap()
    };
    let parquet = fixtures().join("docs.parquet");
    fails_with(
        &run(&[&parquet], &["--text-field", "body"]),
        "has no column 'body' (its columns: id, text)",
    );
    fails_with(&run(&[&ws.path("nowhere.jsonl")], &[]), "does not exist");
    fails_with(&run(&[&ws.path("*.parquet")], &[]), "matches no");
    let csv = ws.path("table.csv");
    std::fs::write(&csv, "a,b\n").unwrap();
    fails_with(
        &run(&[&csv], &[]),
        "is not a .txt, .jsonl, .jsonl.zst or .parquet file",
    );
    let empty = ws.path("empty.jsonl");
    std::fs::write(&empty, "\n{\"text\": \"\"}\n").unwrap();
    fails_with(
        &run(&[&empty], &[]),
        "the inputs hold no documents to prepare (2 records skipped",
    );
    fails_with(
        &run(&[&fixtures().join("doc.txt")], &["--val-tokens", "100000"]),
        "nothing is left for training",
    );
    fails_with(
        &run(&[&parquet], &["--tokenizer", "byte"]),
        "the byte tokenizer has none",
    );
    assert!(!ws.path("new").join("manifest.json").exists());
}

#[test]
fn a_malformed_record_stops_prepare_naming_file_and_line_unless_skipped() {
    let ws = Workspace::new();
    let prepare_one = |input: &Path, out: &str, extra: &[&str]| {
        bin()
            .arg("prepare")
            .arg(input)
            .arg("--out")
            .arg(ws.path(out))
            .arg("--tokenizer-path")
            .arg(gpt2_tokenizer())
            .args(["--shard-tokens", "1000", "--val-tokens", "20"])
            .args(extra)
            .output()
            .unwrap()
    };
    // docs.jsonl's line 13 is not JSON; lines 14-16 are malformed too, line 17 is blank.
    let docs = fixtures().join("docs.jsonl");
    fails_with(
        &prepare_one(&docs, "strict", &["--quiet"]),
        "docs.jsonl:13: not a JSON object (",
    );
    assert!(!ws.path("strict/manifest.json").exists());
    // Opted out: every skip named in the summary, with its reason.
    let out = prepare_one(&docs, "lenient", &["--skip-bad-records"]);
    let summary = ok(&out);
    for (line, reason) in [
        (13, "not a JSON object"),
        (14, "no field 'text'"),
        (15, "field 'text' is not a string"),
        (16, "invalid UTF-8 at byte"),
        (17, "blank line"),
    ] {
        assert!(
            summary.contains(&format!("docs.jsonl:{line}: {reason}")),
            "{summary}"
        );
    }
    assert!(summary.contains("skipped records: 5 ("), "{summary}");
    // Empty documents are skipped without the flag, and named.
    let empty = ws.path("empty.jsonl");
    let text = std::fs::read_to_string(fixtures().join("doc.txt")).unwrap();
    let record = serde_json::json!({ "text": text }).to_string();
    std::fs::write(
        &empty,
        format!("{record}\n\n{{\"text\": \"\"}}\n{record}\n"),
    )
    .unwrap();
    let summary = ok(&prepare_one(&empty, "empty", &[]));
    assert!(
        summary.contains("skipped records: 2 (")
            && summary.contains("empty.jsonl:2: blank line")
            && summary.contains("empty.jsonl:3: empty text"),
        "{summary}"
    );
}
