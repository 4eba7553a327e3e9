//! The plots of `gpt-pretrain compare`, as PNG and SVG: validation loss against tokens (seed mean,
//! band = min–max over seeds), train loss against step (smoothed, raw faint), learning rate and
//! gradient norm against step.

use super::runs::Group;
use anyhow::{anyhow, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::FontStyle;
use std::collections::BTreeMap;
use std::path::Path;
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

const COLORS: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(23, 190, 207),
];

/// Per x: (mean, min, max) over the group's runs that have a finite value there.
fn across_seeds(series: Vec<Vec<(f64, f64)>>) -> Vec<(f64, f64, f64, f64)> {
    let mut at: BTreeMap<u64, (f64, Vec<f64>)> = BTreeMap::new();
    for run in series {
        for (x, y) in run {
            if y.is_finite() {
                at.entry(x.to_bits()).or_insert((x, vec![])).1.push(y);
            }
        }
    }
    let mut out: Vec<(f64, f64, f64, f64)> = at
        .into_values()
        .map(|(x, ys)| {
            let mean = ys.iter().sum::<f64>() / ys.len() as f64;
            let min = ys.iter().copied().fold(f64::INFINITY, f64::min);
            let max = ys.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            (x, mean, min, max)
        })
        .collect();
    out.sort_by(|a, b| a.0.partial_cmp(&b.0).unwrap());
    out
}

fn bounds(points: &[(f64, f64)]) -> (f64, f64, f64, f64) {
    let finite = points.iter().filter(|p| p.0.is_finite() && p.1.is_finite());
    let (mut x0, mut x1, mut y0, mut y1) = (
        f64::INFINITY,
        f64::NEG_INFINITY,
        f64::INFINITY,
        f64::NEG_INFINITY,
    );
    for &(x, y) in finite {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if !x0.is_finite() {
        return (0.0, 1.0, 0.0, 1.0);
    }
    let pad = ((y1 - y0) * 0.05).max(1e-9);
    (x0, x1.max(x0 + 1.0), y0 - pad, y1 + pad)
}

/// At most one decimal, none when it is 0: ticks every 500 steps read 1k, 1.5k, 2k (a rounded
/// "2k" for 1.5k would repeat its neighbour's label).
fn one_decimal(x: f64) -> String {
    let s = format!("{x:.1}");
    s.strip_suffix(".0").map_or(s.clone(), str::to_string)
}

fn err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow!("plotting failed: {e:?}")
}

/// One group's curve: its label, the main line, an optional band (x, lo, hi), an optional faint raw line.
type Line = (
    String,
    Vec<(f64, f64)>,
    Vec<(f64, f64, f64)>,
    Vec<(f64, f64)>,
);

/// One chart: a line per group.
struct Curves {
    title: String,
    x_label: &'static str,
    y_label: &'static str,
    lines: Vec<Line>,
    /// Top of the y axis when the data go higher: one diverged run would otherwise flatten
    /// every other curve against the bottom.
    y_cap: Option<f64>,
}

/// The highest first value of any group's main line (a loss curve's starting loss).
fn highest_start(lines: &[Line]) -> Option<f64> {
    lines
        .iter()
        .filter_map(|l| l.1.first().map(|p| p.1))
        .filter(|y| y.is_finite())
        .reduce(f64::max)
}

/// Ten times the median of every group's main-line values.
fn ten_medians(lines: &[Line]) -> Option<f64> {
    let mut ys: Vec<f64> = lines
        .iter()
        .flat_map(|l| l.1.iter().map(|p| p.1))
        .filter(|y| y.is_finite())
        .collect();
    if ys.is_empty() {
        return None;
    }
    ys.sort_by(f64::total_cmp);
    Some(10.0 * ys[ys.len() / 2])
}

fn draw_curves<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, c: &Curves) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let mut all: Vec<(f64, f64)> = Vec::new();
    for (_, main, band, raw) in &c.lines {
        all.extend(main);
        all.extend(band.iter().flat_map(|&(x, lo, hi)| [(x, lo), (x, hi)]));
        all.extend(raw);
    }
    let mut title = c.title.clone();
    let cap = c
        .y_cap
        .filter(|&cap| all.iter().any(|p| p.1 > cap) && all.iter().any(|p| p.1 <= cap));
    if let Some(cap) = cap {
        all.retain(|p| p.1 <= cap);
        title.push_str(&format!(" — axis cut at {cap:.3}"));
    }
    let (x0, x1, y0, mut y1) = bounds(&all);
    if let Some(cap) = cap {
        y1 = cap;
    }
    let mut chart = ChartBuilder::on(area)
        .caption(&title, (FONT, 22))
        .margin(12)
        .x_label_area_size(45)
        .y_label_area_size(65)
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc(c.x_label)
        .y_desc(c.y_label)
        .label_style((FONT, 14))
        .axis_desc_style((FONT, 16))
        .x_label_formatter(&|x| {
            if x.abs() >= 1e6 {
                format!("{}M", one_decimal(x / 1e6))
            } else if x.abs() >= 1e3 {
                format!("{}k", one_decimal(x / 1e3))
            } else {
                format!("{x:.0}")
            }
        })
        .y_label_formatter(&|y| {
            if y.abs() < 1e-2 && *y != 0.0 {
                format!("{y:.1e}")
            } else {
                format!("{y:.2}")
            }
        })
        .draw()
        .map_err(err)?;
    for (i, (label, main, band, raw)) in c.lines.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        if band.len() > 1 {
            let mut polygon: Vec<(f64, f64)> = band.iter().map(|&(x, _, hi)| (x, hi)).collect();
            polygon.extend(band.iter().rev().map(|&(x, lo, _)| (x, lo)));
            chart
                .draw_series(std::iter::once(Polygon::new(polygon, color.mix(0.15))))
                .map_err(err)?;
        }
        if !raw.is_empty() {
            chart
                .draw_series(LineSeries::new(
                    raw.iter().copied(),
                    color.mix(0.25).stroke_width(1),
                ))
                .map_err(err)?;
        }
        chart
            .draw_series(LineSeries::new(main.iter().copied(), color.stroke_width(2)))
            .map_err(err)?
            .label(label.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(3))
            });
    }
    chart
        .configure_series_labels()
        .label_font((FONT, 13))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperRight)
        .draw()
        .map_err(err)?;
    Ok(())
}

/// An exponential moving average (α = 0.05), skipping non-finite values.
fn smooth(points: &[(f64, f64)]) -> Vec<(f64, f64)> {
    let mut ema: Option<f64> = None;
    points
        .iter()
        .filter(|p| p.1.is_finite())
        .map(|&(x, y)| {
            let v = ema.map_or(y, |e| 0.95 * e + 0.05 * y);
            ema = Some(v);
            (x, v)
        })
        .collect()
}

fn val_curves(groups: &[Group]) -> Curves {
    Curves {
        title: "Validation loss (seed mean; band = min–max over seeds)".into(),
        x_label: "training tokens",
        y_label: "validation loss (nats/token)",
        y_cap: None,
        lines: groups
            .iter()
            .map(|g| {
                let stats = across_seeds(
                    g.runs
                        .iter()
                        .map(|r| r.val.iter().map(|v| (v.1 as f64, v.2)).collect())
                        .collect(),
                );
                let main = stats.iter().map(|s| (s.0, s.1)).collect();
                let band = stats.iter().map(|s| (s.0, s.2, s.3)).collect();
                (
                    format!("{} (n={})", g.label, g.runs.len()),
                    main,
                    band,
                    vec![],
                )
            })
            .collect(),
    }
}

fn train_curves(groups: &[Group]) -> Curves {
    Curves {
        title: "Train loss (seed mean; smoothed, raw faint)".into(),
        x_label: "step",
        y_label: "train loss (nats/token)",
        y_cap: None,
        lines: groups
            .iter()
            .map(|g| {
                let stats = across_seeds(
                    g.runs
                        .iter()
                        .map(|r| r.train.iter().map(|t| (t.0 as f64, t.2)).collect())
                        .collect(),
                );
                let raw: Vec<(f64, f64)> = stats.iter().map(|s| (s.0, s.1)).collect();
                (
                    format!("{} (n={})", g.label, g.runs.len()),
                    smooth(&raw),
                    vec![],
                    raw,
                )
            })
            .collect(),
    }
}

fn series_curves(
    groups: &[Group],
    title: &str,
    y_label: &'static str,
    pick: fn(&(u64, u64, f64, f64, f64)) -> f64,
) -> Curves {
    Curves {
        title: title.into(),
        x_label: "step",
        y_label,
        y_cap: None,
        lines: groups
            .iter()
            .map(|g| {
                let stats = across_seeds(
                    g.runs
                        .iter()
                        .map(|r| r.train.iter().map(|t| (t.0 as f64, pick(t))).collect())
                        .collect(),
                );
                (
                    g.label.clone(),
                    stats.iter().map(|s| (s.0, s.1)).collect(),
                    vec![],
                    vec![],
                )
            })
            .collect(),
    }
}

/// Draws `items` into the panels of `split`, once as `out/NAME.png` and once as `out/NAME.svg`
/// (the two backends are different types, so a function would need the drawing twice).
macro_rules! png_and_svg {
    ($out:expr, $name:expr, $size:expr, $split:expr, $items:expr, |$area:ident, $item:pat_param| $draw:expr) => {{
        let png = $out.join(format!("{}.png", $name));
        let svg = $out.join(format!("{}.svg", $name));
        {
            let root = BitMapBackend::new(&png, $size).into_drawing_area();
            root.fill(&WHITE).map_err(err)?;
            for ($area, $item) in root.split_evenly($split).iter().zip($items) {
                $draw?;
            }
            root.present().map_err(err)?;
        }
        {
            let root = SVGBackend::new(&svg, $size).into_drawing_area();
            root.fill(&WHITE).map_err(err)?;
            for ($area, $item) in root.split_evenly($split).iter().zip($items) {
                $draw?;
            }
            root.present().map_err(err)?;
        }
    }};
}

/// Writes `val_loss`, `train_loss` and `lr_grad_norm` as `.png` and `.svg` into `out`.
pub fn draw_all(groups: &[Group], out: &Path) -> Result<()> {
    register_fonts();
    let mut val = val_curves(groups);
    val.y_cap = highest_start(&val.lines).map(|y| y * 1.02);
    let mut train = train_curves(groups);
    train.y_cap = highest_start(&train.lines).map(|y| y * 1.02);
    let lr = series_curves(groups, "Learning rate (seed mean)", "learning rate", |t| {
        t.3
    });
    let mut norm = series_curves(
        groups,
        "Gradient norm before clipping (seed mean)",
        "global L2 norm",
        |t| t.4,
    );
    norm.y_cap = ten_medians(&norm.lines);
    for (name, curves) in [
        ("val_loss", vec![&val]),
        ("train_loss", vec![&train]),
        ("lr_grad_norm", vec![&lr, &norm]),
    ] {
        let height = 650 * curves.len() as u32;
        png_and_svg!(
            out,
            name,
            (1200, height),
            (curves.len(), 1),
            &curves,
            |area, c| { draw_curves(area, c) }
        );
    }
    Ok(())
}

/// `out/metric_NAME.png` and `.svg`: a logged metric over the steps, one line per group
/// (the mean over its seeds).
pub fn draw_metric(groups: &[Group], name: &str, out: &Path) -> Result<()> {
    register_fonts();
    let lines: Vec<Line> = groups
        .iter()
        .map(|g| {
            let stats = across_seeds(
                g.runs
                    .iter()
                    .map(|r| {
                        r.series
                            .get(name)
                            .into_iter()
                            .flatten()
                            .map(|&(step, v)| (step as f64, v))
                            .collect()
                    })
                    .collect(),
            );
            (
                g.label.clone(),
                stats.iter().map(|s| (s.0, s.1)).collect(),
                vec![],
                vec![],
            )
        })
        .collect();
    let mut curves = Curves {
        title: format!("{name} (seed mean)"),
        x_label: "step",
        y_label: "value",
        lines,
        y_cap: None,
    };
    curves.y_cap = ten_medians(&curves.lines);
    let stem = format!("metric_{}", metric_file_stem(name));
    png_and_svg!(out, stem, (1200, 650), (1, 1), [&curves], |area, c| {
        draw_curves(area, c)
    });
    Ok(())
}

/// One line of final validation losses at each x of one batch size: its name and (x, each
/// seed's loss).
pub type ArmLosses = (String, Vec<(f64, Vec<f64>)>);

/// What a final-loss panel puts on its log x axis: the peak lr, or 1 − β2 labelled as β2.
#[derive(Clone, Copy)]
enum FinalsAxis {
    Lr,
    OneMinusBeta2,
}

/// Final validation loss against `axis` (log scale), one line per arm through the seed means,
/// each seed a point; one panel per batch size.
fn draw_finals_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    batch: usize,
    arms: &[ArmLosses],
    axis: FinalsAxis,
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let points: Vec<(f64, f64)> = arms
        .iter()
        .flat_map(|(_, at)| {
            at.iter()
                .flat_map(|(lr, ls)| ls.iter().map(move |&l| (*lr, l)))
        })
        .filter(|p| p.0 > 0.0 && p.1.is_finite())
        .collect();
    if points.is_empty() {
        return Ok(());
    }
    let (_, _, y0, y1) = bounds(&points);
    // Headroom above the highest point for the legend, which would otherwise hide it.
    let y1 = y1 + 0.25 * (y1 - y0);
    // Margins in log space: a factor of 1.4 past the smallest and largest lr.
    let x0 = points.iter().map(|p| p.0).fold(f64::INFINITY, f64::min) / 1.4;
    let x1 = points.iter().map(|p| p.0).fold(0.0, f64::max) * 1.4;
    // Labelled ticks at the values that ran (a grid of factors of 2 falls between the log
    // mesh's 1-2-5 labels); light lines at 1..9 × 10^k.
    let mut lrs: Vec<f64> = points.iter().map(|p| p.0).collect();
    lrs.sort_by(f64::total_cmp);
    lrs.dedup();
    let decades = x0.log10().floor() as i32..=x1.log10().ceil() as i32;
    let light: Vec<f64> = decades
        .flat_map(|k| (1..10).map(move |m| m as f64 * 10f64.powi(k)))
        .filter(|x| (x0..=x1).contains(x))
        .collect();
    let mut chart = ChartBuilder::on(area)
        .caption(
            match axis {
                FinalsAxis::Lr => format!("Final validation loss against lr, batch {batch}"),
                FinalsAxis::OneMinusBeta2 => {
                    format!("Final validation loss against β2, batch {batch}")
                }
            },
            (FONT, 20),
        )
        .margin(12)
        .x_label_area_size(45)
        .y_label_area_size(65)
        .build_cartesian_2d(
            (x0..x1)
                .log_scale()
                .with_key_points(lrs)
                .with_light_points(light),
            y0..y1,
        )
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc(match axis {
            FinalsAxis::Lr => "peak learning rate (log scale)",
            FinalsAxis::OneMinusBeta2 => "β2 (log scale of 1 − β2), each arm at its best lr",
        })
        .y_desc("final validation loss")
        .label_style((FONT, 14))
        .axis_desc_style((FONT, 16))
        .x_label_formatter(&|x| match axis {
            FinalsAxis::Lr => format!("{x:e}"),
            // Rounded to the digits 1 − x carries: 1 − 0.001 prints as 0.999.
            FinalsAxis::OneMinusBeta2 => format!("{}", ((1.0 - x) * 1e6).round() / 1e6),
        })
        .y_label_formatter(&|y| format!("{y:.3}"))
        .draw()
        .map_err(err)?;
    for (i, (arm, at)) in arms.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let means: Vec<(f64, f64)> = at
            .iter()
            .filter_map(|(lr, ls)| {
                let finite: Vec<f64> = ls.iter().copied().filter(|l| l.is_finite()).collect();
                (!finite.is_empty() && finite.len() == ls.len())
                    .then(|| (*lr, finite.iter().sum::<f64>() / finite.len() as f64))
            })
            .collect();
        chart
            .draw_series(LineSeries::new(means, color.stroke_width(2)))
            .map_err(err)?
            .label(arm.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(3))
            });
        chart
            .draw_series(at.iter().flat_map(|(lr, ls)| {
                ls.iter()
                    .filter(|l| l.is_finite())
                    .map(move |&l| Circle::new((*lr, l), 4, color.filled()))
            }))
            .map_err(err)?;
    }
    chart
        .configure_series_labels()
        .label_font((FONT, 13))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperRight)
        .draw()
        .map_err(err)?;
    Ok(())
}

/// `lr_sensitivity.png` and `.svg`: `draw_lr_panel` for every batch size, largest first.
pub fn draw_lr_sensitivity(groups: &[Group], out: &Path) -> Result<()> {
    register_fonts();
    let mut batches: Vec<usize> = groups.iter().map(|g| g.batch).collect();
    batches.sort_unstable_by(|a, b| b.cmp(a));
    batches.dedup();
    let panels: Vec<(usize, Vec<ArmLosses>)> = batches
        .iter()
        .map(|&batch| {
            let mut arms: Vec<ArmLosses> = Vec::new();
            for g in groups.iter().filter(|g| g.batch == batch) {
                let finals: Vec<f64> = g
                    .runs
                    .iter()
                    .map(|r| r.val.last().map_or(f64::NAN, |v| v.2))
                    .collect();
                match arms.iter_mut().find(|(a, _)| *a == g.arm) {
                    Some((_, at)) => at.push((g.lr, finals)),
                    None => arms.push((g.arm.clone(), vec![(g.lr, finals)])),
                }
            }
            for (_, at) in &mut arms {
                at.sort_by(|a, b| a.0.total_cmp(&b.0));
            }
            (batch, arms)
        })
        .collect();
    let width = 700 * panels.len().max(1) as u32;
    png_and_svg!(
        out,
        "lr_sensitivity",
        (width, 600),
        (1, panels.len().max(1)),
        &panels,
        |area, (batch, arms)| draw_finals_panel(area, *batch, arms, FinalsAxis::Lr)
    );
    Ok(())
}

/// `beta2.png` and `.svg`: final validation loss against β2 (as 1 − β2 on a log axis), one line
/// per update rule through the seed means of each of its arms at its best lr, every seed a point;
/// one panel per batch size (`panels`, largest first).
pub fn draw_beta2(panels: &[(usize, Vec<ArmLosses>)], out: &Path) -> Result<()> {
    register_fonts();
    let width = 700 * panels.len().max(1) as u32;
    png_and_svg!(
        out,
        "beta2",
        (width, 600),
        (1, panels.len().max(1)),
        panels,
        |area, (batch, lines)| draw_finals_panel(area, *batch, lines, FinalsAxis::OneMinusBeta2)
    );
    Ok(())
}

/// A metric's name as a file name: `update_weight_ratio/block.3.mlp` → `update_weight_ratio_block.3.mlp`.
pub fn metric_file_stem(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::one_decimal;

    #[test]
    fn axis_numbers_keep_the_half_thousands_apart() {
        assert_eq!(one_decimal(1.5), "1.5");
        assert_eq!(one_decimal(2.0), "2");
        assert_eq!(one_decimal(2.5), "2.5");
    }
}
