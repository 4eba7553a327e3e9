//! Hugging Face interop: load GPT-2 weights saved by `transformers` (the released GPT-2 models or
//! any `GPT2LMHeadModel` directory) and export a run as a directory `transformers` loads.
//!
//! `transformers` stores GPT-2's linear layers as `Conv1D`, weights `[in, out]`; we store
//! `[out, in]` like `torch.nn.Linear` (and nanoGPT), so those four weights per block are transposed
//! both ways. The `attn.bias` / `attn.masked_bias` causal-mask buffers of older checkpoints are not
//! parameters and are skipped; `lm_head.weight` is tied to `transformer.wte.weight`.

use crate::data::tokenizer::Tokenizer;
use crate::model::{GptConfig, Params};
use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Hub repositories of the released GPT-2 models, by short name.
pub fn hub_repo(name: &str) -> Option<&'static str> {
    match name {
        "gpt2" => Some("openai-community/gpt2"),
        "gpt2-medium" => Some("openai-community/gpt2-medium"),
        "gpt2-large" => Some("openai-community/gpt2-large"),
        "gpt2-xl" => Some("openai-community/gpt2-xl"),
        _ => None,
    }
}

fn is_conv1d_weight(name: &str) -> bool {
    name.ends_with("attn.c_attn.weight")
        || name.ends_with("attn.c_proj.weight")
        || name.ends_with("mlp.c_fc.weight")
        || name.ends_with("mlp.c_proj.weight")
}

/// A local directory for `init_from`: the path itself, or the Hub model's files from the Hugging
/// Face cache (`HF_HOME`), downloaded unless `HF_HUB_OFFLINE=1`.
pub fn resolve(spec: &str) -> Result<PathBuf> {
    let path = Path::new(spec);
    if path.is_dir() {
        return Ok(path.to_path_buf());
    }
    let Some(repo) = hub_repo(spec) else {
        bail!("init_from '{spec}' is neither a directory nor one of gpt2, gpt2-medium, gpt2-large, gpt2-xl");
    };
    let files = ["config.json", "model.safetensors"];
    let cache = hf_hub::Cache::from_env().model(repo.to_string());
    let cached: Option<Vec<PathBuf>> = files.iter().map(|f| cache.get(f)).collect();
    if let Some(paths) = cached {
        return Ok(paths[0]
            .parent()
            .expect("a file in a snapshot")
            .to_path_buf());
    }
    let offline = std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| v == "1" || v == "true");
    if offline {
        bail!("{repo} is not in the Hugging Face cache and HF_HUB_OFFLINE is set; download it or give init_from a local directory");
    }
    let api = hf_hub::api::sync::ApiBuilder::from_env()
        .with_progress(true)
        .build()
        .context("cannot set up the Hugging Face hub client")?;
    let model = api.model(repo.to_string());
    let mut dir = None;
    for f in files {
        let p = model.get(f).map_err(|e| {
            anyhow!("cannot fetch {repo}/{f} ({e}); give init_from a local directory instead")
        })?;
        dir = p.parent().map(Path::to_path_buf);
    }
    Ok(dir.expect("two files fetched"))
}

/// Reads `config.json` of a GPT-2 directory into our shape (vocabulary unpadded).
pub fn read_config(dir: &Path) -> Result<GptConfig> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let cfg: Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))?;
    let get = |key: &str| -> Result<usize> {
        cfg[key]
            .as_u64()
            .map(|v| v as usize)
            .with_context(|| format!("{} lacks {key}", path.display()))
    };
    if let Some(t) = cfg["model_type"].as_str() {
        if t != "gpt2" {
            bail!("{} is a {t} model, not gpt2", path.display());
        }
    }
    let n_embd = get("n_embd")?;
    if let Some(inner) = cfg["n_inner"].as_u64() {
        if inner as usize != 4 * n_embd {
            bail!("{}: n_inner {inner} is not 4·n_embd", path.display());
        }
    }
    match cfg["activation_function"].as_str().unwrap_or("gelu_new") {
        "gelu_new" | "gelu_pytorch_tanh" => {}
        other => bail!(
            "{}: activation {other} is not GPT-2's tanh GELU",
            path.display()
        ),
    }
    if cfg["layer_norm_epsilon"]
        .as_f64()
        .is_some_and(|e| e != 1e-5)
    {
        bail!("{}: layer_norm_epsilon must be 1e-5", path.display());
    }
    for flag in ["scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"] {
        if cfg[flag].as_bool() == Some(true) {
            bail!("{}: {flag} is not supported", path.display());
        }
    }
    if cfg["tie_word_embeddings"].as_bool() == Some(false) {
        bail!("{}: untied lm_head is not supported", path.display());
    }
    let model = GptConfig {
        n_layer: get("n_layer")?,
        n_head: get("n_head")?,
        n_embd,
        block_size: get("n_positions")?,
        bias: true,
        dropout: 0.0,
        vocab_size: get("vocab_size")?,
    };
    model.validate()?;
    Ok(model)
}

/// The weights of a GPT-2 directory (`model.safetensors`) in our names and layout, cropped to
/// `cfg.block_size` positions (which may be below the checkpoint's).
pub fn read_weights(dir: &Path, cfg: &GptConfig, device: &Device) -> Result<Params> {
    let path = dir.join("model.safetensors");
    if !path.is_file() {
        bail!(
            "{} not found (only safetensors weights are read)",
            path.display()
        );
    }
    let raw = candle_core::safetensors::load(&path, &Device::Cpu)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let mut tensors = HashMap::new();
    for (name, t) in raw {
        let name = name
            .strip_prefix("transformer.")
            .unwrap_or(&name)
            .to_string();
        if name == "lm_head.weight"
            || name.ends_with(".attn.bias") && t.rank() > 1
            || name.ends_with(".attn.masked_bias")
        {
            continue;
        }
        let t = if is_conv1d_weight(&name) {
            t.t()?.contiguous()?
        } else {
            t
        };
        let t = if name == "wpe.weight" && t.dim(0)? > cfg.block_size {
            t.narrow(0, 0, cfg.block_size)?
        } else {
            t
        };
        tensors.insert(format!("transformer.{name}"), t);
    }
    Params::from_tensors(cfg, tensors, DType::F32, device)
        .with_context(|| format!("cannot load {}", path.display()))
}

/// Our byte tokenizer as a Hugging Face `tokenizer.json`: a byte-level BPE with no merges whose
/// ids are the byte values, so `transformers` tokenizes exactly as we do.
pub fn byte_tokenizer_json() -> Result<String> {
    use tokenizers::models::bpe::BPE;
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    // ByteLevel's alphabet maps every byte to a printable char; invert it byte by byte.
    let mut vocab = tokenizers::models::bpe::Vocab::default();
    for b in 0u16..256 {
        let ch = crate::data::tokenizer::byte_level_char(b as u8);
        vocab.insert(ch.to_string(), b as u32);
    }
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, vec![])
        .build()
        .map_err(|e| anyhow!("cannot build byte tokenizer: {e}"))?;
    let mut tok = tokenizers::Tokenizer::new(bpe);
    tok.with_pre_tokenizer(Some(ByteLevel::new(false, true, false)));
    tok.with_decoder(Some(ByteLevel::default()));
    tok.to_string(false)
        .map_err(|e| anyhow!("cannot serialize byte tokenizer: {e}"))
}

/// Writes a model as a `transformers` GPT-2 directory: `config.json`, `model.safetensors`,
/// `tokenizer.json`, `tokenizer_config.json`.
pub fn write_transformers_dir(
    out: &Path,
    model_cfg: &GptConfig,
    params: &Params,
    tokenizer: &Tokenizer,
) -> Result<()> {
    let vocab = tokenizer.vocab_size();
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    for (name, t) in params.tensors() {
        let t = if is_conv1d_weight(&name) {
            t.t()?.contiguous()?
        } else if name == "transformer.wte.weight" {
            // The rows past the tokenizer's vocabulary are padding, never a token.
            t.narrow(0, 0, vocab)?.contiguous()?
        } else {
            t
        };
        tensors.push((name, t));
    }
    if !model_cfg.bias {
        // transformers' GPT-2 always has biases: zeros make it the same function.
        let with_bias = GptConfig {
            bias: true,
            ..model_cfg.clone()
        };
        for spec in with_bias.parameter_specs() {
            if !tensors.iter().any(|(n, _)| *n == spec.name) {
                tensors.push((
                    spec.name,
                    Tensor::zeros(spec.shape.as_slice(), DType::F32, &Device::Cpu)?,
                ));
            }
        }
    }
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    let bytes = safetensors::tensor::serialize(
        tensors.iter().map(|(n, t)| (n.as_str(), t)),
        Some(metadata),
    )?;
    crate::fsutil::write_atomic(&out.join("model.safetensors"), &bytes)?;

    let eot = tokenizer.token_to_id(crate::data::tokenizer::END_OF_TEXT);
    let config = json!({
        "activation_function": "gelu_new",
        "add_cross_attention": false,
        "architectures": ["GPT2LMHeadModel"],
        "attn_pdrop": model_cfg.dropout,
        "bos_token_id": eot,
        "dtype": "float32",
        "embd_pdrop": model_cfg.dropout,
        "eos_token_id": eot,
        "initializer_range": 0.02,
        "layer_norm_epsilon": 1e-5,
        "model_type": "gpt2",
        "n_embd": model_cfg.n_embd,
        "n_head": model_cfg.n_head,
        "n_inner": null,
        "n_layer": model_cfg.n_layer,
        "n_positions": model_cfg.block_size,
        "pad_token_id": null,
        "reorder_and_upcast_attn": false,
        "resid_pdrop": model_cfg.dropout,
        "scale_attn_by_inverse_layer_idx": false,
        "scale_attn_weights": true,
        "summary_activation": null,
        "summary_first_dropout": 0.1,
        "summary_proj_to_labels": true,
        "summary_type": "cls_index",
        "summary_use_proj": true,
        "tie_word_embeddings": true,
        "transformers_version": "5.24.0",
        "use_cache": true,
        "vocab_size": vocab,
    });
    crate::fsutil::write_atomic(
        &out.join("config.json"),
        serde_json::to_string_pretty(&config)?.as_bytes(),
    )?;
    let tokenizer_json = match tokenizer {
        Tokenizer::Byte => byte_tokenizer_json()?,
        Tokenizer::Hf(_) => tokenizer.to_json()?,
    };
    crate::fsutil::write_atomic(&out.join("tokenizer.json"), tokenizer_json.as_bytes())?;
    let mut tok_config = json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": model_cfg.block_size,
        "add_prefix_space": false,
    });
    if eot.is_some() {
        for key in ["bos_token", "eos_token", "unk_token"] {
            tok_config[key] = json!(crate::data::tokenizer::END_OF_TEXT);
        }
    }
    crate::fsutil::write_atomic(
        &out.join("tokenizer_config.json"),
        serde_json::to_string_pretty(&tok_config)?.as_bytes(),
    )?;
    Ok(())
}
