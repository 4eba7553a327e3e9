//! The ADOPT paper's online convex problem (see `gpt_pretrain::study::toy`): Adam against ADOPT for
//! k ∈ {10, 50} and β2 ∈ {0.1, 0.5, 0.999}, several seeds. Prints the final θ (mean ± sd; the
//! optimum is −1) and draws θ over time for the first seed to PNG and SVG.
//!
//! cargo run --release --example toy_convergence -- [--steps N] [--seeds N] [--out DIR]

use anyhow::{Context, Result};
use gpt_pretrain::study::plots::{register_fonts, FONT};
use gpt_pretrain::study::toy::{simulate, ToyOptimizer, ToyRun};
use plotters::coord::Shift;
use plotters::prelude::*;
use std::path::PathBuf;

const OPTIMIZERS: [ToyOptimizer; 3] = [
    ToyOptimizer::Adam,
    ToyOptimizer::Adopt,
    ToyOptimizer::AdoptOriginal,
];
const KS: [f64; 2] = [10.0, 50.0];
const BETA2S: [f64; 3] = [0.1, 0.5, 0.999];

fn arg<T: std::str::FromStr>(args: &[String], name: &str, default: T) -> Result<T> {
    match args.iter().position(|a| a == name) {
        Some(i) => args
            .get(i + 1)
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("{name} needs a value")),
        None => Ok(default),
    }
}

fn mean_sd(xs: &[f64]) -> (f64, f64) {
    let mean = xs.iter().sum::<f64>() / xs.len() as f64;
    let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (xs.len().max(2) - 1) as f64;
    (mean, var.sqrt())
}

fn draw<DB: DrawingBackend>(
    root: DrawingArea<DB, Shift>,
    curves: &[(f64, f64, Vec<Vec<f64>>)],
    steps: usize,
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let root = root
        .titled(
            "ADOPT paper's online convex problem: θ over time (optimum θ* = −1)",
            (FONT, 26),
        )
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let panels = root.split_evenly((KS.len(), BETA2S.len()));
    let colors = [
        RGBColor(214, 39, 40),
        RGBColor(31, 119, 180),
        RGBColor(44, 160, 44),
    ];
    for (panel, (k, beta2, lines)) in panels.iter().zip(curves) {
        let mut chart = ChartBuilder::on(panel)
            .caption(format!("k = {k}, β2 = {beta2}"), (FONT, 18))
            .margin(10)
            .x_label_area_size(35)
            .y_label_area_size(45)
            .build_cartesian_2d(0f64..steps as f64, -1.05f64..1.05)
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        chart
            .configure_mesh()
            .x_desc("step")
            .y_desc("θ")
            .label_style((FONT, 12))
            .x_labels(5)
            .x_label_formatter(&|x| format!("{:.0}k", x / 1000.0))
            .draw()
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        for ((opt, line), color) in OPTIMIZERS.iter().zip(lines).zip(colors) {
            let stride = (line.len() / 1500).max(1);
            let points = line
                .iter()
                .enumerate()
                .step_by(stride)
                .map(|(t, &y)| (t as f64, y));
            chart
                .draw_series(LineSeries::new(points, color.stroke_width(2)))
                .map_err(|e| anyhow::anyhow!("{e:?}"))?
                .label(opt.label())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                });
        }
        chart
            .configure_series_labels()
            .label_font((FONT, 13))
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .position(SeriesLabelPosition::MiddleRight)
            .draw()
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    }
    root.present().map_err(|e| anyhow::anyhow!("{e:?}"))?;
    Ok(())
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let steps: usize = arg(&args, "--steps", 1_000_000)?;
    let seeds: u64 = arg(&args, "--seeds", 5)?;
    let out = PathBuf::from(arg(&args, "--out", "runs/toy".to_string())?);
    std::fs::create_dir_all(&out)?;
    println!("online convex problem, {steps} steps, {seeds} seeds, α = 0.01, β1 = 0.9; final θ (optimum −1), mean ± sd");
    println!("| k | β2 | {} |", OPTIMIZERS.map(|o| o.label()).join(" | "));
    println!("|---|---|{}", "---|".repeat(OPTIMIZERS.len()));
    let mut curves = Vec::new();
    for k in KS {
        for beta2 in BETA2S {
            let mut cells = Vec::new();
            let mut first_seed = Vec::new();
            for opt in OPTIMIZERS {
                let mut finals = Vec::new();
                for seed in 0..seeds {
                    let run = ToyRun {
                        k,
                        beta1: 0.9,
                        beta2,
                        alpha: 0.01,
                        steps,
                        seed,
                    };
                    let trajectory = simulate(opt, &run)?;
                    finals.push(*trajectory.last().unwrap());
                    if seed == 0 {
                        first_seed.push(trajectory);
                    }
                }
                let (mean, sd) = mean_sd(&finals);
                cells.push(format!("{mean:+.3} ± {sd:.3}"));
            }
            println!("| {k} | {beta2} | {} |", cells.join(" | "));
            curves.push((k, beta2, first_seed));
        }
    }
    register_fonts();
    let png = out.join("toy_convergence.png");
    let svg = out.join("toy_convergence.svg");
    draw(
        BitMapBackend::new(&png, (1500, 900)).into_drawing_area(),
        &curves,
        steps,
    )?;
    draw(
        SVGBackend::new(&svg, (1500, 900)).into_drawing_area(),
        &curves,
        steps,
    )?;
    println!("wrote {} and {}", png.display(), svg.display());
    Ok(())
}
