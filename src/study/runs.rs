//! The runs a study compares: reading a run directory's config, header and metrics, and grouping
//! runs that differ only in seed.

use crate::config::TrainConfig;
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
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        let (Some(step), Some(tokens)) = (v["step"].as_u64(), v["tokens"].as_u64()) else {
            continue;
        };
        let num = |k: &str| v[k].as_f64().unwrap_or(f64::NAN);
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
    pub label: String,
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
    "lr",
    "min_lr",
];

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

/// What identifies an optimizer setting in a label.
fn describe(cfg: &TrainConfig) -> String {
    let [b1, b2] = cfg.betas.unwrap_or([f64::NAN; 2]);
    let mut s = format!("{:?}", cfg.optimizer).to_lowercase();
    if let Some(v) = cfg.variant {
        s.push_str(&format!(" ({v:?})").to_lowercase());
    }
    s.push_str(&format!(
        ", batch {}, lr {:e}, betas ({b1}, {b2}), eps {:e}, wd {}",
        cfg.batch_size * cfg.grad_accum,
        cfg.lr.unwrap_or(f64::NAN),
        cfg.eps.unwrap_or(f64::NAN),
        cfg.weight_decay.unwrap_or(0.0)
    ));
    if cfg.decouple == Some(true) {
        s.push_str(" decoupled");
    }
    s
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
                    label: describe(&r.cfg),
                    runs: vec![r],
                },
            )),
        }
    }
    // Two groups with the same description differ elsewhere: number them.
    let mut out: Vec<Group> = groups.into_iter().map(|(_, g)| g).collect();
    let labels: Vec<String> = out.iter().map(|g| g.label.clone()).collect();
    for (i, g) in out.iter_mut().enumerate() {
        if labels.iter().filter(|l| **l == g.label).count() > 1 {
            g.label = format!("{} [#{}]", g.label, i + 1);
        }
    }
    Ok(out)
}
