//! `sweep` and `compare`: statistics against hand/mpmath values, grouping rules, and the report
//! and plots of a real (small) sweep.

mod common;

use common::*;
use gpt_pretrain::study::stats::{count_spikes, mean_sd, paired_t, welch};

#[test]
fn welch_matches_an_independent_computation() {
    // mpmath: t = -2.19970672532, df = 5.32902033272, p = 0.0757845099246 (regularized
    // incomplete beta I_{df/(df+t²)}(df/2, 1/2)).
    let (t, df, p) = welch(&[1.0, 2.0, 3.0, 4.0], &[3.0, 4.5, 5.0, 7.5]).unwrap();
    assert!((t + 2.19970672532).abs() < 1e-9, "{t}");
    assert!((df - 5.32902033272).abs() < 1e-9, "{df}");
    assert!((p - 0.0757845099246).abs() < 1e-9, "{p}");
    assert!(
        welch(&[1.0], &[2.0, 3.0]).is_none(),
        "one seed cannot be tested"
    );
    let (m, sd) = mean_sd(&[2.0, 4.0, 6.0]);
    assert_eq!((m, sd), (4.0, 2.0));
}

#[test]
fn paired_t_matches_the_closed_form_at_two_degrees_of_freedom() {
    // d = (1, 1.5, 1.5): mean 4/3, sd sqrt(1/12), t = (4/3) / (sd / sqrt 3) = 8. With 2 degrees of
    // freedom the t CDF is 1/2 + t / (2 sqrt(2 + t²)), so p = 1 − 8 / sqrt(66).
    let (d, t, df, p) = paired_t(&[1.0, 2.0, 4.0], &[0.0, 0.5, 2.5]).unwrap();
    assert!((d - 4.0 / 3.0).abs() < 1e-12, "{d}");
    assert!((t - 8.0).abs() < 1e-9, "{t}");
    assert_eq!(df, 2.0);
    assert!((p - (1.0 - 8.0 / 66f64.sqrt())).abs() < 1e-9, "{p}");
    assert!(
        paired_t(&[1.0], &[2.0]).is_none(),
        "one pair cannot be tested"
    );
    assert!(
        paired_t(&[1.0, 2.0], &[0.0, 1.0]).is_none(),
        "constant differences"
    );
}

#[test]
fn spikes_follow_the_stated_rule() {
    let mut losses = vec![3.0; 60];
    losses[30] = 3.31; // > 1.1 × 3.0
    losses[40] = 3.29; // not
    losses[50] = f64::NAN; // a skipped step
    losses[5] = 10.0; // too little history to judge
    assert_eq!(count_spikes(&losses), 2);
}

fn sweep(ws: &Workspace, extra: &[&str], seeds: &str) -> String {
    let cfg = ws.config(
        "base",
        &common::tinyshakespeare(),
        "max_steps = 12\nlr_decay_steps = 12\neval_interval = 4",
    );
    let mut args = vec![
        "sweep",
        "--quiet",
        "--config",
        cfg.to_str().unwrap(),
        "--seeds",
        seeds,
        "--out",
        "sweep",
    ];
    args.extend_from_slice(extra);
    ok(&bin()
        .current_dir(ws.dir.path())
        .args(&args)
        .output()
        .unwrap())
}

#[test]
fn sweep_runs_every_combination_once_and_resumes() {
    let ws = Workspace::new();
    let out = sweep(
        &ws,
        &["--grid", "optimizer=adam,adopt", "--grid", "batch_size=2,4"],
        "0,1",
    );
    assert!(
        out.contains("8 runs (0 already done, 0 resumed, 8 started)"),
        "{out}"
    );
    let dirs: Vec<String> = std::fs::read_dir(ws.path("sweep"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        dirs.contains(&"optimizer-adopt_batch_size-4_seed-1".to_string()),
        "{dirs:?}"
    );
    // Interrupt one run (drop its last checkpoint) and re-run: the rest are skipped.
    let victim = ws.path("sweep/optimizer-adam_batch_size-2_seed-0");
    std::fs::remove_dir_all(victim.join("checkpoints/step-00000012")).unwrap();
    let again = sweep(
        &ws,
        &["--grid", "optimizer=adam,adopt", "--grid", "batch_size=2,4"],
        "0,1",
    );
    assert!(
        again.contains("8 runs (7 already done, 1 resumed, 0 started)"),
        "{again}"
    );
    // The seed changes initialisation and data together; same seed, same first batch loss.
    let first_loss = |name: &str| train_losses(&ws.path(&format!("sweep/{name}")))[0].1;
    assert_eq!(
        first_loss("optimizer-adam_batch_size-2_seed-0"),
        first_loss("optimizer-adopt_batch_size-2_seed-0")
    );
    assert_ne!(
        first_loss("optimizer-adam_batch_size-2_seed-0"),
        first_loss("optimizer-adam_batch_size-2_seed-1")
    );
}

#[test]
fn compare_writes_a_report_and_readable_plots() {
    let ws = Workspace::new();
    sweep(&ws, &["--grid", "optimizer=adamw,adopt"], "0,1,2");
    let out = ok(&bin()
        .current_dir(ws.dir.path())
        .args([
            "compare",
            "sweep",
            "--out",
            "report",
            "--target-loss",
            "5.0",
        ])
        .output()
        .unwrap());
    let report = std::fs::read_to_string(ws.path("report/report.md")).unwrap();
    assert!(out.contains("# Optimizer comparison"));
    assert!(
        report.contains("| Adam β2=0.999, batch 4") && report.contains("| ADOPT, batch 4"),
        "{report}"
    );
    assert!(report.contains("| 3 |"), "three seeds per group: {report}");
    assert!(report.contains("significant") || report.contains("not significant"));
    assert!(report.contains("tokens to val ≤ 5"));
    // One pair (adamw, adopt): Holm over a family of one leaves p as it is, and the difference
    // comes with its 95% interval, which contains it.
    let row = report
        .lines()
        .find(|l| l.starts_with("| Adam β2=0.999, batch 4") && l.contains("| ADOPT, batch 4"))
        .unwrap_or_else(|| panic!("no pairwise row: {report}"));
    let cells: Vec<&str> = row.split('|').map(str::trim).collect();
    assert_eq!(
        cells[6], cells[7],
        "Holm p of a single test is its p: {row}"
    );
    let (diff, interval) = cells[3].split_once(" [").expect("an interval");
    let diff: f64 = diff.parse().unwrap();
    let (lo, hi) = interval.trim_end_matches(']').split_once(", ").unwrap();
    let (lo, hi): (f64, f64) = (lo.parse().unwrap(), hi.parse().unwrap());
    assert!(lo <= diff && diff <= hi, "{row}");
    for plot in ["val_loss", "train_loss", "lr_grad_norm"] {
        for ext in ["png", "svg"] {
            let size = std::fs::metadata(ws.path(&format!("report/{plot}.{ext}")))
                .unwrap()
                .len();
            assert!(size > 10_000, "{plot}.{ext} is only {size} bytes");
        }
        let svg = std::fs::read_to_string(ws.path(&format!("report/{plot}.svg"))).unwrap();
        assert!(
            svg.contains("step") || svg.contains("tokens"),
            "{plot}: no axis label"
        );
        assert!(svg.contains("ADOPT"), "{plot}: no legend");
    }
}

#[test]
fn pairwise_tests_pair_groups_that_differ_only_in_the_optimizer() {
    let ws = Workspace::new();
    sweep(
        &ws,
        &[
            "--grid",
            "optimizer=adamw,adopt",
            "--grid",
            "batch_size=4,2",
        ],
        "0,1",
    );
    let report = |runs: &[&str]| -> String {
        let mut args = vec!["compare"];
        args.extend_from_slice(runs);
        args.extend_from_slice(&["--out", "report"]);
        ok(&bin()
            .current_dir(ws.dir.path())
            .args(&args)
            .output()
            .unwrap());
        std::fs::read_to_string(ws.path("report/report.md")).unwrap()
    };
    let rows = |md: &str| -> Vec<String> {
        let section = md.split("## Pairwise").nth(1).unwrap();
        section
            .lines()
            .filter(|l| l.starts_with("| Adam") || l.starts_with("| ADOPT"))
            .map(String::from)
            .collect()
    };
    // Four groups, six pairs: only the two at equal batch size compare optimizers.
    let md = report(&["sweep"]);
    assert!(md.contains("4 other pairs are left out"), "{md}");
    let pairs = rows(&md);
    assert_eq!(pairs.len(), 2, "{pairs:?}");
    for row in &pairs {
        let cells: Vec<&str> = row.split(" | ").collect();
        let batch = |cell: &str| cell.split(", ").nth(1).unwrap().to_string();
        assert_eq!(batch(cells[0]), batch(cells[1]), "{row}");
        assert_ne!(
            cells[0].split(',').next(),
            cells[1].split(',').next(),
            "{row}"
        );
    }
    // One optimizer at two batch sizes: no pair differs only in the optimizer, so every pair.
    let md = report(&[
        "sweep/optimizer-adamw_batch_size-4_seed-0",
        "sweep/optimizer-adamw_batch_size-4_seed-1",
        "sweep/optimizer-adamw_batch_size-2_seed-0",
        "sweep/optimizer-adamw_batch_size-2_seed-1",
    ]);
    assert!(md.contains("Every pair of groups"), "{md}");
    assert_eq!(rows(&md).len(), 1);
}

#[test]
fn compare_refuses_runs_on_different_data() {
    let ws = Workspace::new();
    let other = ws.path("other.txt");
    std::fs::write(
        &other,
        std::fs::read_to_string(common::tinyshakespeare())
            .unwrap()
            .replace('e', "E"),
    )
    .unwrap();
    for (name, corpus) in [("a", common::tinyshakespeare()), ("b", other)] {
        let cfg = ws.config(name, &corpus, "max_steps = 2\neval_interval = 2");
        ok(&ws.train(&["--config", cfg.to_str().unwrap(), "--out", name]));
    }
    let out = bin()
        .current_dir(ws.dir.path())
        .args(["compare", "a", "b", "--out", "r"])
        .output()
        .unwrap();
    fails_with(&out, "differ in data");
}

#[test]
fn an_lr_sweep_reports_each_arms_best_lr_and_tests_only_those() {
    let ws = Workspace::new();
    sweep(
        &ws,
        &[
            "--grid",
            "optimizer=adamw,adopt",
            "--grid",
            "lr=1e-3,3e-3,1e-2",
        ],
        "0,1",
    );
    ok(&bin()
        .current_dir(ws.dir.path())
        .args(["compare", "sweep", "--out", "report"])
        .output()
        .unwrap());
    let md = std::fs::read_to_string(ws.path("report/report.md")).unwrap();
    // The best lr per arm, from the runs' own metrics: the lowest mean final validation loss.
    for (optimizer, arm) in [("adamw", "Adam β2=0.999"), ("adopt", "ADOPT")] {
        let mean_final = |lr: &str| -> f64 {
            let finals: Vec<f64> = (0..2)
                .map(|seed| {
                    let run = ws.path(&format!("sweep/optimizer-{optimizer}_lr-{lr}_seed-{seed}"));
                    read_json_lines(&run.join("metrics.jsonl"))
                        .iter()
                        .rfind(|v| v["split"] == "val")
                        .unwrap()["loss"]
                        .as_f64()
                        .unwrap()
                })
                .collect();
            finals.iter().sum::<f64>() / 2.0
        };
        let best = ["1e-3", "3e-3", "1e-2"]
            .into_iter()
            .min_by(|a, b| mean_final(a).total_cmp(&mean_final(b)))
            .unwrap();
        let row = md
            .lines()
            .find(|l| l.starts_with(&format!("| 4 | {arm} |")))
            .unwrap_or_else(|| panic!("no best-lr row for {arm}: {md}"));
        let cells: Vec<&str> = row.split(" | ").collect();
        assert_eq!(cells[2], "1e-3, 3e-3, 1e-2", "{row}");
        assert_eq!(
            cells[3].parse::<f64>().unwrap(),
            best.parse::<f64>().unwrap(),
            "{row}"
        );
        // The curves show the best lr only.
        let curves = std::fs::read_to_string(ws.path("report/val_loss.svg")).unwrap();
        for lr in ["1e-3", "3e-3", "1e-2"] {
            assert_eq!(
                curves.contains(&format!("{arm}, batch 4, lr {lr} (n=2)")),
                lr == best,
                "{arm} at lr {lr} (best {best}) in val_loss.svg"
            );
        }
    }
    // One batch size, two arms: one pair, between the two best-lr groups.
    let section = md.split("## Pairwise").nth(1).unwrap();
    let pairs: Vec<&str> = section
        .lines()
        .filter(|l| l.starts_with("| Adam") || l.starts_with("| ADOPT"))
        .collect();
    assert_eq!(pairs.len(), 1, "{pairs:?}");
    for ext in ["png", "svg"] {
        let size = std::fs::metadata(ws.path(&format!("report/lr_sensitivity.{ext}")))
            .unwrap()
            .len();
        assert!(size > 10_000, "lr_sensitivity.{ext} is only {size} bytes");
    }
    let svg = std::fs::read_to_string(ws.path("report/lr_sensitivity.svg")).unwrap();
    assert!(
        svg.contains("peak learning rate")
            && svg.contains("ADOPT")
            && svg.contains("Adam β2=0.999")
    );
}

#[test]
fn a_test_plan_makes_its_families_and_the_report_shows_clipping_and_beta2() {
    let ws = Workspace::new();
    sweep(
        &ws,
        &[
            "--grid",
            "optimizer=adamw,adopt",
            "--grid",
            "betas=[0.9,0.95],[0.9,0.999]",
        ],
        "0,1",
    );
    let plan = ws.path("tests.toml");
    std::fs::write(
        &plan,
        r#"
[[family]]
name = "matched"
pairs = [["ADOPT β2=0.95", "Adam β2=0.95"], ["ADOPT β2=0.999", "Adam β2=0.999"]]

[[family]]
name = "best of each"
best_of = [["ADOPT β2=0.95", "ADOPT β2=0.999"], ["Adam β2=0.95", "Adam β2=0.999"]]
"#,
    )
    .unwrap();
    let compare = |plan: &std::path::Path| {
        bin()
            .current_dir(ws.dir.path())
            .args(["compare", "sweep", "--out", "report", "--tests"])
            .arg(plan)
            .output()
            .unwrap()
    };
    ok(&compare(&plan));
    let md = std::fs::read_to_string(ws.path("report/report.md")).unwrap();
    let family = |name: &str| -> Vec<String> {
        let section = md.split(&format!("### {name}\n")).nth(1).unwrap();
        let section = section.split("\n### ").next().unwrap();
        section
            .lines()
            .filter(|l| l.starts_with("| Adam") || l.starts_with("| ADOPT"))
            .map(String::from)
            .collect()
    };
    let matched = family("matched");
    assert_eq!(matched.len(), 2, "{md}");
    assert!(matched[0].starts_with("| ADOPT β2=0.95, batch 4, lr 1e-2 | Adam β2=0.95, batch 4"));
    assert!(matched[1].starts_with("| ADOPT β2=0.999, batch 4, lr 1e-2 | Adam β2=0.999, batch 4"));
    // Holm within the family of two: the smaller raw p doubled (capped at 1). The table prints
    // p with three decimals (two significant digits below 0.001), so allow for that rounding.
    let p = |row: &str, col: usize| -> f64 { row.split(" | ").nth(col).unwrap().parse().unwrap() };
    let smaller = if p(&matched[0], 5) <= p(&matched[1], 5) {
        &matched[0]
    } else {
        &matched[1]
    };
    let (raw, adjusted) = (p(smaller, 5), p(smaller, 6));
    assert!(
        ((2.0 * raw).min(1.0) - adjusted).abs() <= 1.5e-3 + 0.1 * adjusted,
        "{smaller}"
    );
    // best_of: the ADOPT arm with the lower mean final validation loss, from the runs' metrics.
    let mean_final = |optimizer: &str, beta2: &str| -> f64 {
        (0..2)
            .map(|seed| {
                let run = ws.path(&format!(
                    "sweep/optimizer-{optimizer}_betas-_0.9_{beta2}__seed-{seed}"
                ));
                read_json_lines(&run.join("metrics.jsonl"))
                    .iter()
                    .rfind(|v| v["split"] == "val")
                    .unwrap()["loss"]
                    .as_f64()
                    .unwrap()
            })
            .sum::<f64>()
            / 2.0
    };
    let best_adopt = if mean_final("adopt", "0.95") <= mean_final("adopt", "0.999") {
        "ADOPT β2=0.95,"
    } else {
        "ADOPT β2=0.999,"
    };
    let best = family("best of each");
    assert_eq!(best.len(), 1, "{md}");
    assert!(
        best[0].starts_with(&format!("| {best_adopt}")),
        "{} vs {best_adopt}",
        best[0]
    );
    // Clipped steps of one run, counted from its metrics (grad_clip 1.0: norm > 1 is clipped).
    let run = ws.path("sweep/optimizer-adopt_betas-_0.9_0.95__seed-0");
    let norms: Vec<f64> = read_json_lines(&run.join("metrics.jsonl"))
        .iter()
        .filter(|v| v["split"] == "train")
        .map(|v| v["grad_norm"].as_f64().unwrap())
        .collect();
    let share = norms.iter().filter(|&&n| n > 1.0).count() as f64 / norms.len() as f64;
    let clipping = md.split("## Gradient clipping").nth(1).unwrap();
    let row = clipping
        .lines()
        .find(|l| l.starts_with("| ADOPT β2=0.95, batch 4"))
        .unwrap();
    let first_share = row.split(" | ").nth(2).unwrap().split(", ").next().unwrap();
    assert_eq!(first_share, format!("{:.1}%", 100.0 * share), "{row}");
    // The β2 figure: one line per update rule over the two β2.
    let svg = std::fs::read_to_string(ws.path("report/beta2.svg")).unwrap();
    assert!(svg.contains("against β2") && svg.contains("ADOPT") && svg.contains("Adam"));
    // A plan naming an arm no run has is refused, naming it.
    let typo = ws.path("typo.toml");
    std::fs::write(
        &typo,
        "[[family]]\nname = \"x\"\npairs = [[\"ADOPT β2=0.5\", \"Adam β2=0.95\"]]\n",
    )
    .unwrap();
    fails_with(
        &compare(&typo),
        "names arm 'ADOPT β2=0.5', which no run has",
    );
    let empty = ws.path("empty.toml");
    std::fs::write(&empty, "[[family]]\nname = \"x\"\n").unwrap();
    fails_with(&compare(&empty), "family 'x' needs either pairs or best_of");
}

#[test]
fn compare_plots_and_tests_a_logged_metric_by_name() {
    let ws = Workspace::new();
    sweep(
        &ws,
        &[
            "--set",
            "diag_interval=3",
            "--grid",
            "optimizer=adamw,adopt",
        ],
        "0,1,2",
    );
    let name = "update_weight_ratio/block.0.mlp";
    let compare = |metric: &str| {
        bin()
            .current_dir(ws.dir.path())
            .args(["compare", "sweep", "--out", "report", "--metric", metric])
            .output()
            .unwrap()
    };
    ok(&compare(name));
    let report = std::fs::read_to_string(ws.path("report/report.md")).unwrap();
    let section = report
        .split_once(&format!("## Metric `{name}`"))
        .unwrap_or_else(|| panic!("no metric section: {report}"))
        .1;
    // Each group's mean of its runs' means, recomputed from metrics.jsonl.
    let mut by_optimizer: std::collections::BTreeMap<String, Vec<f64>> = Default::default();
    for run in std::fs::read_dir(ws.path("sweep")).unwrap() {
        let run = run.unwrap().path();
        if !run.join("config.toml").exists() {
            continue;
        }
        let cfg: toml::Table =
            toml::from_str(&std::fs::read_to_string(run.join("config.toml")).unwrap()).unwrap();
        let values: Vec<f64> = read_json_lines(&run.join("metrics.jsonl"))
            .iter()
            .filter(|v| v["split"] == "diag")
            .map(|v| v[name].as_f64().unwrap())
            .collect();
        assert_eq!(values.len(), 4, "steps 3, 6, 9, 12");
        let mean = values.iter().sum::<f64>() / values.len() as f64;
        by_optimizer
            .entry(cfg["optimizer"].as_str().unwrap().to_string())
            .or_default()
            .push(mean);
    }
    for (optimizer, label) in [
        ("adamw", "| Adam β2=0.999, batch 4"),
        ("adopt", "| ADOPT, batch 4"),
    ] {
        let means = &by_optimizer[optimizer];
        let expected = means.iter().sum::<f64>() / 3.0;
        let row = section
            .lines()
            .find(|l| l.starts_with(label))
            .unwrap_or_else(|| panic!("no row {label}: {section}"));
        let mean_cell = row.split('|').map(str::trim).nth(4).unwrap();
        let got: f64 = mean_cell.split(' ').next().unwrap().parse().unwrap();
        assert!((got - expected).abs() < 1e-6, "{row}: expected {expected}");
    }
    // The same pairwise test as the loss's, on the metric.
    assert!(section.contains("Welch t"), "{section}");
    for ext in ["png", "svg"] {
        let plot = ws.path(&format!(
            "report/metric_update_weight_ratio_block.0.mlp.{ext}"
        ));
        assert!(std::fs::metadata(plot).unwrap().len() > 10_000);
    }
    fails_with(
        &compare("update_weight_ratio/block.9.mlp"),
        "no run logged the metric 'update_weight_ratio/block.9.mlp'",
    );
}
