//! Plotting support: plotters with an embedded font, so PNGs render text on any machine
//! (no system fonts or fontconfig needed).

use plotters::style::FontStyle;
use std::sync::Once;

/// The font family name charts should use.
pub const FONT: &str = "sans-serif";

/// Registers DejaVu Sans (regular and bold) as [`FONT`]; safe to call any number of times.
pub fn register_fonts() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // The bytes are a valid TrueType font shipped by the `dejavu` crate.
        let _ = plotters::style::register_font(FONT, FontStyle::Normal, dejavu::sans::regular());
        let _ = plotters::style::register_font(FONT, FontStyle::Bold, dejavu::sans::bold());
    });
}
