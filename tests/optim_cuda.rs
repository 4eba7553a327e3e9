//! The optimizers on a CUDA device against the PyTorch fixtures. Runs when this build has the
//! `cuda` feature and a device is present; otherwise it says it was skipped.

use candle_core::{DType, Device};
use gpt_pretrain::optim::replay::{flat, flat_values, read_fixture};
use std::path::Path;

#[test]
fn fixtures_replay_on_cuda() {
    if !candle_core::utils::cuda_is_available() {
        eprintln!("skipped fixtures_replay_on_cuda: no CUDA (build with --features cuda on a GPU machine)");
        return;
    }
    let device = Device::new_cuda(0).unwrap();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/optim");
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let fixture = read_fixture(&path).unwrap();
        let expected: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        for (dtype, tolerance) in [(DType::F64, 1e-12), (DType::F32, 1e-5)] {
            let ours = fixture.replay_on(&device, Some(dtype), false).unwrap();
            for (step, theirs) in ours
                .iter()
                .zip(expected["expected"]["steps"].as_array().unwrap())
            {
                for (name, values) in flat_values(step).unwrap() {
                    for (x, y) in values.iter().zip(flat(&theirs[&name]).unwrap()) {
                        let err = (x - y).abs() / y.abs().max(1e-3);
                        assert!(
                            err < tolerance,
                            "{} {dtype:?} {name}: {err:e}",
                            path.display()
                        );
                    }
                }
            }
        }
    }
}
