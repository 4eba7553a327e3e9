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

/// Texts that exercise GPT-2's pre-tokenization: contractions, numbers, runs of spaces, tabs and
/// newlines, punctuation runs, non-Latin scripts, emoji, a literal `<|endoftext|>`, and words
/// that are whole tokens next to words that are not.
const HARD_TEXTS: &[&str] = &[
    "Hello world",
    "I'm sure they'll say it's what we'd've done, ain't it? 'Tis. 'S'T're've'm'll'd",
    "  leading spaces,   inner   runs,\ttabs\t\tand trailing spaces   ",
    "\n\n\nBlank lines\r\nWindows line ends\r\n\r\nand a final newline\n",
    "numbers: 3.14159, 1,000,000, 2024-12-02, 0x7fff, 1e-8 and 12345678901234567890",
    "punctuation!!! ... ?!?! --- ((nested)) [brackets] {braces} <|endoftext|> mid-text",
    "<|endoftext|><|endoftext|>two in a row, and <|endoftext| one cut short",
    "naïve café, Straße, Ελληνικά, русский, 東京タワー, 한국어, עברית, العربية, हिन्दी",
    "emoji 🙂👍🏽🧑‍🚀 and combining a\u{0301} e\u{0308} and zero-width\u{200b}joiners",
    "unusual spaces:\u{00a0}nbsp,\u{2003}em space,\u{3000}ideographic\u{2028}line separator",
    "antidisestablishmentarianism supercalifragilisticexpialidocious Pneumonoultramicroscopic",
    "",
];

/// `len` bytes of `text` from `at`, both moved forward to character boundaries.
fn slice_at(text: &str, at: usize, len: usize) -> &str {
    let boundary = |mut i: usize| {
        i = i.min(text.len());
        while !text.is_char_boundary(i) {
            i += 1;
        }
        i
    };
    let start = boundary(at);
    &text[start..boundary(start + len)]
}

/// Asserts that the tokenizer's own encoder (the rank-ordered one) gives exactly `tokenizers`'
/// ids on `text`, naming the first position where they part.
fn assert_same_ids(tok: &Tokenizer, text: &str, what: &str) {
    let ours = tok.encode(text).unwrap();
    let reference = tok.encode_with_tokenizers(text).unwrap();
    if ours != reference {
        let at = ours
            .iter()
            .zip(&reference)
            .position(|(a, b)| a != b)
            .unwrap_or(ours.len().min(reference.len()));
        panic!(
            "{what}: ids part at token {at} ({} against {} tokens): ours {:?}, tokenizers {:?}",
            ours.len(),
            reference.len(),
            &ours[at..(at + 8).min(ours.len())],
            &reference[at..(at + 8).min(reference.len())]
        );
    }
}

/// The texts every ranked encoder is held to: the hard cases, the prepare fixtures' documents,
/// Tiny Shakespeare whole, and, where the data directory has it, 16 slices of 128 kB spread over
/// the Gutenberg corpus (the prepare benchmark compares all of it).
fn reference_texts() -> Vec<(String, String)> {
    let mut texts: Vec<(String, String)> = HARD_TEXTS
        .iter()
        .map(|t| (format!("{t:?}"), t.to_string()))
        .collect();
    let fixtures = common::prepare_fixtures();
    // The fixture holds malformed lines on purpose (invalid UTF-8 and JSON among them): skipped.
    for line in std::fs::read(fixtures.join("docs.jsonl"))
        .unwrap()
        .split(|&b| b == b'\n')
    {
        if let Ok(v) = serde_json::from_slice::<serde_json::Value>(line) {
            if let Some(t) = v["text"].as_str() {
                texts.push(("a fixture document".into(), t.to_string()));
            }
        }
    }
    assert!(
        texts.len() > HARD_TEXTS.len() + 10,
        "the fixture's documents were not read"
    );
    texts.push((
        "Tiny Shakespeare".into(),
        std::fs::read_to_string(common::tinyshakespeare()).unwrap(),
    ));
    let gutenberg = common::data_dir().join("gutenberg_en.txt");
    if let Ok(text) = std::fs::read_to_string(&gutenberg) {
        for i in 0..16 {
            let at = i * text.len() / 16;
            texts.push((
                format!("Gutenberg at byte {at}"),
                slice_at(&text, at, 128 << 10).to_string(),
            ));
        }
    }
    texts
}

#[test]
fn ranked_bpe_gives_the_ids_of_tokenizers() {
    let gpt2 = Tokenizer::gpt2(Some(&common::gpt2_tokenizer())).unwrap();
    let study = Tokenizer::from_file(
        &common::project_root().join("configs/lr-study/gutenberg-bpe-8192.json"),
    )
    .unwrap();
    let corpus = Corpus::read(&common::tinyshakespeare()).unwrap();
    let trained = Tokenizer::train_bpe(corpus.training_text(0.1), 1024).unwrap();
    let texts = reference_texts();
    for (name, tok) in [
        ("GPT-2", &gpt2),
        ("the study's 8k BPE", &study),
        ("a BPE trained here", &trained),
    ] {
        assert_eq!(tok.encoder_name(), "tiktoken-rs", "{name}");
        for (what, text) in &texts {
            assert_same_ids(tok, text, &format!("{name} on {what}"));
        }
    }
    // Known GPT-2 ids, from OpenAI's encoder: the end-of-text token inside a text is one token.
    assert_eq!(
        gpt2.encode("Hello<|endoftext|> world").unwrap(),
        vec![15496, 50256, 995]
    );
}

#[test]
fn a_tokenizer_the_ranked_encoder_cannot_reproduce_stays_on_tokenizers() {
    // GPT-2's tokenizer with a prefix space added before each text: tiktoken's algorithm has no
    // such step, so the ranked encoder must not be used for it.
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(common::gpt2_tokenizer()).unwrap()).unwrap();
    json["pre_tokenizer"]["add_prefix_space"] = serde_json::Value::Bool(true);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokenizer.json");
    std::fs::write(&path, json.to_string()).unwrap();
    let tok = Tokenizer::from_file(&path).unwrap();
    assert_eq!(tok.encoder_name(), "tokenizers");
    // " Hello" is GPT-2's 18435, "Hello" its 15496.
    assert_eq!(tok.encode("Hello world").unwrap(), vec![18435, 995]);
}

#[test]
fn special_tokens_are_matched_leftmost_then_longest_as_tokenizers_does() {
    // GPT-2's tokenizer with two more special tokens, one a prefix of the other.
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(common::gpt2_tokenizer()).unwrap()).unwrap();
    let added = json["added_tokens"].as_array_mut().unwrap();
    let special = |id: u32, content: &str| {
        serde_json::json!({"id": id, "content": content, "single_word": false, "lstrip": false,
                           "rstrip": false, "normalized": false, "special": true})
    };
    added.push(special(50257, "<|x|>"));
    added.push(special(50258, "<|x|>y"));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokenizer.json");
    std::fs::write(&path, json.to_string()).unwrap();
    let tok = Tokenizer::from_file(&path).unwrap();
    assert_eq!(tok.encoder_name(), "tiktoken-rs");
    let text = "a<|x|>yb <|x|>z<|endoftext|><|x|><|x|>y";
    assert_same_ids(&tok, text, "overlapping special tokens");
    let ids = tok.encode(text).unwrap();
    let specials: Vec<u32> = ids.into_iter().filter(|&id| id >= 50256).collect();
    assert_eq!(specials, vec![50258, 50257, 50256, 50257, 50258]);
}
