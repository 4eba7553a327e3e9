//! The spike policy: an optimizer step whose loss or gradient norm lies more than a threshold of
//! standard deviations above the mean of a window of recent steps is not applied (llm.c's `-sl`
//! and `-sg`). The windows are saved in each checkpoint, so a resumed run skips the same steps.

use serde::{Deserialize, Serialize};
use std::collections::VecDeque;

/// The last `capacity` values of one measurement, and the z-score of each new one against them.
///
/// As llm.c's `OutlierDetector`: no z-score until the window is full; then the new value
/// replaces the oldest, and its z-score is taken against the window that now holds it (its mean
/// and population standard deviation; 0 when every value is equal). The mean and deviation are
/// summed afresh from the window at each step, in order, so they carry no drift.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ZScoreWindow {
    capacity: usize,
    values: VecDeque<f64>,
}

impl ZScoreWindow {
    /// An empty window of `capacity` values (at least 2).
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(2),
            values: VecDeque::with_capacity(capacity),
        }
    }

    /// Adds `value` (oldest out once full) and returns its z-score, `None` while the window was
    /// still filling. Non-finite values are left out: they would poison every later score.
    pub fn push(&mut self, value: f64) -> Option<f64> {
        if !value.is_finite() {
            return None;
        }
        let was_full = self.values.len() == self.capacity;
        if was_full {
            self.values.pop_front();
        }
        self.values.push_back(value);
        if !was_full {
            return None;
        }
        let n = self.values.len() as f64;
        let mean = self.values.iter().sum::<f64>() / n;
        let variance = self.values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n;
        let std = variance.sqrt();
        Some(if std == 0.0 {
            0.0
        } else {
            (value - mean) / std
        })
    }
}

/// Why a step was not applied.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SkipReason {
    /// Non-finite loss or gradient norm (`nan_policy = "skip"`).
    NonFinite,
    /// The loss's z-score exceeded `skip_loss_zscore`.
    LossZScore(f64),
    /// The gradient norm's z-score exceeded `skip_grad_zscore`.
    GradZScore(f64),
}

impl SkipReason {
    /// The reason as metrics.jsonl writes it.
    pub fn name(self) -> &'static str {
        match self {
            SkipReason::NonFinite => "non_finite",
            SkipReason::LossZScore(_) => "loss_zscore",
            SkipReason::GradZScore(_) => "grad_zscore",
        }
    }
}

/// The spike policy's state: one window for the loss and one for the gradient norm.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SpikeWindows {
    pub loss: ZScoreWindow,
    pub grad_norm: ZScoreWindow,
}

/// The z-scores of one step, where the windows were full.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StepZScores {
    pub loss: Option<f64>,
    pub grad_norm: Option<f64>,
}

impl SpikeWindows {
    /// Empty windows of `capacity` steps.
    pub fn new(capacity: usize) -> Self {
        Self {
            loss: ZScoreWindow::new(capacity),
            grad_norm: ZScoreWindow::new(capacity),
        }
    }

    /// Adds one step's loss and gradient norm; returns their z-scores and whether the step is
    /// to be skipped under the thresholds (0 turns a test off), the loss's tested first.
    pub fn judge(
        &mut self,
        loss: f64,
        grad_norm: f64,
        loss_threshold: f64,
        grad_threshold: f64,
    ) -> (StepZScores, Option<SkipReason>) {
        let z = StepZScores {
            loss: self.loss.push(loss),
            grad_norm: self.grad_norm.push(grad_norm),
        };
        let over = |z: Option<f64>, threshold: f64| z.filter(|&z| threshold > 0.0 && z > threshold);
        let reason = over(z.loss, loss_threshold)
            .map(SkipReason::LossZScore)
            .or_else(|| over(z.grad_norm, grad_threshold).map(SkipReason::GradZScore));
        (z, reason)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_score_until_the_window_is_full_then_against_the_window_holding_the_value() {
        let mut w = ZScoreWindow::new(4);
        assert_eq!(w.push(1.0), None);
        assert_eq!(w.push(2.0), None);
        assert_eq!(w.push(3.0), None);
        assert_eq!(w.push(4.0), None);
        // Window [2, 3, 4, 10]: mean 4.75, population variance
        // (2.75² + 1.75² + 0.75² + 5.25²) / 4 = 9.6875, z = 5.25 / √9.6875.
        let z = w.push(10.0).unwrap();
        assert!((z - 5.25 / 9.6875f64.sqrt()).abs() < 1e-15, "{z}");
        // Window [3, 4, 10, 4]: mean 5.25, variance (2.25² + 1.25² + 4.75² + 1.25²) / 4.
        let z = w.push(4.0).unwrap();
        let variance: f64 = (2.25f64.powi(2) + 2.0 * 1.25f64.powi(2) + 4.75f64.powi(2)) / 4.0;
        assert!((z + 1.25 / variance.sqrt()).abs() < 1e-15, "{z}");
    }

    #[test]
    fn equal_values_score_zero_and_non_finite_values_stay_out() {
        let mut w = ZScoreWindow::new(3);
        for _ in 0..3 {
            w.push(2.0);
        }
        assert_eq!(w.push(2.0), Some(0.0));
        assert_eq!(w.push(f64::NAN), None);
        assert_eq!(w.push(f64::INFINITY), None);
        assert_eq!(w.push(2.0), Some(0.0));
    }

    #[test]
    fn a_spike_over_the_threshold_is_skipped_and_the_loss_is_tested_first() {
        let mut s = SpikeWindows::new(4);
        for i in 0..4 {
            let (z, reason) = s.judge(3.0 + 0.01 * i as f64, 1.0 + 0.01 * i as f64, 1.5, 1.5);
            assert_eq!((z, reason), (StepZScores::default(), None));
        }
        // Both spike: the loss is named.
        let (z, reason) = s.judge(9.0, 9.0, 1.5, 1.5);
        assert!(matches!(reason, Some(SkipReason::LossZScore(v)) if v == z.loss.unwrap()));
        // Only the gradient norm spikes (a window of 4 bounds z below √3 ≈ 1.73).
        let (z, reason) = s.judge(3.0, 50.0, 1.5, 1.5);
        assert!(z.grad_norm.unwrap() > 1.5 && z.loss.unwrap() < 1.5);
        assert_eq!(reason.map(SkipReason::name), Some("grad_zscore"));
        // A threshold of 0 tests nothing.
        let (_, reason) = s.judge(3.0, 500.0, 0.0, 0.0);
        assert_eq!(reason, None);
    }
}
