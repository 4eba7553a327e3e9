//! The runs a study compares: reading a run directory's config, header and metrics, and grouping
//! runs that differ only in seed.

use crate::config::TrainConfig;
use crate::optim::OptimizerKind;
use crate::train::RunHeader;
use anyhow::{bail, Result};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// One run's metrics, as the report needs them.
#[derive(Debug, Clone)]
pub struct RunData {
    pub dir: PathBuf,
    pub cfg: TrainConfig,
    pub header: RunHeader,
    /// (step, tokens, loss or NaN for a skipped step, lr, grad norm)
    pub train: Vec<(u64, u64, f64, f64, f64)>,
    /// (step, tokens, loss)
    pub val: Vec<(u64, u64, f64)>,
    pub tok_per_s: Vec<f64>,
    /// Every number that training and diagnostics events log (`grad_norm`,
    /// `update_weight_ratio/block.3.mlp`, …) by name: (step, value).
    pub series: BTreeMap<String, Vec<(u64, f64)>>,
}

/// Reads a run directory (tolerating a torn last metrics line; a later event for a step wins).
pub fn read_run(dir: &Path) -> Result<RunData> {
    let cfg = crate::train::load_run_config(dir)?;
    let header = crate::train::load_run_header(dir)?;
    let text =
        std::fs::read_to_string(dir.join(crate::train::metrics::METRICS_FILE)).unwrap_or_default();
    let mut train = BTreeMap::new();
    let mut val = BTreeMap::new();
    let mut speed = BTreeMap::new();
    let mut series: BTreeMap<String, BTreeMap<u64, f64>> = BTreeMap::new();
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        let (Some(step), Some(tokens)) = (v["step"].as_u64(), v["tokens"].as_u64()) else {
            continue;
        };
        let num = |k: &str| v[k].as_f64().unwrap_or(f64::NAN);
        if matches!(v["split"].as_str(), Some("train" | "diag")) {
            for (key, value) in v.as_object().into_iter().flatten() {
                if let (Some(x), false) = (value.as_f64(), key == "step" || key == "tokens") {
                    series.entry(key.clone()).or_default().insert(step, x);
                }
            }
        }
        match v["split"].as_str() {
            Some("train") => {
                train.insert(
                    step,
                    (step, tokens, num("loss"), num("lr"), num("grad_norm")),
                );
                speed.insert(step, num("tok_per_s"));
            }
            Some("val") => {
                val.insert(step, (step, tokens, num("loss")));
            }
            _ => {}
        }
    }
    Ok(RunData {
        dir: dir.to_path_buf(),
        cfg,
        header,
        train: train.into_values().collect(),
        val: val.into_values().collect(),
        tok_per_s: speed.into_values().filter(|x| x.is_finite()).collect(),
        series: series
            .into_iter()
            .map(|(k, by_step)| (k, by_step.into_iter().collect()))
            .collect(),
    })
}

/// Run directories named on the command line: a directory without `config.toml` stands for the
/// run directories inside it (a sweep's output).
pub fn expand_run_dirs(paths: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for p in paths {
        if p.join("config.toml").is_file() {
            out.push(p.clone());
        } else if p.is_dir() {
            let mut inner: Vec<PathBuf> = std::fs::read_dir(p)?
                .flatten()
                .map(|e| e.path())
                .filter(|d| d.join("config.toml").is_file())
                .collect();
            if inner.is_empty() {
                bail!("{} holds no run directories", p.display());
            }
            inner.sort();
            out.extend(inner);
        } else {
            bail!("{} is not a run directory", p.display());
        }
    }
    Ok(out)
}

/// Runs that differ only in `seed` (and in how they log and checkpoint).
#[derive(Debug, Clone)]
pub struct Group {
    /// `arm, batch B, lr X`.
    pub label: String,
    /// The optimizer setting without its lr, in a few words ([`arm_names`]): `Adam β2=0.95`,
    /// `ADOPT`, …
    pub arm: String,
    /// Sequences per optimizer step (batch_size × grad_accum).
    pub batch: usize,
    /// Peak learning rate.
    pub lr: f64,
    pub runs: Vec<RunData>,
}

/// Keys that do not change what a run computes, only how often it reports and what it keeps.
const BOOKKEEPING_KEYS: &[&str] = &["eval_interval", "log_interval", "keep_last", "cache_dir"];

/// Keys that make up an optimizer setting: two groups that differ only in these are compared
/// pairwise in the report.
const OPTIMIZER_KEYS: &[&str] = &[
    "optimizer",
    "variant",
    "betas",
    "eps",
    "weight_decay",
    "decay_1d",
    "decouple",
    "clip_exponent",
    "momentum",
    "nesterov",
    "ns_steps",
    "ns_coefficients",
    "adjust_lr",
    "newton_schulz_dtype",
    "adamw_lr",
    "adamw_betas",
    "adamw_eps",
    "adamw_weight_decay",
    "lr",
    "min_lr",
];

/// Keys that set the learning rate: an arm is one optimizer setting at any of them.
const LR_KEYS: &[&str] = &["lr", "min_lr"];

/// The config with `seed` and the bookkeeping keys removed, and `also` removed too.
fn config_key(cfg: &TrainConfig, also: &[&str]) -> Result<String> {
    let mut t = cfg.to_table()?;
    for key in BOOKKEEPING_KEYS.iter().chain(also).chain(&["seed"]) {
        t.remove(*key);
    }
    Ok(toml::to_string(&t)?)
}

fn group_key(cfg: &TrainConfig) -> Result<String> {
    config_key(cfg, &[])
}

/// Whether two groups differ in their optimizer setting only (same batch, data, schedule, steps).
pub(crate) fn differ_only_in_optimizer(a: &Group, b: &Group) -> bool {
    let key = |g: &Group| config_key(&g.runs[0].cfg, OPTIMIZER_KEYS).ok();
    matches!((key(a), key(b)), (Some(x), Some(y)) if x == y)
}

/// The optimizer setting of a config apart from its lr (what makes an arm).
fn arm_key(cfg: &TrainConfig) -> Result<String> {
    let mut t = cfg.to_table()?;
    t.retain(|k, _| {
        let k: &str = k;
        OPTIMIZER_KEYS.contains(&k) && !LR_KEYS.contains(&k)
    });
    Ok(toml::to_string(&t)?)
}

/// Short names for the arms of `configs` (one per distinct `arm_key`), as legends want them:
/// `Adam β2=0.95` (AdamW, the paper's "Adam"), `Adam (L2) β2=…` (coupled decay), `ADOPT`,
/// `ADOPT (original)`; where two arms would share a name, eps, then weight decay, then a number
/// tell them apart.
pub fn arm_names(configs: &[&TrainConfig]) -> Result<Vec<String>> {
    let short = |cfg: &TrainConfig, detail: usize| -> String {
        let [_, b2] = cfg.betas.unwrap_or([f64::NAN; 2]);
        let mut s = match cfg.optimizer {
            OptimizerKind::AdamW => format!("Adam β2={b2}"),
            OptimizerKind::Adam => format!("Adam (L2) β2={b2}"),
            OptimizerKind::Adopt => match cfg.variant {
                Some(crate::optim::AdoptVariant::Original) => format!("ADOPT (original) β2={b2}"),
                _ => format!("ADOPT β2={b2}"),
            },
            OptimizerKind::Muon => format!(
                "Muon μ={}{}",
                cfg.momentum.unwrap_or(f64::NAN),
                if cfg.nesterov == Some(false) {
                    " (no Nesterov)"
                } else {
                    ""
                }
            ),
        };
        if cfg.optimizer == OptimizerKind::Adopt && (b2 - 0.9999).abs() < 1e-12 {
            // ADOPT's own β2 goes without saying.
            s.truncate(s.rfind(" β2=").unwrap_or(s.len()));
        }
        if detail >= 1 && cfg.optimizer == OptimizerKind::Muon {
            // The keys' own spellings (`match_rms_adamw`, `bf16`).
            let key = |v: serde_json::Result<serde_json::Value>| {
                v.ok()
                    .and_then(|v| v.as_str().map(String::from))
                    .unwrap_or_default()
            };
            s.push_str(&format!(
                " {} steps {} in {}, AdamW lr {}",
                cfg.ns_steps.unwrap_or(0),
                key(serde_json::to_value(cfg.adjust_lr)),
                key(serde_json::to_value(cfg.newton_schulz_dtype)),
                cfg.adamw_lr.unwrap_or(f64::NAN)
            ));
        } else if detail >= 1 {
            s.push_str(&format!(" eps {:e}", cfg.eps.unwrap_or(f64::NAN)));
        }
        if detail >= 2 {
            s.push_str(&format!(
                " wd {}{}",
                cfg.weight_decay.unwrap_or(0.0),
                if cfg.decouple == Some(true) {
                    " decoupled"
                } else {
                    ""
                }
            ));
        }
        s
    };
    let keys = configs
        .iter()
        .map(|c| arm_key(c))
        .collect::<Result<Vec<_>>>()?;
    let mut names: Vec<String> = configs.iter().map(|c| short(c, 0)).collect();
    for detail in 1..=3 {
        let clash = |i: usize, names: &[String]| {
            (0..names.len()).any(|j| names[j] == names[i] && keys[j] != keys[i])
        };
        let clashing: Vec<usize> = (0..names.len()).filter(|&i| clash(i, &names)).collect();
        if clashing.is_empty() {
            break;
        }
        for i in clashing {
            names[i] = if detail <= 2 {
                short(configs[i], detail)
            } else {
                let distinct: Vec<&String> = keys.iter().fold(Vec::new(), |mut seen, k| {
                    if !seen.contains(&k) {
                        seen.push(k);
                    }
                    seen
                });
                let n = distinct.iter().position(|k| **k == keys[i]).unwrap_or(0) + 1;
                format!("{} [#{n}]", names[i])
            };
        }
    }
    Ok(names)
}

/// Groups runs, refusing to mix data, tokenizers or model shapes.
pub fn group_runs(runs: Vec<RunData>) -> Result<Vec<Group>> {
    let Some(first) = runs.first() else {
        bail!("no runs to compare");
    };
    let reference = first.header.clone();
    for r in &runs {
        let h = &r.header;
        let differs = if h.corpus_sha256 != reference.corpus_sha256 {
            Some("data (corpus sha256)")
        } else if h.tokenizer_sha256 != reference.tokenizer_sha256 {
            Some("tokenizer")
        } else if h.model != reference.model {
            Some("model shape")
        } else {
            None
        };
        if let Some(what) = differs {
            bail!(
                "{} and {} differ in {what}; compare runs on the same data, tokenizer and model",
                first.dir.display(),
                r.dir.display()
            );
        }
    }
    let mut groups: Vec<(String, Group)> = Vec::new();
    for r in runs {
        let key = group_key(&r.cfg)?;
        match groups.iter_mut().find(|(k, _)| *k == key) {
            Some((_, g)) => g.runs.push(r),
            None => groups.push((
                key,
                Group {
                    label: String::new(),
                    arm: String::new(),
                    batch: r.cfg.batch_size * r.cfg.grad_accum,
                    lr: r.cfg.lr.unwrap_or(f64::NAN),
                    runs: vec![r],
                },
            )),
        }
    }
    let mut out: Vec<Group> = groups.into_iter().map(|(_, g)| g).collect();
    let names = arm_names(&out.iter().map(|g| &g.runs[0].cfg).collect::<Vec<_>>())?;
    for (g, name) in out.iter_mut().zip(names) {
        g.label = format!("{name}, batch {}, lr {:e}", g.batch, g.lr);
        g.arm = name;
    }
    // Two groups with the same label differ elsewhere (schedule, steps, …): number them.
    let labels: Vec<String> = out.iter().map(|g| g.label.clone()).collect();
    for (i, g) in out.iter_mut().enumerate() {
        if labels.iter().filter(|l| **l == g.label).count() > 1 {
            g.label = format!("{} [#{}]", g.label, i + 1);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(overrides: &[&str]) -> TrainConfig {
        let o: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
        TrainConfig::from_layers(None, &o).unwrap()
    }

    #[test]
    fn muon_arms_are_named_by_their_own_hyperparameters() {
        let (adamw, muon, plain, f32_ns) = (
            cfg(&["betas=[0.9, 0.95]"]),
            cfg(&["optimizer=\"muon\""]),
            cfg(&["optimizer=\"muon\"", "nesterov=false", "momentum=0.9"]),
            cfg(&["optimizer=\"muon\"", "newton_schulz_dtype=\"f32\""]),
        );
        let names = arm_names(&[&adamw, &muon, &plain]).unwrap();
        assert_eq!(
            names,
            ["Adam β2=0.95", "Muon μ=0.95", "Muon μ=0.9 (no Nesterov)"]
        );
        // Two Muon arms that differ beyond μ are told apart by the iteration's settings.
        let names = arm_names(&[&muon, &f32_ns]).unwrap();
        assert_ne!(names[0], names[1]);
        assert_eq!(
            names[1],
            "Muon μ=0.95 5 steps original in f32, AdamW lr 0.001"
        );
        assert!(names[0].contains("in bf16"), "{names:?}");
        // An lr sweep of one Muon arm is one arm.
        let faster = cfg(&["optimizer=\"muon\"", "lr=0.05"]);
        assert_eq!(arm_key(&muon).unwrap(), arm_key(&faster).unwrap());
    }
}
