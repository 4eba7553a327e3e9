//! Tokenizers and the token cache, against GPT-2's known ids and the data README's counts.

mod common;

use gpt_pretrain::data::tokenizer::Tokenizer;
use gpt_pretrain::data::{Corpus, Split, TokenData};

#[test]
fn gpt2_ids_match_openai() {
    let tok = Tokenizer::gpt2(Some(&common::gpt2_tokenizer())).unwrap();
    assert_eq!(tok.vocab_size(), 50257);
    assert_eq!(tok.encode("Hello world").unwrap(), vec![15496, 995]);
    assert_eq!(tok.encode("<|endoftext|>Hi").unwrap(), vec![50256, 17250]);
    let text = "First Citizen:\nBefore we proceed any further, hear me speak.\n\n";
    assert_eq!(tok.decode(&tok.encode(text).unwrap()).unwrap(), text);
}

#[test]
fn missing_tokenizer_path_is_named() {
    let err = Tokenizer::gpt2(Some(std::path::Path::new("/nonexistent/tokenizer.json")))
        .err()
        .unwrap();
    assert!(
        err.to_string().contains("/nonexistent/tokenizer.json"),
        "{err}"
    );
}

#[test]
fn byte_tokenizer_round_trips_utf8() {
    let tok = Tokenizer::Byte;
    let text = "naïve café — 東京";
    let ids = tok.encode(text).unwrap();
    assert_eq!(ids.len(), text.len());
    assert_eq!(ids[0], b'n' as u32);
    assert_eq!(tok.decode(&ids).unwrap(), text);
    // A cut multi-byte character decodes to U+FFFD instead of failing.
    assert!(tok
        .decode(&ids[..ids.len() - 1])
        .unwrap()
        .ends_with('\u{fffd}'));
}

#[test]
fn trained_bpe_has_the_requested_size_and_round_trips() {
    let corpus = Corpus::read(&common::tinyshakespeare()).unwrap();
    let train_text = corpus.training_text(0.1);
    let tok = Tokenizer::train_bpe(train_text, 512).unwrap();
    assert_eq!(tok.vocab_size(), 512);
    let sample = &corpus.text[corpus.text.len() - 2000..];
    let ids = tok.encode(sample).unwrap();
    assert_eq!(tok.decode(&ids).unwrap(), sample);
    // 256 merges buy real compression over bytes on held-out text.
    assert!(
        (ids.len() as f64) < 0.7 * sample.len() as f64,
        "{} tokens for {} bytes",
        ids.len(),
        sample.len()
    );
    assert_eq!(tok.encode("<|endoftext|>").unwrap().len(), 1);
}

#[test]
fn gpt2_token_cache_matches_the_reference_count_and_is_reused() {
    let cache = tempfile::tempdir().unwrap();
    let corpus = Corpus::read(&common::tinyshakespeare()).unwrap();
    let tok = Tokenizer::gpt2(Some(&common::gpt2_tokenizer())).unwrap();
    let data = TokenData::load(&corpus, &tok, cache.path(), 0.1, 1024).unwrap();
    // ../shared/data/README.md: Tiny Shakespeare is 338,025 GPT-2 tokens (as tiktoken counts).
    assert_eq!(data.len(), 338_025);
    assert_eq!(
        std::fs::metadata(&data.cache_path).unwrap().len(),
        2 * 338_025,
        "u16 tokens"
    );
    assert_eq!(data.split_len(Split::Val), 33_803);
    let (x, y) = data
        .batch(Split::Train, &[0], 2, &candle_core::Device::Cpu)
        .unwrap();
    // "First Citizen" → [5962, 22307]
    assert_eq!(x.to_vec2::<u32>().unwrap(), vec![vec![5962, 22307]]);
    assert_eq!(y.to_vec2::<u32>().unwrap()[0][0], 22307);
    let modified = std::fs::metadata(&data.cache_path)
        .unwrap()
        .modified()
        .unwrap();
    let again = TokenData::load(&corpus, &tok, cache.path(), 0.1, 1024).unwrap();
    assert_eq!(again.len(), 338_025);
    assert_eq!(
        std::fs::metadata(&again.cache_path)
            .unwrap()
            .modified()
            .unwrap(),
        modified
    );
}
