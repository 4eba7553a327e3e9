//! The statistics of a comparison: loss spikes, mean and standard deviation, Welch's and the
//! paired t-test.

use statrs::distribution::{ContinuousCDF, StudentsT};

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
