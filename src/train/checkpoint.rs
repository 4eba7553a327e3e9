//! Checkpoints: `RUN_DIR/checkpoints/step-NNNNNNNN/` holding `model.safetensors` (Hugging Face
//! names), `optimizer.safetensors` (every moment tensor and step count) and `state.json` (step,
//! tokens, data-RNG position, best validation loss, config hash, and SHA-256 of the other files).
//!
//! A checkpoint is written into `checkpoints/.tmp-…`, each file fsynced, `state.json` last, then
//! renamed into place: a directory named `step-*` is always complete. Loading verifies checksums
//! before it trusts any byte.

use super::faults;
use crate::fsutil::{sha256_hex, sync_dir, write_synced};
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::{Path, PathBuf};

const MODEL_FILE: &str = "model.safetensors";
const OPTIMIZER_FILE: &str = "optimizer.safetensors";
const STATE_FILE: &str = "state.json";

/// Everything besides tensors that a resumed run needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// Optimizer steps completed.
    pub step: u64,
    /// Training tokens consumed.
    pub tokens: u64,
    /// Seed of the training-batch stream.
    pub data_seed: u64,
    /// Position in that stream ([`crate::data::BatchSampler::position`]: a u128, as a decimal
    /// string, since JSON numbers are f64).
    pub data_word_pos: String,
    /// Best validation loss so far.
    pub best_val_loss: Option<f64>,
    /// SHA-256 of the resolved config.
    pub config_hash: String,
    /// Steps not applied: a non-finite loss or gradient (`nan_policy = "skip"`) or a spike over
    /// `skip_loss_zscore` / `skip_grad_zscore`.
    #[serde(default)]
    pub skipped_steps: u64,
    /// Steps whose gradients `grad_clip` scaled down (0 in checkpoints older than the field).
    #[serde(default)]
    pub clipped_steps: u64,
    /// The spike policy's windows (`skip_loss_zscore`, `skip_grad_zscore`), when it is on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spike_windows: Option<crate::train::spikes::SpikeWindows>,
    /// How many data-parallel ranks trained the run (1 for checkpoints older than the field).
    #[serde(default = "one")]
    pub world_size: usize,
    /// SHA-256 of each file in the checkpoint.
    #[serde(default)]
    pub checksums: BTreeMap<String, String>,
}

/// A checkpoint read back and verified.
pub struct Checkpoint {
    pub dir: PathBuf,
    pub state: TrainState,
    pub model: HashMap<String, Tensor>,
    pub optimizer: HashMap<String, Tensor>,
}

/// The directory holding a run's checkpoints.
pub fn checkpoints_dir(run_dir: &Path) -> PathBuf {
    run_dir.join("checkpoints")
}

fn step_dir_name(step: u64) -> String {
    format!("step-{step:08}")
}

fn one() -> usize {
    1
}

/// Where the checkpoint of `step` lives once complete.
pub fn step_dir(run_dir: &Path, step: u64) -> PathBuf {
    checkpoints_dir(run_dir).join(step_dir_name(step))
}

/// SHA-256 over the model and optimizer tensors as a checkpoint serializes them: equal digests,
/// equal bytes on disk.
pub fn digest(
    model: &BTreeMap<String, Tensor>,
    optimizer: &BTreeMap<String, Tensor>,
) -> Result<String> {
    let mut bytes = serialize(model)?;
    bytes.extend(serialize(optimizer)?);
    Ok(sha256_hex(&bytes))
}

fn serialize(tensors: &BTreeMap<String, Tensor>) -> Result<Vec<u8>> {
    Ok(safetensors::tensor::serialize(tensors.iter(), None)?)
}

/// Writes a checkpoint for `state.step` atomically, then deletes all but the newest `keep_last`.
pub fn save(
    run_dir: &Path,
    model: &BTreeMap<String, Tensor>,
    optimizer: &BTreeMap<String, Tensor>,
    mut state: TrainState,
    keep_last: usize,
) -> Result<PathBuf> {
    let root = checkpoints_dir(run_dir);
    fs::create_dir_all(&root).with_context(|| format!("cannot create {}", root.display()))?;
    let name = step_dir_name(state.step);
    let tmp = root.join(format!(".tmp-{name}-{}", std::process::id()));
    let result = (|| -> Result<PathBuf> {
        if tmp.exists() {
            fs::remove_dir_all(&tmp)?;
        }
        fs::create_dir(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
        state.checksums.clear();
        for (file, tensors) in [(MODEL_FILE, model), (OPTIMIZER_FILE, optimizer)] {
            let bytes = serialize(tensors)?;
            state.checksums.insert(file.to_string(), sha256_hex(&bytes));
            faults::slow_checkpoint_pause();
            if file == OPTIMIZER_FILE && faults::enospc_at(state.step) {
                // As a full disk does it: part of the file lands, then the write fails.
                let _ = fs::write(tmp.join(file), &bytes[..bytes.len() / 2]);
                Err(std::io::Error::from_raw_os_error(libc::ENOSPC))
                    .with_context(|| format!("cannot write {}", tmp.join(file).display()))?;
            }
            write_synced(&tmp.join(file), &bytes)?;
        }
        faults::slow_checkpoint_pause();
        write_synced(
            &tmp.join(STATE_FILE),
            serde_json::to_string_pretty(&state)?.as_bytes(),
        )?;
        sync_dir(&tmp)?;
        faults::slow_checkpoint_pause();
        let dest = root.join(&name);
        if dest.exists() {
            // Only when a resume fell back past this step because its checkpoint failed its
            // checksums: that copy is worthless, the new one replaces it.
            fs::remove_dir_all(&dest)?;
        }
        fs::rename(&tmp, &dest)
            .with_context(|| format!("cannot rename {} into place", tmp.display()))?;
        sync_dir(&root)?;
        Ok(dest)
    })();
    let dest = match result {
        Ok(dest) => dest,
        Err(e) => {
            let _ = fs::remove_dir_all(&tmp);
            return Err(e.context(format!(
                "writing checkpoint {name} failed; earlier checkpoints are untouched"
            )));
        }
    };
    let complete = list_complete(run_dir)?;
    if complete.len() > keep_last {
        for (_, dir) in &complete[..complete.len() - keep_last] {
            fs::remove_dir_all(dir)
                .with_context(|| format!("cannot remove old checkpoint {}", dir.display()))?;
        }
    }
    Ok(dest)
}

/// Complete checkpoint directories (`step-*`), oldest first. Temporary directories are ignored.
pub fn list_complete(run_dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let root = checkpoints_dir(run_dir);
    let mut out = Vec::new();
    let entries = match fs::read_dir(&root) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e).with_context(|| format!("cannot list {}", root.display())),
    };
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(step) = name
            .strip_prefix("step-")
            .and_then(|s| s.parse::<u64>().ok())
        {
            if entry.file_type()?.is_dir() {
                out.push((step, entry.path()));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Reads one checkpoint directory, verifying every checksum.
pub fn load_dir(dir: &Path, device: &Device) -> Result<Checkpoint> {
    let state_path = dir.join(STATE_FILE);
    let state_text = fs::read_to_string(&state_path)
        .with_context(|| format!("cannot read {}", state_path.display()))?;
    let state: TrainState = serde_json::from_str(&state_text)
        .with_context(|| format!("{} is corrupted", state_path.display()))?;
    let load = |file: &str| -> Result<HashMap<String, Tensor>> {
        let path = dir.join(file);
        let bytes = fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
        let want = state
            .checksums
            .get(file)
            .with_context(|| format!("{} has no checksum for {file}", state_path.display()))?;
        if &sha256_hex(&bytes) != want {
            bail!("{} fails its checksum (corrupted)", path.display());
        }
        Ok(candle_core::safetensors::load_buffer(&bytes, device)?)
    };
    let model = load(MODEL_FILE)?;
    let optimizer = load(OPTIMIZER_FILE)?;
    Ok(Checkpoint {
        dir: dir.to_path_buf(),
        state,
        model,
        optimizer,
    })
}

/// The newest checkpoint that passes its checksums. A newer one that fails is reported on
/// stderr and skipped; an error when none is usable.
pub fn load_latest(run_dir: &Path, device: &Device) -> Result<Checkpoint> {
    let complete = list_complete(run_dir)?;
    if complete.is_empty() {
        bail!(
            "{} has no complete checkpoint to resume from",
            run_dir.display()
        );
    }
    let mut failures = Vec::new();
    for (_, dir) in complete.iter().rev() {
        match load_dir(dir, device) {
            Ok(ckpt) => {
                for f in &failures {
                    eprintln!("warning: skipped checkpoint: {f}");
                }
                return Ok(ckpt);
            }
            Err(e) => failures.push(format!("{e:#}")),
        }
    }
    bail!(
        "no usable checkpoint in {}: {}",
        run_dir.display(),
        failures.join("; ")
    )
}

/// Removes directories a crash left mid-write (`checkpoints/.tmp-*`), returning their names.
pub fn remove_incomplete(run_dir: &Path) -> Result<Vec<String>> {
    let root = checkpoints_dir(run_dir);
    let mut removed = Vec::new();
    let Ok(entries) = fs::read_dir(&root) else {
        return Ok(removed);
    };
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with(".tmp-") {
            fs::remove_dir_all(entry.path())
                .with_context(|| format!("cannot remove {}", entry.path().display()))?;
            removed.push(name);
        }
    }
    removed.sort();
    Ok(removed)
}
