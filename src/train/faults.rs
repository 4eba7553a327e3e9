//! Fault injection for the test suite, switched on by environment variables and inert otherwise:
//! - `GPT_PRETRAIN_SLOW_CHECKPOINT_MS=N`: pause N ms before each file of a checkpoint and before
//!   its rename, so that a `kill -9` at a random moment often lands mid-checkpoint;
//! - `GPT_PRETRAIN_SLOW_METRICS_MS=N`: pause N ms between the two halves of each metrics line, so
//!   that a kill can leave a torn line;
//! - `GPT_PRETRAIN_ENOSPC_AT_STEP=N`: the checkpoint of step N fails with ENOSPC halfway through
//!   its optimizer file (where a small tmpfs cannot be mounted);
//! - `GPT_PRETRAIN_INJECT_NAN_AT_STEP=N`: step N's loss is NaN;
//! - `GPT_PRETRAIN_DESYNC_RANK=R`: in a data-parallel run, rank R nudges one parameter after its
//!   first step, as a fault that made ranks drift apart would (the checkpoint comparison must stop
//!   the run).
//!
//! `prepare`'s own (`GPT_PRETRAIN_PREPARE_ABORT_AT_TOKEN`) lives in `data::prepare`, below this
//! module.

use std::sync::OnceLock;
use std::time::Duration;

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|s| s.parse().ok())
}

/// The checkpoint-write pause, if switched on.
pub fn slow_checkpoint_pause() {
    static PAUSE: OnceLock<Option<u64>> = OnceLock::new();
    if let Some(ms) = *PAUSE.get_or_init(|| env_u64("GPT_PRETRAIN_SLOW_CHECKPOINT_MS")) {
        std::thread::sleep(Duration::from_millis(ms));
    }
}

/// The metrics-line pause, if switched on.
pub fn slow_metrics_pause() {
    static PAUSE: OnceLock<Option<u64>> = OnceLock::new();
    if let Some(ms) = *PAUSE.get_or_init(|| env_u64("GPT_PRETRAIN_SLOW_METRICS_MS")) {
        std::thread::sleep(Duration::from_millis(ms));
    }
}

/// Whether the checkpoint of `step` should fail as if the disk were full.
pub fn enospc_at(step: u64) -> bool {
    env_u64("GPT_PRETRAIN_ENOSPC_AT_STEP") == Some(step)
}

/// Whether the loss of `step` should be poisoned.
pub fn nan_at(step: u64) -> bool {
    static AT: OnceLock<Option<u64>> = OnceLock::new();
    *AT.get_or_init(|| env_u64("GPT_PRETRAIN_INJECT_NAN_AT_STEP")) == Some(step)
}

/// Whether `rank` should knock its parameters out of step with the other ranks.
pub fn desync_rank(rank: usize) -> bool {
    env_u64("GPT_PRETRAIN_DESYNC_RANK") == Some(rank as u64)
}
