//! The ADOPT paper's online convex problem with a fixed seed: the qualitative result.
//!
//! What we observe (and assert): Adam drifts to the wrong end (θ → +1) when β2 is small for the
//! problem; the original, unclipped ADOPT — the algorithm the paper analyses — heads to the optimum
//! θ* = −1 for every β2. The released ADOPT clips the normalised gradient at s^0.25, which with
//! k = 50 stays below the k needed until s > 50⁴ ≈ 6M steps: within 1M steps it behaves like Adam
//! there, and converges for k = 10.

use gpt_pretrain::study::toy::{simulate, ToyOptimizer, ToyRun};

fn final_theta(opt: ToyOptimizer, k: f64, beta2: f64) -> f64 {
    let run = ToyRun {
        k,
        beta1: 0.9,
        beta2,
        alpha: 0.01,
        steps: 1_000_000,
        seed: 0,
    };
    let trajectory = simulate(opt, &run).unwrap();
    assert_eq!(trajectory.len(), run.steps);
    assert!(
        trajectory.iter().all(|t| (-1.0..=1.0).contains(t)),
        "projection onto [-1, 1]"
    );
    *trajectory.last().unwrap()
}

#[test]
fn adam_fails_where_adopt_converges() {
    for k in [10.0, 50.0] {
        let adam = final_theta(ToyOptimizer::Adam, k, 0.1);
        let original = final_theta(ToyOptimizer::AdoptOriginal, k, 0.1);
        assert!(
            adam > 0.9,
            "k = {k}: Adam ended at {adam}, expected the wrong end (+1)"
        );
        assert!(
            original < -0.8,
            "k = {k}: original ADOPT ended at {original}, expected near -1"
        );
    }
    // With a large β2 Adam converges on the easier problem.
    assert!(final_theta(ToyOptimizer::Adam, 10.0, 0.999) < -0.9);
}

#[test]
fn clipped_adopt_converges_only_once_its_clip_exceeds_k() {
    assert!(final_theta(ToyOptimizer::Adopt, 10.0, 0.1) < -0.9);
    assert!(final_theta(ToyOptimizer::Adopt, 50.0, 0.1) > 0.9);
}
