//! TensorBoard scalars beside `metrics.jsonl`: `RUN_DIR/events.out.tfevents.*`, so that
//! `tensorboard --logdir runs/` shows live curves, as nanoGPT's and llm.c's users watch theirs.
//!
//! The event-file format is TensorFlow's TFRecord: each record is its length (u64, little-endian),
//! the masked CRC-32C of those 8 bytes, the bytes of one `Event` protobuf, and their masked
//! CRC-32C. The messages are the few fields of `tensorflow/core/util/event.proto` and
//! `summary.proto` that scalars need, encoded by `prost`. No maintained Rust crate writes these
//! files (tensorboard-rs has been unmaintained since 2022).
//!
//! Every metrics event becomes scalars tagged `split/field` (`train/loss`, `train/lr`,
//! `train/grad_norm`, `train/tok_per_s`, `val/loss`, …) at its step, as f32 (TensorBoard's
//! `simple_value`). A resumed run opens a new file that starts with a `SessionLog` START at the
//! first step after its checkpoint: TensorBoard then discards the points at and after that step
//! from the earlier files (its "orphaned data" purge, on by default), so the curves show one
//! history, the one `metrics.jsonl` keeps after [`super::metrics::reconcile`].

use anyhow::{Context, Result};
use prost::Message;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// `tensorflow.Event`.
#[derive(Clone, PartialEq, Message)]
struct Event {
    #[prost(double, tag = "1")]
    wall_time: f64,
    #[prost(int64, tag = "2")]
    step: i64,
    #[prost(string, optional, tag = "3")]
    file_version: Option<String>,
    #[prost(message, optional, tag = "5")]
    summary: Option<Summary>,
    // Field 6 is the deprecated log_message.
    #[prost(message, optional, tag = "7")]
    session_log: Option<SessionLog>,
}

/// `tensorflow.Summary`.
#[derive(Clone, PartialEq, Message)]
struct Summary {
    #[prost(message, repeated, tag = "1")]
    value: Vec<SummaryValue>,
}

/// `tensorflow.Summary.Value`: a scalar, or a text summary (a string tensor with the text
/// plugin's metadata).
#[derive(Clone, PartialEq, Message)]
struct SummaryValue {
    #[prost(string, tag = "1")]
    tag: String,
    #[prost(float, optional, tag = "2")]
    simple_value: Option<f32>,
    #[prost(message, optional, tag = "8")]
    tensor: Option<TensorProto>,
    #[prost(message, optional, tag = "9")]
    metadata: Option<SummaryMetadata>,
}

/// `tensorflow.TensorProto`, a scalar string (`dtype` 7 = DT_STRING, shape empty).
#[derive(Clone, PartialEq, Message)]
struct TensorProto {
    #[prost(int32, tag = "1")]
    dtype: i32,
    #[prost(message, optional, tag = "2")]
    tensor_shape: Option<TensorShapeProto>,
    #[prost(bytes = "vec", repeated, tag = "8")]
    string_val: Vec<Vec<u8>>,
}

/// `tensorflow.TensorShapeProto` with no dimensions: a scalar.
#[derive(Clone, PartialEq, Message)]
struct TensorShapeProto {}

/// `tensorflow.SummaryMetadata`: which plugin shows the value.
#[derive(Clone, PartialEq, Message)]
struct SummaryMetadata {
    #[prost(message, optional, tag = "1")]
    plugin_data: Option<PluginData>,
}

/// `tensorflow.SummaryMetadata.PluginData`.
#[derive(Clone, PartialEq, Message)]
struct PluginData {
    #[prost(string, tag = "1")]
    plugin_name: String,
}

impl SummaryValue {
    fn scalar(tag: String, x: f32) -> Self {
        Self {
            tag,
            simple_value: Some(x),
            ..Default::default()
        }
    }

    /// A text summary, as `tf.summary.text` writes one.
    fn text(tag: String, text: &str) -> Self {
        Self {
            tag,
            tensor: Some(TensorProto {
                dtype: 7,
                tensor_shape: Some(TensorShapeProto {}),
                string_val: vec![text.as_bytes().to_vec()],
            }),
            metadata: Some(SummaryMetadata {
                plugin_data: Some(PluginData {
                    plugin_name: "text".into(),
                }),
            }),
            ..Default::default()
        }
    }
}

/// `tensorflow.SessionLog`.
#[derive(Clone, PartialEq, Message)]
struct SessionLog {
    /// 1 = START.
    #[prost(int32, tag = "1")]
    status: i32,
}

const SESSION_START: i32 = 1;

/// CRC-32C masked as TFRecord does, so that a CRC of data holding CRCs is not degenerate.
fn masked_crc(bytes: &[u8]) -> u32 {
    let crc = crc32c::crc32c(bytes);
    (crc.rotate_right(15)).wrapping_add(0xa282_ead8)
}

/// One TFRecord.
fn record(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc(data).to_le_bytes());
    out
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// An open event file of a run.
pub struct EventWriter {
    file: File,
    path: PathBuf,
}

impl EventWriter {
    /// Creates a new event file in `run_dir`. `resumed_at`: the first step a resumed run will
    /// log, recorded as a session start so that TensorBoard drops the points at and after it
    /// that the earlier files hold.
    pub fn create(run_dir: &Path, resumed_at: Option<u64>) -> Result<Self> {
        let secs = now() as u64;
        // Later files sort after earlier ones, also within one second.
        let earlier = std::fs::read_dir(run_dir)
            .with_context(|| format!("cannot list {}", run_dir.display()))?
            .filter(|e| {
                e.as_ref()
                    .is_ok_and(|e| e.file_name().to_string_lossy().starts_with("events.out."))
            })
            .count();
        let path = run_dir.join(format!(
            "events.out.tfevents.{secs:010}.{earlier:04}.gpt-pretrain"
        ));
        let file = OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        let mut writer = Self { file, path };
        writer.write_event(Event {
            wall_time: now(),
            step: 0,
            file_version: Some("brain.Event:2".into()),
            ..Default::default()
        })?;
        if let Some(step) = resumed_at {
            writer.write_event(Event {
                wall_time: now(),
                step: step as i64,
                session_log: Some(SessionLog {
                    status: SESSION_START,
                }),
                ..Default::default()
            })?;
        }
        Ok(writer)
    }

    fn write_event(&mut self, event: Event) -> Result<()> {
        self.file
            .write_all(&record(&event.encode_to_vec()))
            .with_context(|| format!("cannot append to {}", self.path.display()))
    }

    /// The scalars of one metrics event, every finite number but `step` and `tokens`, and its
    /// strings (a sample's `prompt` and `text`) as text summaries, tagged `split/field`.
    pub fn write_metrics(&mut self, event: &serde_json::Value) -> Result<()> {
        let (Some(step), Some(fields)) = (event["step"].as_u64(), event.as_object()) else {
            return Ok(());
        };
        let split = event["split"].as_str().unwrap_or("run");
        let value: Vec<SummaryValue> = fields
            .iter()
            .filter(|(k, _)| !matches!(k.as_str(), "step" | "tokens" | "split"))
            .filter_map(|(k, v)| {
                let tag = format!("{split}/{k}");
                if let Some(text) = v.as_str() {
                    return Some(SummaryValue::text(tag, text));
                }
                let x = v.as_f64()?;
                x.is_finite().then(|| SummaryValue::scalar(tag, x as f32))
            })
            .collect();
        if value.is_empty() {
            return Ok(());
        }
        self.write_event(Event {
            wall_time: now(),
            step: step as i64,
            summary: Some(Summary { value }),
            ..Default::default()
        })
    }

    /// Flushes to disk (at checkpoints, with `metrics.jsonl`).
    pub fn sync(&mut self) -> Result<()> {
        self.file
            .sync_data()
            .with_context(|| format!("cannot sync {}", self.path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_carry_tfrecord_framing_and_crcs() {
        // CRC-32C of "123456789" is 0xE3069283 (the standard check value); TFRecord masks it.
        assert_eq!(crc32c::crc32c(b"123456789"), 0xe306_9283);
        let expected = 0xe306_9283u32.rotate_right(15).wrapping_add(0xa282_ead8);
        assert_eq!(masked_crc(b"123456789"), expected);
        let r = record(b"abc");
        assert_eq!(&r[..8], &3u64.to_le_bytes());
        assert_eq!(&r[8..12], &masked_crc(&3u64.to_le_bytes()).to_le_bytes());
        assert_eq!(&r[12..15], b"abc");
        assert_eq!(&r[15..], &masked_crc(b"abc").to_le_bytes());
    }
}
