//! `gpt-pretrain compare`: groups runs that differ only in seed, summarises each group, tests the
//! differences between groups, and draws the curves.
//!
//! Definitions used in the report:
//! - final / best validation loss: the last / lowest `val` event of a run;
//! - tokens to target: training tokens at the first evaluation whose loss ≤ `--target-loss`;
//! - loss spike: a train loss above 1.1× the median of the previous 50 train losses (once 10
//!   exist); skipped (non-finite) steps count as spikes too;
//! - significance: Welch's two-sided t-test on final validation loss across seeds, Holm–Bonferroni
//!   adjusted over every pair the report tests, p < 0.05; "not significant" otherwise, "not
//!   testable" with fewer than two seeds on a side; 95% t intervals for every difference.

use super::plots::{metric_file_stem, ArmLosses};
use super::runs::{differ_only_in_optimizer, expand_run_dirs, group_runs, read_run, Group};
use super::stats::{
    clipped_share, count_spikes, holm, mean_sd, median, paired_ci, paired_t, quantile, welch,
    welch_ci, SPIKE_FACTOR, SPIKE_MIN_HISTORY, SPIKE_WINDOW,
};
pub use super::test_plan::{FamilyComparisons, TestFamily, TestPlan};
use crate::optim::OptimizerKind;
use anyhow::{bail, Context, Result};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// One group's summary.
#[derive(Debug, Clone)]
pub struct GroupStats {
    pub final_val: Vec<f64>,
    pub best_val: Vec<f64>,
    pub tokens_to_target: Vec<Option<u64>>,
    pub spikes: Vec<usize>,
    pub diverged: Vec<bool>,
    pub finished: Vec<bool>,
    /// Per run: the share of steps whose gradient norm exceeded `grad_clip` (clipped steps).
    pub clipped: Vec<f64>,
    /// Per run: the 99th percentile of the gradient norm over the second half of its steps.
    pub late_grad_norm_p99: Vec<f64>,
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
        clipped: vec![],
        late_grad_norm_p99: vec![],
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
        let norms: Vec<f64> = r.train.iter().map(|t| t.4).collect();
        s.clipped.push(clipped_share(&norms, r.cfg.grad_clip));
        let late: Vec<f64> = r
            .train
            .iter()
            .filter(|t| 2 * t.0 > r.cfg.max_steps as u64)
            .map(|t| t.4)
            .collect();
        s.late_grad_norm_p99.push(quantile(&late, 0.99));
        speeds.push(median(&r.tok_per_s));
    }
    s.tok_per_s = median(&speeds);
    s
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

/// One arm at one batch size: its groups (one per lr, in increasing lr) and the best of them.
pub struct LrCell {
    pub batch: usize,
    pub arm: String,
    pub groups: Vec<usize>,
    /// The group with the lowest mean final validation loss over the seeds that every lr of the
    /// cell ran ([`best_lr_index`]).
    pub best: usize,
}

/// Which of an arm's lrs is best, given each lr's runs as (seed, final validation loss): the lowest
/// mean over the seeds that every lr ran, so that lrs are ranked on the same seeds. A study that
/// runs its grid at seed 0 and adds seeds at the best lr afterwards therefore keeps the lr that
/// seed 0 chose; a fully crossed sweep ranks by the mean over all seeds. Without a shared seed the
/// mean over each lr's own seeds decides. A non-finite loss among the seeds counted makes an lr
/// the worst. Ties go to the first.
pub fn best_lr_index(lrs: &[Vec<(u64, f64)>]) -> usize {
    let shared: Vec<u64> = lrs
        .first()
        .map(|runs| runs.iter().map(|r| r.0).collect())
        .unwrap_or_default();
    let shared: Vec<u64> = shared
        .into_iter()
        .filter(|seed| lrs.iter().all(|runs| runs.iter().any(|r| r.0 == *seed)))
        .collect();
    let score = |runs: &Vec<(u64, f64)>| {
        let counted: Vec<f64> = runs
            .iter()
            .filter(|r| shared.is_empty() || shared.contains(&r.0))
            .map(|r| r.1)
            .collect();
        if counted.is_empty() || counted.iter().any(|x| !x.is_finite()) {
            f64::INFINITY
        } else {
            mean_sd(&counted).0
        }
    };
    (0..lrs.len())
        .min_by(|&a, &b| score(&lrs[a]).total_cmp(&score(&lrs[b])))
        .unwrap_or(0)
}

/// Groups by (batch, arm), in the order the arms first appear.
pub fn best_lr_cells(groups: &[Group], all: &[GroupStats]) -> Vec<LrCell> {
    let mut cells: Vec<LrCell> = Vec::new();
    for (i, g) in groups.iter().enumerate() {
        match cells
            .iter_mut()
            .find(|c| c.batch == g.batch && c.arm == g.arm)
        {
            Some(c) => c.groups.push(i),
            None => cells.push(LrCell {
                batch: g.batch,
                arm: g.arm.clone(),
                groups: vec![i],
                best: i,
            }),
        }
    }
    for c in &mut cells {
        c.groups
            .sort_by(|&a, &b| groups[a].lr.total_cmp(&groups[b].lr));
        let lrs: Vec<Vec<(u64, f64)>> = c
            .groups
            .iter()
            .map(|&i| {
                groups[i]
                    .runs
                    .iter()
                    .map(|r| r.cfg.seed)
                    .zip(all[i].final_val.iter().copied())
                    .collect()
            })
            .collect();
        c.best = c.groups[best_lr_index(&lrs)];
    }
    cells
}

/// A p value with three decimals, or two significant digits below 0.001 (where "0.000" would hide
/// how far below it is).
fn fmt_p(p: f64) -> String {
    if p < 1e-3 {
        format!("{p:.1e}")
    } else {
        format!("{p:.3}")
    }
}

/// Whether some arm ran at more than one lr.
fn lr_swept(cells: &[LrCell]) -> bool {
    cells.iter().any(|c| c.groups.len() > 1)
}

/// The groups the pairwise tests compare (and the curves draw): each arm's best lr when lrs were
/// swept, else every group.
fn tested_groups(cells: &[LrCell], n_groups: usize) -> Vec<usize> {
    if lr_swept(cells) {
        cells.iter().map(|c| c.best).collect()
    } else {
        (0..n_groups).collect()
    }
}

/// Gradient clipping per group: each run's share of clipped steps and the 99th percentile of its
/// gradient norm over the second half of training.
fn clipping_section(md: &mut String, groups: &[Group], all: &[GroupStats]) {
    if all.iter().all(|s| s.clipped.iter().all(|c| c.is_nan())) {
        return;
    }
    let _ = writeln!(md, "\n## Gradient clipping\n");
    let _ = writeln!(
        md,
        "Per run (in seed order): the share of steps whose gradient norm before clipping exceeded \
         `grad_clip`, and the 99th percentile of the gradient norm over the second half of the run \
         (R's type-8 estimate).\n"
    );
    let _ = writeln!(
        md,
        "| group | seeds | clipped steps | mean | grad-norm p99, second half | mean |"
    );
    let _ = writeln!(md, "|---|---|---|---:|---|---:|");
    let list = |xs: &[f64], f: &dyn Fn(f64) -> String| {
        xs.iter().map(|&x| f(x)).collect::<Vec<_>>().join(", ")
    };
    let pct = |x: f64| {
        if x.is_finite() {
            format!("{:.1}%", 100.0 * x)
        } else {
            "—".into()
        }
    };
    let num = |x: f64| {
        if x.is_finite() {
            format!("{x:.3}")
        } else {
            "—".into()
        }
    };
    let finite_mean = |xs: &[f64]| {
        let f: Vec<f64> = xs.iter().copied().filter(|x| x.is_finite()).collect();
        if f.is_empty() {
            f64::NAN
        } else {
            mean_sd(&f).0
        }
    };
    for (g, s) in groups.iter().zip(all) {
        let seeds: Vec<String> = g.runs.iter().map(|r| r.cfg.seed.to_string()).collect();
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} |",
            g.label,
            seeds.join(", "),
            list(&s.clipped, &pct),
            pct(finite_mean(&s.clipped)),
            list(&s.late_grad_norm_p99, &num),
            num(finite_mean(&s.late_grad_norm_p99))
        );
    }
}

/// The markdown report, from the groups' summaries and lr cells ([`stats`], [`best_lr_cells`]).
pub fn report(
    groups: &[Group],
    all: &[GroupStats],
    cells: &[LrCell],
    target: Option<f64>,
    plan: Option<&TestPlan>,
) -> String {
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
    for (g, s) in groups.iter().zip(all) {
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
    // lr as a swept variable: the lrs each arm ran at each batch size, and its best.
    let swept = lr_swept(cells);
    if swept {
        let _ = writeln!(md, "\n## Learning rate\n");
        let _ = writeln!(
            md,
            "Each arm's best lr at each batch size: the lowest mean final validation loss over its lrs, \
             counting the seeds that every lr of the arm ran (so an lr grid run at one seed, with \
             seeds added at its best lr afterwards, keeps the lr that seed chose); the loss column \
             averages every seed of the best lr. Only these enter the pairwise tests below, and only \
             these are drawn in the loss, lr and gradient-norm curves; `lr_sensitivity` shows every lr.\n"
        );
        let _ = writeln!(
            md,
            "| batch | arm | lrs run | best lr | final val loss at the best lr | best lr at the grid's edge |"
        );
        let _ = writeln!(md, "|---:|---|---|---:|---:|---|");
        for c in cells {
            let lrs: Vec<String> = c
                .groups
                .iter()
                .map(|&i| format!("{:e}", groups[i].lr))
                .collect();
            let edge = if c.groups.len() < 2 {
                "—"
            } else if c.best == c.groups[0] || Some(&c.best) == c.groups.last() {
                "yes"
            } else {
                "no"
            };
            let _ = writeln!(
                md,
                "| {} | {} | {} | {:e} | {} ({} seeds) | {edge} |",
                c.batch,
                c.arm,
                lrs.join(", "),
                groups[c.best].lr,
                fmt_mean_sd(&all[c.best].final_val, 4),
                groups[c.best].runs.len()
            );
        }
    }
    clipping_section(&mut md, groups, all);
    let _ = writeln!(md, "\n## Pairwise differences in final validation loss\n");
    pairwise_sections(&mut md, groups, all, cells, plan);
    let _ = writeln!(
        md,
        "\nDefinitions: final/best = last/lowest validation evaluation (fixed windows, same for every run). \
         A loss spike is a train loss above {SPIKE_FACTOR}× the median of the previous {SPIKE_WINDOW} train losses \
         (once {SPIKE_MIN_HISTORY} exist), or a skipped non-finite step. Diverged = a non-finite train loss. \
         Significance (the verdict): Welch's two-sided t-test across seeds, Holm–Bonferroni-adjusted p < 0.05, the \
         family being every row of one table; the raw p is shown beside it. The paired column tests the per-seed \
         differences instead (runs with the same seed start from the same weights and see the same batches), \
         two-sided, n − 1 degrees of freedom, Holm-adjusted over the same rows. Clipped steps: the share of a \
         run's steps whose gradient norm before clipping exceeded `grad_clip`. Intervals are 95% t intervals \
         (Welch's standard error and degrees of freedom; the paired differences' for the paired column). \
         Runs still going or stopped early are included as they are (see \"finished\")."
    );
    md
}

/// A logged metric's section: each run's mean over the steps that logged it, and the same
/// pairwise tests as the final loss's, on those means.
fn metric_section(
    md: &mut String,
    groups: &[Group],
    all: &[GroupStats],
    cells: &[LrCell],
    plan: Option<&TestPlan>,
    name: &str,
) -> Result<()> {
    let run_mean = |r: &crate::study::runs::RunData| {
        let values: Vec<f64> = r
            .series
            .get(name)
            .into_iter()
            .flatten()
            .map(|&(_, v)| v)
            .filter(|v| v.is_finite())
            .collect();
        if values.is_empty() {
            f64::NAN
        } else {
            mean_sd(&values).0
        }
    };
    let means: Vec<Vec<f64>> = groups
        .iter()
        .map(|g| g.runs.iter().map(run_mean).collect())
        .collect();
    if means.iter().flatten().all(|m| m.is_nan()) {
        bail!(
            "no run logged the metric '{name}' (per-layer figures need diag_interval > 0; \
             names are those of metrics.jsonl, e.g. update_weight_ratio/block.0.mlp)"
        );
    }
    let _ = writeln!(md, "\n## Metric `{name}`\n");
    let _ = writeln!(
        md,
        "Each run's mean of `{name}` over the steps that logged it (`metric_{}.png`).\n",
        metric_file_stem(name)
    );
    let _ = writeln!(md, "| group | seeds | per run | mean |");
    let _ = writeln!(md, "|---|---|---|---:|");
    for (g, m) in groups.iter().zip(&means) {
        let seeds: Vec<String> = g.runs.iter().map(|r| r.cfg.seed.to_string()).collect();
        let per_run: Vec<String> = m.iter().map(|x| format!("{x:.4e}")).collect();
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} |",
            g.label,
            seeds.join(", "),
            per_run.join(", "),
            fmt_mean_sd(m, 6)
        );
    }
    let on_metric: Vec<GroupStats> = all
        .iter()
        .zip(means)
        .map(|(s, m)| GroupStats {
            final_val: m,
            ..s.clone()
        })
        .collect();
    let _ = writeln!(md);
    pairwise_sections(md, groups, &on_metric, cells, plan);
    Ok(())
}

/// The pairwise tables of `all`'s `final_val`: the families of `plan`, or else the pairs of
/// tested groups that differ only in the optimizer (every pair when none does).
fn pairwise_sections(
    md: &mut String,
    groups: &[Group],
    all: &[GroupStats],
    cells: &[LrCell],
    plan: Option<&TestPlan>,
) {
    match plan {
        Some(plan) => {
            let _ = writeln!(
                md,
                "The tests fixed in advance, family by family; each family is Holm-corrected on its \
                 own, and each arm enters at its best lr.\n"
            );
            for (family, rows) in plan.resolve(all, cells) {
                let _ = writeln!(md, "### {family}\n");
                let pairs: Vec<(usize, usize)> = rows.iter().flatten().copied().collect();
                let not_run = rows.iter().filter(|r| r.is_none()).count();
                if not_run > 0 {
                    let _ = writeln!(
                        md,
                        "{not_run} of the family's comparisons lack runs at one side and are left out.\n"
                    );
                }
                pairwise_table(md, groups, all, &pairs);
            }
        }
        None => {
            let tested = tested_groups(cells, groups.len());
            let all_pairs: Vec<(usize, usize)> = tested
                .iter()
                .enumerate()
                .flat_map(|(a, &i)| tested[a + 1..].iter().map(move |&j| (i, j)))
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
                    "Pairs of groups that differ only in the optimizer setting (same batch size, \
                     data, schedule and steps); {} other pairs are left out.\n",
                    all_pairs.len() - optimizer_pairs.len()
                );
                optimizer_pairs
            };
            pairwise_table(md, groups, all, &pairs);
        }
    }
}

/// The table of pairwise differences in final validation loss for `pairs` (A, B) of groups:
/// Welch's and the paired t test, 95% intervals, Holm–Bonferroni over these rows.
fn pairwise_table(md: &mut String, groups: &[Group], all: &[GroupStats], pairs: &[(usize, usize)]) {
    let _ = writeln!(
        *md,
        "| A | B | mean A − B (95% CI) | Welch t | df | p | Holm p | verdict | paired by seed: mean A − B (95% CI), t, p, Holm p |"
    );
    let _ = writeln!(*md, "|---|---|---:|---:|---:|---:|---:|---|---|");
    struct Row {
        diff: f64,
        ci: Option<(f64, f64)>,
        welch: Option<(f64, f64, f64)>,
        paired: Option<(f64, f64, f64, f64)>,
        paired_ci: Option<(f64, f64)>,
        seeds: usize,
    }
    let rows: Vec<Row> = pairs
        .iter()
        .map(|&(i, j)| {
            let (pa, pb) = shared_seed_finals(&groups[i], &all[i], &groups[j], &all[j]);
            let (a, b) = (&all[i].final_val, &all[j].final_val);
            Row {
                diff: mean_sd(a).0 - mean_sd(b).0,
                ci: welch_ci(a, b, 0.95),
                welch: welch(a, b),
                paired: paired_t(&pa, &pb),
                paired_ci: paired_ci(&pa, &pb, 0.95),
                seeds: pa.len(),
            }
        })
        .collect();
    // Holm–Bonferroni over every row of this table, for each test separately.
    let holm_welch = holm(
        &rows
            .iter()
            .map(|r| r.welch.map_or(f64::NAN, |w| w.2))
            .collect::<Vec<_>>(),
    );
    let holm_paired = holm(
        &rows
            .iter()
            .map(|r| r.paired.map_or(f64::NAN, |p| p.3))
            .collect::<Vec<_>>(),
    );
    let fmt_ci = |ci: Option<(f64, f64)>| match ci {
        Some((lo, hi)) => format!(" [{lo:+.4}, {hi:+.4}]"),
        None => String::new(),
    };
    for (k, (&(i, j), r)) in pairs.iter().zip(&rows).enumerate() {
        let paired = match r.paired {
            Some((d, t, _, p)) => format!(
                "{d:+.4}{}, {t:.2}, {}, {} ({} seeds)",
                fmt_ci(r.paired_ci),
                fmt_p(p),
                fmt_p(holm_paired[k]),
                r.seeds
            ),
            None => "—".into(),
        };
        let (t, df, p, holm_p, verdict) = match r.welch {
            Some((t, df, p)) => (
                format!("{t:.2}"),
                format!("{df:.1}"),
                fmt_p(p),
                fmt_p(holm_welch[k]),
                if holm_welch[k] < 0.05 {
                    format!(
                        "significant: {} lower",
                        if r.diff < 0.0 { "A" } else { "B" }
                    )
                } else {
                    "not significant".to_string()
                },
            ),
            None => (
                "—".into(),
                "—".into(),
                "—".into(),
                "—".into(),
                "not testable (fewer than 2 seeds)".into(),
            ),
        };
        let _ = writeln!(
            md,
            "| {} | {} | {:+.4}{} | {t} | {df} | {p} | {holm_p} | {verdict} | {paired} |",
            groups[i].label,
            groups[j].label,
            r.diff,
            fmt_ci(r.ci)
        );
    }
}

/// The update rule of a group, for the β2 figure's lines: Adam (AdamW), Adam (L2) or ADOPT.
fn rule_name(g: &Group) -> String {
    let cfg = &g.runs[0].cfg;
    match cfg.optimizer {
        OptimizerKind::AdamW => "Adam".into(),
        OptimizerKind::Adam => "Adam (L2)".into(),
        OptimizerKind::Adopt => match cfg.variant {
            Some(crate::optim::AdoptVariant::Original) => "ADOPT (original)".into(),
            _ => "ADOPT".into(),
        },
        OptimizerKind::Muon => "Muon".into(),
    }
}

/// The β2 figure's panels (largest batch first): per update rule, each arm at its best lr as
/// (1 − β2, each seed's final validation loss). Empty unless some rule ran at two or more β2.
pub fn beta2_panels(
    groups: &[Group],
    all: &[GroupStats],
    cells: &[LrCell],
) -> Vec<(usize, Vec<ArmLosses>)> {
    let mut batches: Vec<usize> = cells.iter().map(|c| c.batch).collect();
    batches.sort_unstable_by(|a, b| b.cmp(a));
    batches.dedup();
    let panels: Vec<(usize, Vec<ArmLosses>)> = batches
        .iter()
        .map(|&batch| {
            let mut lines: Vec<ArmLosses> = Vec::new();
            for c in cells.iter().filter(|c| c.batch == batch) {
                let g = &groups[c.best];
                let beta2 = g.runs[0].cfg.betas.map_or(f64::NAN, |b| b[1]);
                let point = (1.0 - beta2, all[c.best].final_val.clone());
                let rule = rule_name(g);
                match lines.iter_mut().find(|(name, _)| *name == rule) {
                    Some((_, at)) => at.push(point),
                    None => lines.push((rule, vec![point])),
                }
            }
            for (_, at) in &mut lines {
                at.sort_by(|a, b| a.0.total_cmp(&b.0));
            }
            (batch, lines)
        })
        .collect();
    let several_beta2 = panels
        .iter()
        .any(|(_, lines)| lines.iter().any(|(_, at)| at.len() > 1));
    if several_beta2 {
        panels
    } else {
        Vec::new()
    }
}

/// Reads, groups and reports: writes `report.md` and the plots into `out`; returns the report.
/// With a `plan`, its families replace the automatic pairwise table ([`TestPlan`]).
pub fn compare(
    paths: &[PathBuf],
    out: &Path,
    target: Option<f64>,
    plan: Option<&TestPlan>,
    metrics: &[String],
) -> Result<String> {
    let dirs = expand_run_dirs(paths)?;
    let runs = dirs
        .iter()
        .map(|d| read_run(d))
        .collect::<Result<Vec<_>>>()?;
    let groups = group_runs(runs)?;
    let all: Vec<GroupStats> = groups.iter().map(|g| stats(g, target)).collect();
    let cells = best_lr_cells(&groups, &all);
    if let Some(plan) = plan {
        plan.check_arms(&cells)?;
    }
    let mut md = report(&groups, &all, &cells, target, plan);
    for name in metrics {
        metric_section(&mut md, &groups, &all, &cells, plan, name)?;
    }
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    crate::fsutil::write_atomic(&out.join("report.md"), md.as_bytes())?;
    // The curves show the groups the tests compare: with lrs swept, every lr of every arm would
    // bury them, and lr_sensitivity shows the rest.
    let curve_groups: Vec<Group> = tested_groups(&cells, groups.len())
        .into_iter()
        .map(|i| groups[i].clone())
        .collect();
    crate::study::plots::draw_all(&curve_groups, out)?;
    crate::study::plots::draw_lr_sensitivity(&groups, out)?;
    for name in metrics {
        crate::study::plots::draw_metric(&curve_groups, name, out)?;
    }
    let beta2 = beta2_panels(&groups, &all, &cells);
    if !beta2.is_empty() {
        crate::study::plots::draw_beta2(&beta2, out)?;
    }
    Ok(md)
}

#[cfg(test)]
mod tests {
    use super::{best_lr_index, fmt_p};

    #[test]
    fn small_p_values_keep_their_digits() {
        assert_eq!(fmt_p(0.0123), "0.012");
        assert_eq!(fmt_p(2.54e-5), "2.5e-5");
    }

    #[test]
    fn the_best_lr_is_ranked_on_the_seeds_every_lr_ran() {
        // The lr study's shape: a grid at seed 0, then seeds 1 and 2 at seed 0's best. Seed 0 ranks
        // lr 0 (1.0) ahead of lr 1 (1.1); the mean over all of lr 0's seeds (1.2) would not.
        let study = [vec![(0, 1.0), (1, 1.3), (2, 1.3)], vec![(0, 1.1)]];
        assert_eq!(best_lr_index(&study), 0);
        // Fully crossed: the mean over both seeds, 1.2 against 1.1.
        let crossed = [vec![(0, 1.0), (1, 1.4)], vec![(0, 1.1), (1, 1.1)]];
        assert_eq!(best_lr_index(&crossed), 1);
        // No seed in common: each lr's own mean.
        assert_eq!(best_lr_index(&[vec![(0, 1.2)], vec![(1, 1.1)]]), 1);
        // A divergence among the seeds counted makes an lr the worst; one among seeds added later
        // does not change the choice.
        assert_eq!(best_lr_index(&[vec![(0, f64::NAN)], vec![(0, 2.0)]]), 1);
        assert_eq!(
            best_lr_index(&[vec![(0, 1.0), (1, f64::INFINITY)], vec![(0, 1.1)]]),
            0
        );
    }
}
