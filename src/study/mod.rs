//! Experiments over runs: sweeps of configs and seeds, the comparison report with its statistics
//! and plots, and the ADOPT paper's toy convergence problem.

pub mod compare;
pub mod plots;
pub mod runs;
pub mod stats;
pub mod sweep;
pub mod test_plan;
pub mod toy;
