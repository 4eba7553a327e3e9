//! The learning-rate schedule: a pure function of the step, so a resumed run needs no schedule state.

use crate::config::ScheduleKind;

/// Linear warmup then cosine decay (or constant), as nanoGPT's `get_lr`.
#[derive(Debug, Clone, PartialEq)]
pub struct Schedule {
    pub kind: ScheduleKind,
    pub lr: f64,
    pub min_lr: f64,
    pub warmup_steps: usize,
    /// The step at which the cosine reaches `min_lr`; constant after it.
    pub decay_steps: usize,
}

impl Schedule {
    /// The learning rate for optimizer step `step` (0-based):
    /// - `step < warmup_steps`: `lr · (step + 1) / (warmup_steps + 1)`;
    /// - constant schedule afterwards: `lr`;
    /// - cosine: `min_lr + ½(1 + cos(π·r))·(lr − min_lr)` with
    ///   `r = (step − warmup) / (decay_steps − warmup)`, and `min_lr` from `decay_steps` on.
    pub fn lr_at(&self, step: usize) -> f64 {
        if step < self.warmup_steps {
            return self.lr * (step + 1) as f64 / (self.warmup_steps + 1) as f64;
        }
        match self.kind {
            ScheduleKind::Constant => self.lr,
            ScheduleKind::Cosine => {
                if step >= self.decay_steps {
                    return self.min_lr;
                }
                let ratio = (step - self.warmup_steps) as f64
                    / (self.decay_steps - self.warmup_steps) as f64;
                let coeff = 0.5 * (1.0 + (std::f64::consts::PI * ratio).cos());
                self.min_lr + coeff * (self.lr - self.min_lr)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cosine() -> Schedule {
        Schedule {
            kind: ScheduleKind::Cosine,
            lr: 6e-4,
            min_lr: 6e-5,
            warmup_steps: 10,
            decay_steps: 110,
        }
    }

    #[test]
    fn warmup_starts_small_and_reaches_lr() {
        let s = cosine();
        assert_eq!(s.lr_at(0), 6e-4 / 11.0);
        assert_eq!(s.lr_at(9), 6e-4 * 10.0 / 11.0);
        assert_eq!(s.lr_at(10), 6e-4); // cos(0) = 1: the peak
    }

    #[test]
    fn cosine_midpoint_and_end() {
        let s = cosine();
        // Halfway through the decay, cos(π/2) = 0: exactly the mean of lr and min_lr.
        assert!((s.lr_at(60) - 3.3e-4).abs() < 1e-15);
        assert_eq!(s.lr_at(110), 6e-5);
        assert_eq!(s.lr_at(10_000), 6e-5);
        assert!(s.lr_at(109) > 6e-5);
        for step in 10..110 {
            assert!(
                s.lr_at(step + 1) <= s.lr_at(step),
                "not decreasing at {step}"
            );
        }
    }

    #[test]
    fn constant_holds_after_warmup() {
        let s = Schedule {
            kind: ScheduleKind::Constant,
            warmup_steps: 0,
            ..cosine()
        };
        assert_eq!(s.lr_at(0), 6e-4);
        assert_eq!(s.lr_at(1_000_000), 6e-4);
    }
}
