//! The statistics of a comparison: loss spikes, mean and standard deviation, Welch's and the
//! paired t-test.

use statrs::distribution::{ContinuousCDF, StudentsT};
use statrs::statistics::{Data, OrderStatistics};

/// Spike rule: factor over the running median, window, and minimum history.
pub const SPIKE_FACTOR: f64 = 1.1;
pub const SPIKE_WINDOW: usize = 50;
pub const SPIKE_MIN_HISTORY: usize = 10;

/// The median of the finite values (NaN when there are none).
pub(crate) fn median(xs: &[f64]) -> f64 {
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

/// The share of a run's steps whose gradient norm (before clipping) exceeded `clip`, as the
/// trainer clips (norm > clip); steps with a non-finite norm are not counted. NaN when clipping
/// is off (`clip` = 0) or no norm is finite.
pub fn clipped_share(norms: &[f64], clip: f64) -> f64 {
    let finite: Vec<f64> = norms.iter().copied().filter(|x| x.is_finite()).collect();
    if clip <= 0.0 || finite.is_empty() {
        return f64::NAN;
    }
    finite.iter().filter(|&&n| n > clip).count() as f64 / finite.len() as f64
}

/// The `q` quantile of the finite values (NaN when there are none): statrs' estimate, R's type
/// 8 (median-unbiased; Hyndman and Fan 1996).
pub fn quantile(xs: &[f64], q: f64) -> f64 {
    let finite: Vec<f64> = xs.iter().copied().filter(|x| x.is_finite()).collect();
    if finite.is_empty() {
        return f64::NAN;
    }
    Data::new(finite).quantile(q)
}

/// Loss spikes in a train-loss series: a loss above [`SPIKE_FACTOR`] × the median of the previous
/// [`SPIKE_WINDOW`] finite losses (once [`SPIKE_MIN_HISTORY`] exist), or a non-finite loss.
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

/// The two-sided `level` (e.g. 0.95) confidence interval of a t statistic's mean difference.
fn t_interval(diff: f64, se: f64, df: f64, level: f64) -> Option<(f64, f64)> {
    let dist = StudentsT::new(0.0, 1.0, df).ok()?;
    let half = dist.inverse_cdf(0.5 + level / 2.0) * se;
    Some((diff - half, diff + half))
}

/// The `level` confidence interval of mean(a) − mean(b) with Welch's standard error and
/// degrees of freedom (`None` where [`welch`] is).
pub fn welch_ci(a: &[f64], b: &[f64], level: f64) -> Option<(f64, f64)> {
    let (t, df, _) = welch(a, b)?;
    let diff = mean_sd(a).0 - mean_sd(b).0;
    t_interval(diff, diff / t, df, level)
}

/// The `level` confidence interval of the mean paired difference a − b (`None` where
/// [`paired_t`] is).
pub fn paired_ci(a: &[f64], b: &[f64], level: f64) -> Option<(f64, f64)> {
    let (mean, t, df, _) = paired_t(a, b)?;
    t_interval(mean, mean / t, df, level)
}

/// Holm–Bonferroni adjusted p values, in the order given: the k-th smallest of m p values is
/// multiplied by m − k + 1, capped at 1, and never less than the adjusted value before it.
/// NaN entries (tests that could not run) stay NaN and do not count towards m.
pub fn holm(p: &[f64]) -> Vec<f64> {
    let mut order: Vec<usize> = (0..p.len()).filter(|&i| p[i].is_finite()).collect();
    order.sort_by(|&i, &j| p[i].total_cmp(&p[j]));
    let m = order.len();
    let mut adjusted = vec![f64::NAN; p.len()];
    let mut running = 0.0f64;
    for (k, &i) in order.iter().enumerate() {
        running = running.max(((m - k) as f64 * p[i]).min(1.0));
        adjusted[i] = running;
    }
    adjusted
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holm_matches_the_hand_derived_adjustment() {
        // Sorted 0.005, 0.01, 0.03, 0.04 → ×4, ×3, ×2, ×1 = 0.02, 0.03, 0.06, 0.04 → monotone:
        // 0.02, 0.03, 0.06, 0.06 (R's p.adjust(..., "holm") gives the same).
        let adjusted = holm(&[0.01, 0.04, 0.03, 0.005]);
        let expected = [0.03, 0.06, 0.06, 0.02];
        for (a, e) in adjusted.iter().zip(expected) {
            assert!((a - e).abs() < 1e-15, "{adjusted:?}");
        }
        // Capped at 1; NaN stays out of the family.
        let capped = holm(&[0.6, f64::NAN, 0.3]);
        assert_eq!(capped[0], 0.6);
        assert!(capped[1].is_nan());
        assert_eq!(capped[2], 0.6);
    }

    #[test]
    fn confidence_intervals_match_t_tables() {
        // Paired differences 1, 2, 3: mean 2, sd 1, se 1/√3, t(0.975, 2) = 4.302653.
        let (lo, hi) = paired_ci(&[2.0, 4.0, 6.0], &[1.0, 2.0, 3.0], 0.95).unwrap();
        let half = 4.302_653 / 3f64.sqrt();
        assert!((lo - (2.0 - half)).abs() < 1e-5 && (hi - (2.0 + half)).abs() < 1e-5);
        // Welch with equal variances and sizes: df = 4, se = √(2/3), t(0.975, 4) = 2.776445.
        let (lo, hi) = welch_ci(&[1.0, 2.0, 3.0], &[4.0, 5.0, 6.0], 0.95).unwrap();
        let half = 2.776_445 * (2.0f64 / 3.0).sqrt();
        assert!((lo - (-3.0 - half)).abs() < 1e-5 && (hi - (-3.0 + half)).abs() < 1e-5);
    }

    #[test]
    fn clipping_share_and_quantiles_match_hand_derived_values() {
        // Norms 0.5, 1.0, 1.5, 2.0, NaN with a clip of 1.0: 1.0 is not clipped (norm > clip),
        // so 2 of the 4 finite norms were.
        assert_eq!(clipped_share(&[0.5, 1.0, 1.5, 2.0, f64::NAN], 1.0), 0.5);
        assert!(clipped_share(&[2.0], 0.0).is_nan());
        // Type 8 on 1..=100 at 0.99: h = (100 + 1/3)·0.99 + 1/3 = 99.6633…, so
        // x₉₉ + 0.6633…·(x₁₀₀ − x₉₉) = 99.6633….
        let xs: Vec<f64> = (1..=100).map(f64::from).collect();
        let h = (100.0 + 1.0 / 3.0) * 0.99 + 1.0 / 3.0;
        assert!((quantile(&xs, 0.99) - h).abs() < 1e-12);
        // Of 1, 2, 3 the median; of nothing finite, NaN.
        assert_eq!(quantile(&[3.0, f64::INFINITY, 1.0, 2.0], 0.5), 2.0);
        assert!(quantile(&[f64::NAN], 0.5).is_nan());
    }
}
