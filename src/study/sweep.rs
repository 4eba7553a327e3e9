//! `gpt-pretrain sweep`: every combination of a grid of config values × seeds, each as its own
//! run directory under one folder, one after another. Re-running the same command skips finished
//! runs and resumes unfinished ones from their newest checkpoint.

use crate::config::{parse_override, TrainConfig};
use crate::train::{train_new, train_resume, Reporting, ResumeOptions};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

/// One grid axis: a config key and the values it takes.
#[derive(Debug, Clone, PartialEq)]
pub struct Axis {
    pub key: String,
    pub values: Vec<String>,
}

/// Splits `key=v1,v2,…` (commas inside brackets or quotes belong to a value: `betas=[0.9,0.95],[0.9,0.99]`).
pub fn parse_axis(spec: &str) -> Result<Axis> {
    let (key, values) = spec
        .split_once('=')
        .with_context(|| format!("--grid '{spec}' is not key=v1,v2,..."))?;
    let (mut out, mut cur, mut depth, mut quoted) = (Vec::new(), String::new(), 0i32, false);
    for ch in values.chars() {
        match ch {
            '"' => quoted = !quoted,
            '[' if !quoted => depth += 1,
            ']' if !quoted => depth -= 1,
            ',' if depth == 0 && !quoted => {
                out.push(std::mem::take(&mut cur));
                continue;
            }
            _ => {}
        }
        cur.push(ch);
    }
    out.push(cur);
    let values: Vec<String> = out
        .into_iter()
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
        .collect();
    if values.is_empty() {
        bail!("--grid '{spec}' has no values");
    }
    Ok(Axis {
        key: key.trim().to_string(),
        values,
    })
}

/// Every combination of the axes, as lists of `key=value`, first axis slowest.
pub fn combinations(axes: &[Axis]) -> Vec<Vec<String>> {
    let mut out = vec![vec![]];
    for axis in axes {
        out = out
            .into_iter()
            .flat_map(|prefix| {
                axis.values.iter().map(move |v| {
                    let mut next = prefix.clone();
                    next.push(format!("{}={v}", axis.key));
                    next
                })
            })
            .collect();
    }
    out
}

/// A directory name for one combination: `key-value_…_seed-S`, with unsafe characters replaced.
pub fn run_name(assignments: &[String], seed: u64) -> String {
    let mut parts: Vec<String> = assignments
        .iter()
        .map(|a| {
            a.replace('=', "-")
                .chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || "-.".contains(c) {
                        c
                    } else {
                        '_'
                    }
                })
                .collect()
        })
        .collect();
    parts.push(format!("seed-{seed}"));
    parts.join("_")
}

/// What a sweep did.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct SweepSummary {
    pub already_done: usize,
    pub resumed: usize,
    pub started: usize,
    pub run_dirs: Vec<PathBuf>,
}

impl std::fmt::Display for SweepSummary {
    /// `N runs (D already done, R resumed, S started)`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} runs ({} already done, {} resumed, {} started)",
            self.run_dirs.len(),
            self.already_done,
            self.resumed,
            self.started
        )
    }
}

fn is_done(run_dir: &Path) -> Result<bool> {
    let cfg = crate::train::load_run_config(run_dir)?;
    Ok(crate::train::checkpoint::list_complete(run_dir)?
        .last()
        .is_some_and(|(step, _)| *step >= cfg.max_steps as u64))
}

/// Runs (or finishes) every combination of `axes` × `seeds` on top of `base` and `overrides`.
pub fn sweep(
    base: Option<toml::Table>,
    overrides: &[String],
    axes: &[Axis],
    seeds: &[u64],
    out: &Path,
    reporting: &Reporting,
) -> Result<SweepSummary> {
    if seeds.is_empty() {
        bail!("--seeds needs at least one seed");
    }
    let combos = combinations(axes);
    // Validate every configuration before training any.
    let mut plan = Vec::new();
    for combo in &combos {
        for &seed in seeds {
            let mut layer: Vec<String> = overrides.to_vec();
            layer.extend(combo.iter().cloned());
            layer.push(format!("seed={seed}"));
            for a in &layer {
                parse_override(a)?;
            }
            let cfg = TrainConfig::from_layers(base.clone(), &layer)
                .with_context(|| format!("combination {}", combo.join(" ")))?;
            plan.push((out.join(run_name(combo, seed)), cfg));
        }
    }
    let mut summary = SweepSummary::default();
    for (i, (dir, cfg)) in plan.into_iter().enumerate() {
        let has_checkpoint = !crate::train::checkpoint::list_complete(&dir)?.is_empty();
        if dir.join("config.toml").is_file() && is_done(&dir)? {
            summary.already_done += 1;
        } else if has_checkpoint {
            if !reporting.quiet {
                println!(
                    "== sweep run {} of {}: resuming {}",
                    i + 1,
                    summary_len(&combos, seeds),
                    dir.display()
                );
            }
            train_resume(&dir, None, &[], &ResumeOptions::default(), reporting)?;
            summary.resumed += 1;
        } else {
            if dir.exists() {
                // Stopped before its first checkpoint: nothing of it was saved.
                eprintln!(
                    "warning: {} has no checkpoint; starting it again",
                    dir.display()
                );
                std::fs::remove_dir_all(&dir)
                    .with_context(|| format!("cannot remove {}", dir.display()))?;
            }
            if !reporting.quiet {
                println!(
                    "== sweep run {} of {}: {}",
                    i + 1,
                    summary_len(&combos, seeds),
                    dir.display()
                );
            }
            train_new(cfg, &dir, reporting)?;
            summary.started += 1;
        }
        summary.run_dirs.push(dir);
    }
    Ok(summary)
}

fn summary_len(combos: &[Vec<String>], seeds: &[u64]) -> usize {
    combos.len() * seeds.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn axes_split_on_top_level_commas_only() {
        let a = parse_axis("betas=[0.9,0.95],[0.9, 0.99]").unwrap();
        assert_eq!(a.values, vec!["[0.9,0.95]", "[0.9, 0.99]"]);
        let b = parse_axis("optimizer=adam,adamw,adopt").unwrap();
        assert_eq!(b.values.len(), 3);
        assert!(parse_axis("optimizer").is_err());
        assert!(parse_axis("optimizer=").is_err());
    }

    #[test]
    fn combinations_are_the_cartesian_product_in_order() {
        let axes = vec![
            Axis {
                key: "a".into(),
                values: vec!["1".into(), "2".into()],
            },
            Axis {
                key: "b".into(),
                values: vec!["x".into(), "y".into(), "z".into()],
            },
        ];
        let c = combinations(&axes);
        assert_eq!(c.len(), 6);
        assert_eq!(c[0], vec!["a=1", "b=x"]);
        assert_eq!(c[5], vec!["a=2", "b=z"]);
        assert_eq!(run_name(&c[1], 3), "a-1_b-y_seed-3");
        assert_eq!(
            run_name(&["betas=[0.9, 0.95]".to_string()], 0),
            "betas-_0.9__0.95__seed-0"
        );
    }
}
