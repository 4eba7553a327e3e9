//! `gpt-pretrain compare`: groups runs that differ only in seed, summarises each group, tests the
//! differences between groups, and draws the curves.
//!
//! Definitions used in the report:
//! - final / best validation loss: the last / lowest `val` event of a run;
//! - tokens to target: training tokens at the first evaluation whose loss ≤ `--target-loss`;
//! - loss spike: a train loss above 1.1× the median of the previous 50 train losses (once 10
//!   exist); skipped (non-finite) steps count as spikes too;
//! - significance: Welch's two-sided t-test on final validation loss across seeds, p < 0.05;
//!   "not significant" otherwise, "not testable" with fewer than two seeds on a side.

use crate::config::TrainConfig;
use crate::train::RunHeader;
use anyhow::{bail, Context, Result};
use serde_json::Value;
use statrs::distribution::{ContinuousCDF, StudentsT};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// Spike rule: factor over the running median, window, and minimum history.
pub const SPIKE_FACTOR: f64 = 1.1;
pub const SPIKE_WINDOW: usize = 50;
const SPIKE_MIN_HISTORY: usize = 10;

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

fn median(xs: &[f64]) -> f64 {
    let mut v: Vec<f64> = xs.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Loss spikes in a train-loss series (see the module docs for the rule).
pub fn count_spikes(losses: &[f64]) -> usize {
    let mut spikes = 0;
    for t in 0..losses.len() {
        if !losses[t].is_finite() {
            spikes += 1;
            continue;
        }
        let history = &losses[t.saturating_sub(SPIKE_WINDOW)..t];
        if history.iter().filter(|x| x.is_finite()).count() >= SPIKE_MIN_HISTORY
            && losses[t] > SPIKE_FACTOR * median(history)
        {
            spikes += 1;
        }
    }
    spikes
}

/// Mean and sample standard deviation (NaN with one value).
pub fn mean_sd(xs: &[f64]) -> (f64, f64) {
    let n = xs.len() as f64;
    let mean = xs.iter().sum::<f64>() / n;
    let sd = if xs.len() < 2 {
        f64::NAN
    } else {
        (xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt()
    };
    (mean, sd)
}

/// Welch's two-sided t-test: (t, degrees of freedom, p), or `None` with fewer than two values on
/// a side or no variance at all.
pub fn welch(a: &[f64], b: &[f64]) -> Option<(f64, f64, f64)> {
    if a.len() < 2 || b.len() < 2 {
        return None;
    }
    let (ma, sa) = mean_sd(a);
    let (mb, sb) = mean_sd(b);
    let (va, vb) = (sa * sa / a.len() as f64, sb * sb / b.len() as f64);
    if va + vb == 0.0 {
        return None;
    }
    let t = (ma - mb) / (va + vb).sqrt();
    let df =
        (va + vb).powi(2) / (va * va / (a.len() as f64 - 1.0) + vb * vb / (b.len() as f64 - 1.0));
    let dist = StudentsT::new(0.0, 1.0, df).ok()?;
    let p = 2.0 * (1.0 - dist.cdf(t.abs()));
    Some((t, df, p))
}

/// Paired two-sided t-test on matched values (`a[i]` with `b[i]`: the same seed, so the same
/// initialisation and batches): (mean of a − b, t, degrees of freedom, p), or `None` with fewer
/// than two pairs or differences without variance.
pub fn paired_t(a: &[f64], b: &[f64]) -> Option<(f64, f64, f64, f64)> {
    let d: Vec<f64> = a.iter().zip(b).map(|(x, y)| x - y).collect();
    if d.len() < 2 {
        return None;
    }
    let (mean, sd) = mean_sd(&d);
    if sd == 0.0 || !sd.is_finite() {
        return None;
    }
    let t = mean / (sd / (d.len() as f64).sqrt());
    let df = d.len() as f64 - 1.0;
    let dist = StudentsT::new(0.0, 1.0, df).ok()?;
    Some((mean, t, df, 2.0 * (1.0 - dist.cdf(t.abs()))))
}

/// Final validation losses of the seeds two groups share, in matching order.
fn shared_seed_finals(
    a: &Group,
    sa: &GroupStats,
    b: &Group,
    sb: &GroupStats,
) -> (Vec<f64>, Vec<f64>) {
    let mut pairs = (Vec::new(), Vec::new());
    for (ra, fa) in a.runs.iter().zip(&sa.final_val) {
        if let Some(k) = b.runs.iter().position(|rb| rb.cfg.seed == ra.cfg.seed) {
            pairs.0.push(*fa);
            pairs.1.push(sb.final_val[k]);
        }
    }
    pairs
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
fn differ_only_in_optimizer(a: &Group, b: &Group) -> bool {
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

/// One group's summary.
#[derive(Debug, Clone)]
pub struct GroupStats {
    pub final_val: Vec<f64>,
    pub best_val: Vec<f64>,
    pub tokens_to_target: Vec<Option<u64>>,
    pub spikes: Vec<usize>,
    pub diverged: Vec<bool>,
    pub finished: Vec<bool>,
    pub tok_per_s: f64,
}

/// Summarises a group; `target` is the validation loss whose first crossing is reported.
pub fn stats(group: &Group, target: Option<f64>) -> GroupStats {
    let mut s = GroupStats {
        final_val: vec![],
        best_val: vec![],
        tokens_to_target: vec![],
        spikes: vec![],
        diverged: vec![],
        finished: vec![],
        tok_per_s: f64::NAN,
    };
    let mut speeds = Vec::new();
    for r in &group.runs {
        let vals: Vec<f64> = r.val.iter().map(|v| v.2).collect();
        s.final_val.push(vals.last().copied().unwrap_or(f64::NAN));
        s.best_val
            .push(vals.iter().copied().fold(f64::NAN, f64::min));
        s.tokens_to_target
            .push(target.and_then(|t| r.val.iter().find(|v| v.2 <= t).map(|v| v.1)));
        let losses: Vec<f64> = r.train.iter().map(|t| t.2).collect();
        s.spikes.push(count_spikes(&losses));
        s.diverged.push(losses.iter().any(|l| !l.is_finite()));
        let last = r.train.last().map_or(0, |t| t.0);
        s.finished.push(last >= r.cfg.max_steps as u64);
        speeds.push(median(&r.tok_per_s));
    }
    s.tok_per_s = median(&speeds);
    s
}

/// "mean ± sd" of the finite values with `decimals` places ("mean" alone for one value).
fn fmt_mean_sd(xs: &[f64], decimals: usize) -> String {
    let finite: Vec<f64> = xs.iter().copied().filter(|x| x.is_finite()).collect();
    if finite.is_empty() {
        return "—".into();
    }
    let (m, sd) = mean_sd(&finite);
    if sd.is_nan() {
        format!("{m:.decimals$}")
    } else {
        format!("{m:.decimals$} ± {sd:.decimals$}")
    }
}

/// The markdown report.
pub fn report(groups: &[Group], target: Option<f64>) -> String {
    let all: Vec<GroupStats> = groups.iter().map(|g| stats(g, target)).collect();
    let first = &groups[0].runs[0];
    let mut md = String::new();
    let _ = writeln!(md, "# Optimizer comparison\n");
    let m = &first.header.model;
    let _ = writeln!(
        md,
        "Data `{}` (sha256 {}), model {} layers × {} wide, {} heads, block {}, vocabulary {} ({:.2}M parameters). Runs: {}.\n",
        first.header.corpus,
        &first.header.corpus_sha256[..12],
        m.n_layer,
        m.n_embd,
        m.n_head,
        m.block_size,
        m.vocab_size,
        first.header.n_params as f64 / 1e6,
        groups.iter().map(|g| g.runs.len()).sum::<usize>()
    );
    let target_col = match target {
        Some(t) => format!("tokens to val ≤ {t}"),
        None => "tokens to target".into(),
    };
    let _ = writeln!(
        md,
        "| group | seeds | final val loss | best val loss | {target_col} | loss spikes | diverged | finished | tok/s |"
    );
    let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (g, s) in groups.iter().zip(&all) {
        let reached: Vec<f64> = s
            .tokens_to_target
            .iter()
            .flatten()
            .map(|&t| t as f64)
            .collect();
        let to_target = if target.is_none() {
            "—".into()
        } else if reached.is_empty() {
            "not reached".into()
        } else {
            format!(
                "{} ({} of {})",
                fmt_mean_sd(&reached, 0),
                reached.len(),
                s.tokens_to_target.len()
            )
        };
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {:.0} |",
            g.label,
            g.runs.len(),
            fmt_mean_sd(&s.final_val, 4),
            fmt_mean_sd(&s.best_val, 4),
            to_target,
            s.spikes
                .iter()
                .map(|x| x.to_string())
                .collect::<Vec<_>>()
                .join(", "),
            s.diverged.iter().filter(|d| **d).count(),
            s.finished.iter().filter(|d| **d).count(),
            s.tok_per_s
        );
    }
    let _ = writeln!(md, "\n## Pairwise differences in final validation loss\n");
    let all_pairs: Vec<(usize, usize)> = (0..groups.len())
        .flat_map(|i| (i + 1..groups.len()).map(move |j| (i, j)))
        .collect();
    let optimizer_pairs: Vec<(usize, usize)> = all_pairs
        .iter()
        .copied()
        .filter(|&(i, j)| differ_only_in_optimizer(&groups[i], &groups[j]))
        .collect();
    let pairs = if optimizer_pairs.is_empty() {
        let _ = writeln!(md, "Every pair of groups:\n");
        all_pairs
    } else {
        let _ = writeln!(
            md,
            "Pairs of groups that differ only in the optimizer setting (same batch size, data, \
             schedule and steps); {} other pairs are left out.\n",
            all_pairs.len() - optimizer_pairs.len()
        );
        optimizer_pairs
    };
    let _ = writeln!(
        md,
        "| A | B | mean A − B | Welch t | df | p | verdict | paired by seed: mean A − B, t, p |"
    );
    let _ = writeln!(md, "|---|---|---:|---:|---:|---:|---|---|");
    for (i, j) in pairs {
        let (pa, pb) = shared_seed_finals(&groups[i], &all[i], &groups[j], &all[j]);
        let paired = match paired_t(&pa, &pb) {
            Some((d, t, _, p)) => format!("{d:+.4}, {t:.2}, {p:.3} ({} seeds)", pa.len()),
            None => "—".into(),
        };
        let (a, b) = (&all[i].final_val, &all[j].final_val);
        let diff = mean_sd(a).0 - mean_sd(b).0;
        let (t, df, p, verdict) = match welch(a, b) {
            Some((t, df, p)) => (
                format!("{t:.2}"),
                format!("{df:.1}"),
                format!("{p:.3}"),
                if p < 0.05 {
                    format!("significant: {} lower", if diff < 0.0 { "A" } else { "B" })
                } else {
                    "not significant".to_string()
                },
            ),
            None => (
                "—".into(),
                "—".into(),
                "—".into(),
                "not testable (fewer than 2 seeds)".into(),
            ),
        };
        let _ = writeln!(
            md,
            "| {} | {} | {diff:+.4} | {t} | {df} | {p} | {verdict} | {paired} |",
            groups[i].label, groups[j].label
        );
    }
    let _ = writeln!(
        md,
        "\nDefinitions: final/best = last/lowest validation evaluation (fixed windows, same for every run). \
         A loss spike is a train loss above {SPIKE_FACTOR}× the median of the previous {SPIKE_WINDOW} train losses \
         (once {SPIKE_MIN_HISTORY} exist), or a skipped non-finite step. Diverged = a non-finite train loss. \
         Significance (the verdict): Welch's two-sided t-test across seeds, p < 0.05; no correction for multiple comparisons. \
         The paired column tests the per-seed differences instead (runs with the same seed start from the same \
         weights and see the same batches), two-sided, n − 1 degrees of freedom. \
         Runs still going or stopped early are included as they are (see \"finished\")."
    );
    md
}

/// Reads, groups and reports: writes `report.md` and the plots into `out`; returns the report.
pub fn compare(paths: &[PathBuf], out: &Path, target: Option<f64>) -> Result<String> {
    let dirs = expand_run_dirs(paths)?;
    let runs = dirs
        .iter()
        .map(|d| read_run(d))
        .collect::<Result<Vec<_>>>()?;
    let groups = group_runs(runs)?;
    let md = report(&groups, target);
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    crate::fsutil::write_atomic(&out.join("report.md"), md.as_bytes())?;
    crate::study::plots::draw_all(&groups, out)?;
    Ok(md)
}
