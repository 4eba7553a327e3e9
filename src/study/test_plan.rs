//! A test plan fixed before the data (`compare --tests FILE`): which arms the report compares,
//! in which families, Holm-corrected family by family.

use super::compare::{GroupStats, LrCell};
use super::stats::mean_sd;
use anyhow::{bail, Context, Result};
use std::path::Path;

/// Tests fixed before the data (`compare --tests FILE`, TOML): families of comparisons between
/// arms (by the names the report gives them), each made at every batch size with each arm at its
/// best lr, and Holm-corrected on its own.
///
/// ```toml
/// [[family]]
/// name = "ADOPT − Adam at matched β2"
/// pairs = [["ADOPT β2=0.95", "Adam β2=0.95"], ["ADOPT", "Adam β2=0.9999"]]
///
/// [[family]]
/// name = "the best ADOPT against the best Adam"
/// best_of = [["ADOPT β2=0.95", "ADOPT"], ["Adam β2=0.95", "Adam β2=0.9999"]]
/// ```
///
/// `best_of` compares, at each batch size, the arm of the first list with the lowest mean final
/// validation loss (over the seeds of its best lr) against the same from the second list.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TestPlan {
    pub family: Vec<TestFamily>,
}

/// A family's name and its comparisons as (A, B) groups; `None` where one side has no runs.
pub type FamilyComparisons = (String, Vec<Option<(usize, usize)>>);

/// One family of a [`TestPlan`]: explicit pairs of arms, or the best of two sets of arms.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TestFamily {
    pub name: String,
    #[serde(default)]
    pub pairs: Vec<[String; 2]>,
    #[serde(default)]
    pub best_of: Option<[Vec<String>; 2]>,
}

impl TestPlan {
    /// Reads and checks a plan file: every family has pairs or `best_of`, not both.
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read test plan {}", path.display()))?;
        let plan: TestPlan = toml::from_str(&text).map_err(|e| {
            anyhow::anyhow!(
                "test plan {} is not valid: {}",
                path.display(),
                e.message().replace('\n', " ")
            )
        })?;
        for f in &plan.family {
            if f.pairs.is_empty() == f.best_of.is_none() {
                bail!(
                    "test plan {}: family '{}' needs either pairs or best_of",
                    path.display(),
                    f.name
                );
            }
        }
        Ok(plan)
    }

    /// Checks that every arm the plan names is one of the runs' arms.
    pub fn check_arms(&self, cells: &[LrCell]) -> Result<()> {
        let known: Vec<&str> = cells.iter().map(|c| c.arm.as_str()).collect();
        for f in &self.family {
            let named = f
                .pairs
                .iter()
                .flatten()
                .chain(f.best_of.iter().flatten().flatten());
            for arm in named {
                if !known.contains(&arm.as_str()) {
                    let mut arms = known.clone();
                    arms.dedup();
                    bail!(
                        "the test plan's family '{}' names arm '{arm}', which no run has (the runs' arms: {})",
                        f.name,
                        arms.join(", ")
                    );
                }
            }
        }
        Ok(())
    }

    /// Each family's comparisons as (A, B) groups at each batch size (largest first), each arm
    /// at its best lr; `None` where an arm has no runs at that batch size.
    pub fn resolve(&self, all: &[GroupStats], cells: &[LrCell]) -> Vec<FamilyComparisons> {
        let mut batches: Vec<usize> = cells.iter().map(|c| c.batch).collect();
        batches.sort_unstable_by(|a, b| b.cmp(a));
        batches.dedup();
        let best = |batch: usize, arm: &str| {
            cells
                .iter()
                .find(|c| c.batch == batch && c.arm == arm)
                .map(|c| c.best)
        };
        let lowest = |batch: usize, arms: &[String]| {
            arms.iter()
                .filter_map(|a| best(batch, a))
                .map(|g| (g, mean_sd(&all[g].final_val).0))
                .filter(|(_, m)| m.is_finite())
                .min_by(|a, b| a.1.total_cmp(&b.1))
                .map(|(g, _)| g)
        };
        self.family
            .iter()
            .map(|f| {
                let mut rows = Vec::new();
                for &batch in &batches {
                    for [a, b] in &f.pairs {
                        rows.push(best(batch, a).zip(best(batch, b)));
                    }
                    if let Some([a, b]) = &f.best_of {
                        rows.push(lowest(batch, a).zip(lowest(batch, b)));
                    }
                }
                (f.name.clone(), rows)
            })
            .collect()
    }
}
