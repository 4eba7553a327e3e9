//! The learning-rate schedule: a pure function of the step, so a resumed run needs no schedule state.

use serde::{Deserialize, Serialize};

/// The learning-rate schedule's shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScheduleKind {
    /// Linear warmup, then cosine decay to `min_lr` (nanoGPT's `get_lr`).
    Cosine,
    /// Linear warmup, then `lr` throughout.
    Constant,
    /// Linear warmup, then linear decay to `min_lr`.
    Linear,
    /// Warmup-stable-decay: linear warmup, `lr` until the last `decay_fraction` of
    /// `lr_decay_steps`, then a `decay_shape` decay to `min_lr` (as modded-nanogpt, llm.c and
    /// Hägele et al. 2024).
    Wsd,
}

/// The shape of a `wsd` schedule's final decay.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DecayShape {
    /// `1 − r` of the way from `lr` to `min_lr`.
    #[serde(rename = "linear")]
    Linear,
    /// `½(1 + cos πr)`.
    #[serde(rename = "cosine")]
    Cosine,
    /// `1 − √r`, Hägele et al. 2024's best cooldown.
    #[serde(rename = "1-sqrt")]
    OneMinusSqrt,
}

/// Linear warmup, then a decay to `min_lr` (cosine as nanoGPT's `get_lr`, linear, or
/// warmup-stable-decay), or a constant `lr`.
#[derive(Debug, Clone, PartialEq)]
pub struct Schedule {
    pub kind: ScheduleKind,
    pub lr: f64,
    pub min_lr: f64,
    pub warmup_steps: usize,
    /// The step at which the decay reaches `min_lr`; constant after it.
    pub decay_steps: usize,
    /// `wsd`: the share of `decay_steps` that the final decay takes, and its shape.
    pub wsd: Option<(f64, DecayShape)>,
}

impl DecayShape {
    /// The share of `lr − min_lr` left at progress `r` ∈ [0, 1] through the decay.
    fn remaining(self, r: f64) -> f64 {
        match self {
            DecayShape::Linear => 1.0 - r,
            DecayShape::Cosine => 0.5 * (1.0 + (std::f64::consts::PI * r).cos()),
            DecayShape::OneMinusSqrt => 1.0 - r.sqrt(),
        }
    }
}

impl Schedule {
    /// The first step of the decay: the warmup's end, or for `wsd` the step from which the last
    /// `decay_fraction · decay_steps` steps (rounded) remain.
    pub fn decay_start(&self) -> usize {
        match (self.kind, self.wsd) {
            (ScheduleKind::Wsd, Some((fraction, _))) => {
                let decay = (fraction * self.decay_steps as f64).round() as usize;
                self.decay_steps.saturating_sub(decay)
            }
            _ => self.warmup_steps,
        }
    }

    /// The learning rate for optimizer step `step` (0-based):
    /// - `step < warmup_steps`: `lr · (step + 1) / (warmup_steps + 1)`;
    /// - constant schedule afterwards: `lr`;
    /// - otherwise `lr` until [`Self::decay_start`] `s`, then `min_lr + f(r)·(lr − min_lr)` with
    ///   `r = (step − s) / (decay_steps − s)` and `f` the shape: cosine `½(1 + cos(π·r))`, linear
    ///   `1 − r`, 1-sqrt `1 − √r` (Hägele et al. 2024); `min_lr` from `decay_steps` on.
    pub fn lr_at(&self, step: usize) -> f64 {
        if step < self.warmup_steps {
            return self.lr * (step + 1) as f64 / (self.warmup_steps + 1) as f64;
        }
        let shape = match (self.kind, self.wsd) {
            (ScheduleKind::Constant, _) => return self.lr,
            (ScheduleKind::Cosine, _) => DecayShape::Cosine,
            (ScheduleKind::Linear, _) => DecayShape::Linear,
            (ScheduleKind::Wsd, Some((_, shape))) => shape,
            // Not a resolved config's: with no fraction the decay starts at the warmup's end.
            (ScheduleKind::Wsd, None) => DecayShape::Linear,
        };
        if step >= self.decay_steps {
            return self.min_lr;
        }
        let start = self.decay_start();
        if step < start {
            return self.lr;
        }
        let ratio = (step - start) as f64 / (self.decay_steps - start) as f64;
        self.min_lr + shape.remaining(ratio) * (self.lr - self.min_lr)
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
            wsd: None,
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

    fn wsd(shape: DecayShape) -> Schedule {
        Schedule {
            kind: ScheduleKind::Wsd,
            lr: 1e-3,
            min_lr: 1e-4,
            warmup_steps: 10,
            decay_steps: 100,
            wsd: Some((0.2, shape)),
        }
    }

    #[test]
    fn wsd_holds_lr_then_decays_over_its_last_fraction() {
        // 20% of 100 steps: the decay runs from step 80 to 100; step 85 is a quarter through it.
        for shape in [
            DecayShape::Linear,
            DecayShape::Cosine,
            DecayShape::OneMinusSqrt,
        ] {
            let s = wsd(shape);
            assert_eq!(s.decay_start(), 80);
            assert_eq!(s.lr_at(0), 1e-3 / 11.0);
            assert_eq!(s.lr_at(10), 1e-3);
            assert_eq!(s.lr_at(79), 1e-3);
            assert_eq!(s.lr_at(80), 1e-3, "{shape:?} starts at lr");
            assert_eq!(s.lr_at(100), 1e-4);
            assert_eq!(s.lr_at(5_000), 1e-4);
        }
        let close = |a: f64, b: f64| (a - b).abs() < 1e-15;
        // linear: 1e-4 + 0.75 · 9e-4; cosine: ½(1 + cos(π/4)) = 0.853553…; 1-sqrt: 1 − ½.
        assert!(close(wsd(DecayShape::Linear).lr_at(85), 7.75e-4));
        let cosine = 1e-4 + 0.5 * (1.0 + std::f64::consts::FRAC_1_SQRT_2) * 9e-4;
        assert!(close(wsd(DecayShape::Cosine).lr_at(85), cosine));
        assert!(close(wsd(DecayShape::OneMinusSqrt).lr_at(85), 5.5e-4));
        // Halfway: linear and cosine both leave half; 1-sqrt leaves 1 − √½.
        assert!(close(wsd(DecayShape::Linear).lr_at(90), 5.5e-4));
        assert!(close(wsd(DecayShape::Cosine).lr_at(90), 5.5e-4));
        let half = 1e-4 + (1.0 - std::f64::consts::FRAC_1_SQRT_2) * 9e-4;
        assert!(close(wsd(DecayShape::OneMinusSqrt).lr_at(90), half));
    }

    #[test]
    fn wsd_fraction_rounds_to_whole_steps() {
        // 0.15 · 110 = 16.5 steps, rounded to 17: the decay starts at step 93.
        let s = Schedule {
            decay_steps: 110,
            wsd: Some((0.15, DecayShape::Linear)),
            ..wsd(DecayShape::Linear)
        };
        assert_eq!(s.decay_start(), 93);
        assert_eq!(s.lr_at(92), 1e-3);
        assert!(s.lr_at(94) < 1e-3);
    }

    #[test]
    fn linear_decays_from_the_warmups_end() {
        let s = Schedule {
            kind: ScheduleKind::Linear,
            ..cosine()
        };
        // 6e-4 at step 10 to 6e-5 at step 110: a quarter of the way down at step 35.
        assert_eq!(s.lr_at(10), 6e-4);
        assert!((s.lr_at(35) - (6e-5 + 0.75 * 5.4e-4)).abs() < 1e-15);
        assert!((s.lr_at(60) - 3.3e-4).abs() < 1e-15);
        assert_eq!(s.lr_at(110), 6e-5);
    }
}
