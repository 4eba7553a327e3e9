//! SIGINT and SIGTERM: the first asks the training loop to stop after the current step (it then
//! checkpoints and exits with 130 / 143); a second one exits at once with that status. Checkpoints
//! are written atomically, so even the abrupt exit cannot damage one already saved.

use signal_hook::consts::{SIGINT, SIGTERM};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Once;

static REQUESTED: AtomicUsize = AtomicUsize::new(0);
static ARMED_INT: AtomicBool = AtomicBool::new(false);
static ARMED_TERM: AtomicBool = AtomicBool::new(false);

/// Installs the handlers (once per process).
pub fn install() -> std::io::Result<()> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        result = (|| {
            for (signal, armed) in [(SIGINT, &ARMED_INT), (SIGTERM, &ARMED_TERM)] {
                // Registered first, so it sees the flag as the previous signal left it.
                signal_hook::flag::register_conditional_shutdown(signal, 128 + signal, armed)?;
                signal_hook::flag::register(signal, armed)?;
                signal_hook::flag::register_usize(signal, &REQUESTED, signal as usize)?;
            }
            Ok(())
        })();
    });
    result
}

/// The signal that asked the run to stop, if any.
pub fn requested() -> Option<i32> {
    match REQUESTED.load(Ordering::SeqCst) {
        0 => None,
        s => Some(s as i32),
    }
}

/// The signal's name for messages.
pub fn name(signal: i32) -> &'static str {
    match signal {
        SIGINT => "SIGINT",
        SIGTERM => "SIGTERM",
        _ => "a signal",
    }
}
