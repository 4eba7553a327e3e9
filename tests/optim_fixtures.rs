//! Trajectories produced by PyTorch (`torch.optim.Adam`, `torch.optim.AdamW`, `torch.optim.Muon`)
//! and the ADOPT authors' `torch-adopt` 0.1.0 in float64, replayed through our optimizers. The
//! fixtures and the scripts that wrote them: `tests/fixtures/optim/`, `scripts/optim_fixtures.py`,
//! `scripts/muon_fixtures.py`.

use candle_core::DType;
use gpt_pretrain::optim::replay::{flat, flat_values, read_fixture};
use std::path::{Path, PathBuf};

/// Every fixture whose reference ran in f64 throughout (all but the bf16 Newton–Schulz ones).
fn fixtures() -> Vec<PathBuf> {
    all_fixtures()
        .into_iter()
        .filter(|p| !bf16_newton_schulz(p))
        .collect()
}

fn all_fixtures() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/optim");
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    files
}

fn bf16_newton_schulz(path: &Path) -> bool {
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    v["hyperparameters"]["newton_schulz_dtype"] == "bf16"
}

fn expected(path: &Path) -> Vec<serde_json::Map<String, serde_json::Value>> {
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    v["expected"]["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_object().unwrap().clone())
        .collect()
}

/// Largest |ours − PyTorch| / max(|PyTorch|, 1e-3) over every step and element (the floor keeps
/// elements that pass near zero from dominating).
fn worst_error(path: &Path, dtype: DType, fused: bool) -> f64 {
    let fixture = read_fixture(path).unwrap();
    let ours = fixture.replay(Some(dtype), fused).unwrap();
    let theirs = expected(path);
    assert_eq!(ours.len(), theirs.len());
    assert!(ours.len() >= 10);
    let mut worst: f64 = 0.0;
    for (a, b) in ours.iter().zip(&theirs) {
        let a = flat_values(a).unwrap();
        assert_eq!(a.len(), b.len());
        for (name, values) in a {
            let reference = flat(&b[&name]).unwrap();
            for (x, y) in values.iter().zip(&reference) {
                worst = worst.max((x - y).abs() / y.abs().max(1e-3));
            }
        }
    }
    worst
}

#[test]
fn every_fixture_replays_in_f64_within_1e_12() {
    let files = fixtures();
    assert!(files.len() >= 8, "fixtures missing: {files:?}");
    for path in &files {
        for fused in [true, false] {
            let err = worst_error(path, DType::F64, fused);
            assert!(err < 1e-12, "{} (fused {fused}): {err:e}", path.display());
        }
    }
}

#[test]
fn every_fixture_replays_in_f32_within_1e_5() {
    for path in &fixtures() {
        for fused in [true, false] {
            let err = worst_error(path, DType::F32, fused);
            assert!(err < 1e-5, "{} (fused {fused}): {err:e}", path.display());
        }
    }
}

#[test]
fn fixtures_cover_the_required_cases() {
    let names: Vec<String> = all_fixtures()
        .iter()
        .map(|p| p.file_stem().unwrap().to_string_lossy().into_owned())
        .collect();
    for needed in [
        "adam-defaults",
        "adam-l2",
        "adamw-defaults",
        "adamw-decay",
        "adopt-defaults",
        "adopt-decoupled",
        "adopt-no-clip",
        "adopt-coupled-decay",
        "muon-f64-defaults",
        "muon-f64-plain-momentum",
        "muon-f64-match-rms",
        "muon-bf16-defaults",
    ] {
        assert!(names.iter().any(|n| n == needed), "no fixture {needed}");
    }
}

#[test]
fn replay_command_prints_the_steps() {
    let path = fixtures()
        .into_iter()
        .find(|p| p.ends_with("adopt-decoupled.json"))
        .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_gpt-pretrain"))
        .args(["optim", "replay", path.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let steps = printed["steps"].as_array().unwrap();
    let theirs = expected(&path);
    assert_eq!(steps.len(), theirs.len());
    let last = flat(&steps[11]["w"]).unwrap();
    let reference = flat(&theirs[11]["w"]).unwrap();
    for (x, y) in last.iter().zip(&reference) {
        assert!((x - y).abs() <= 1e-12 * y.abs().max(1e-3));
    }
    // A fixture with a bad shape is a one-line error.
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.json");
    std::fs::write(
        &bad,
        r#"{"optimizer":"adam","dtype":"f64","params":{"x":[1.0,2.0]},"grads":[{"x":[1.0]}]}"#,
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_gpt-pretrain"))
        .args(["optim", "replay", bad.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("grads[0].x has shape [1]"));
}

#[test]
fn muon_with_bf16_newton_schulz_matches_torch_within_bf16_rounding_of_the_update() {
    // Each step's update θₖ − θₖ₋₁ (ours against PyTorch's): the gradients and the f64 momentum
    // are the same on both sides, so the updates differ only by the bf16 iteration's rounding.
    let bf16: Vec<PathBuf> = all_fixtures()
        .into_iter()
        .filter(|p| bf16_newton_schulz(p))
        .collect();
    assert!(!bf16.is_empty());
    for path in &bf16 {
        let fixture = read_fixture(path).unwrap();
        let ours = fixture.replay(None, true).unwrap();
        let theirs = expected(path);
        let start: serde_json::Map<String, serde_json::Value> = fixture.params.clone();
        let mut worst: f64 = 0.0;
        for k in 0..ours.len() {
            let a = flat_values(&ours[k]).unwrap();
            for (name, values) in a {
                let before_ours = match k {
                    0 => flat(&start[&name]).unwrap(),
                    _ => flat_values(&ours[k - 1]).unwrap()[&name].clone(),
                };
                let before_theirs = match k {
                    0 => flat(&start[&name]).unwrap(),
                    _ => flat(&theirs[k - 1][&name]).unwrap(),
                };
                let now_theirs = flat(&theirs[k][&name]).unwrap();
                let d_theirs: Vec<f64> = now_theirs
                    .iter()
                    .zip(&before_theirs)
                    .map(|(x, y)| x - y)
                    .collect();
                let d_ours: Vec<f64> = values
                    .iter()
                    .zip(&before_ours)
                    .map(|(x, y)| x - y)
                    .collect();
                let largest = d_theirs.iter().fold(0.0f64, |m, x| m.max(x.abs()));
                for (x, y) in d_ours.iter().zip(&d_theirs) {
                    worst = worst.max((x - y).abs() / largest);
                }
            }
        }
        // One bf16 rounding (2⁻⁸) of the largest element; the same fixture replayed with the
        // iteration in f32 misses PyTorch's updates by 0.045 of it.
        assert!(worst <= 2f64.powi(-8), "{}: {worst:e}", path.display());
    }
}

#[test]
fn muon_refuses_what_torch_refuses() {
    use candle_core::{Device, Tensor, Var};
    use gpt_pretrain::optim::{Muon, MuonConfig, Param};
    let param = |name: &str, shape: &[usize]| Param {
        name: name.into(),
        var: Var::from_tensor(&Tensor::zeros(shape, DType::F32, &Device::Cpu).unwrap()).unwrap(),
        weight_decay: 0.0,
    };
    let err = |params: Vec<Param>, cfg: MuonConfig| {
        Muon::with_params(params, cfg).err().unwrap().to_string()
    };
    assert!(err(vec![param("bias", &[4])], MuonConfig::default()).contains("2-D matrices"));
    let bad_steps = MuonConfig {
        ns_steps: 100,
        ..Default::default()
    };
    assert!(err(vec![param("w", &[2, 3])], bad_steps).contains("ns_steps"));
    let bad_momentum = MuonConfig {
        momentum: 1.0,
        ..Default::default()
    };
    assert!(err(vec![param("w", &[2, 3])], bad_momentum).contains("momentum"));
}
