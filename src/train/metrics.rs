//! `RUN_DIR/metrics.jsonl`: one JSON object per event, appended and flushed line by line.
//!
//! After a crash the file may end in a torn line, and may hold lines for steps after the checkpoint
//! a resumed run restarts from. [`reconcile`] makes it one consistent history again: lines past the
//! resumed step and a torn last line move to `metrics.superseded.jsonl` (nothing is deleted), and
//! the rest is rewritten atomically.

use super::faults;
use super::tensorboard::EventWriter;
use crate::fsutil::write_atomic;
use anyhow::{Context, Result};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;

pub const METRICS_FILE: &str = "metrics.jsonl";
pub const SUPERSEDED_FILE: &str = "metrics.superseded.jsonl";

/// An open metrics file, and the run's TensorBoard event file beside it.
pub struct Metrics {
    file: File,
    tensorboard: EventWriter,
}

impl Metrics {
    /// Opens (creating) `RUN_DIR/metrics.jsonl` for appending, and a new TensorBoard event file;
    /// `resumed_at` is the step a resumed run continues from.
    pub fn open(run_dir: &Path, resumed_at: Option<u64>) -> Result<Self> {
        let path = run_dir.join(METRICS_FILE);
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        let tensorboard = EventWriter::create(run_dir, resumed_at)?;
        Ok(Self { file, tensorboard })
    }

    /// Appends one event (and its scalars to the TensorBoard file).
    pub fn write(&mut self, value: serde_json::Value) -> Result<()> {
        self.tensorboard.write_metrics(&value)?;
        let mut line = serde_json::to_string(&value)?;
        line.push('\n');
        let bytes = line.as_bytes();
        let half = bytes.len() / 2;
        (|| {
            self.file.write_all(&bytes[..half])?;
            // Tests widen the window in which a kill leaves a torn line.
            faults::slow_metrics_pause();
            self.file.write_all(&bytes[half..])
        })()
        .context("cannot append to metrics.jsonl")
    }

    /// Flushes to disk (at checkpoints, so saved steps have their metrics on disk too).
    pub fn sync(&mut self) -> Result<()> {
        self.file.sync_data().context("cannot sync metrics.jsonl")?;
        self.tensorboard.sync()
    }
}

/// What [`reconcile`] did.
#[derive(Debug, Default, PartialEq)]
pub struct Reconciled {
    pub kept: usize,
    /// Complete lines for steps after the resumed one.
    pub superseded: usize,
    /// Whether the file ended in an incomplete or unreadable line.
    pub torn: bool,
}

/// Keeps the events up to `step` (inclusive), moving later ones and a torn tail aside.
pub fn reconcile(run_dir: &Path, step: u64) -> Result<Reconciled> {
    let path = run_dir.join(METRICS_FILE);
    let text = match std::fs::read(&path) {
        Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Reconciled::default()),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let mut report = Reconciled::default();
    let mut kept = String::new();
    let mut moved = String::new();
    let complete = text.ends_with('\n');
    let lines: Vec<&str> = text.lines().collect();
    for (i, line) in lines.iter().enumerate() {
        let is_last = i + 1 == lines.len();
        let parsed = serde_json::from_str::<serde_json::Value>(line).ok();
        let line_step = parsed.as_ref().and_then(|v| v["step"].as_u64());
        match line_step {
            Some(s) if !is_last || complete => {
                if s <= step {
                    kept.push_str(line);
                    kept.push('\n');
                    report.kept += 1;
                } else {
                    moved.push_str(line);
                    moved.push('\n');
                    report.superseded += 1;
                }
            }
            _ => {
                report.torn = true;
                moved.push_str(line);
                moved.push('\n');
            }
        }
    }
    if report.superseded > 0 || report.torn {
        let aside = run_dir.join(SUPERSEDED_FILE);
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&aside)
            .with_context(|| format!("cannot open {}", aside.display()))?;
        f.write_all(moved.as_bytes())?;
        f.sync_data()?;
        write_atomic(&path, kept.as_bytes())?;
    }
    Ok(report)
}
