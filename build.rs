//! Records the git commit the binary was built from, for each run's reproducibility header, and,
//! with the `cuda` feature, compiles the CUDA kernels (src/optim/optim.cu, src/ops/cuda/kernels.cu) to PTX.

fn main() {
    let commit = std::process::Command::new("git")
        .args(["rev-parse", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".to_string());
    println!("cargo:rustc-env=GPT_PRETRAIN_GIT_COMMIT={commit}");
    println!("cargo:rerun-if-changed=.git/HEAD");
    println!("cargo:rerun-if-changed=.git/refs/heads");

    if std::env::var_os("CARGO_FEATURE_CUDA").is_some() {
        // No contracted multiply-adds in the optimizer: its f32 results then equal the CPU
        // kernel's bit for bit.
        compile_ptx("src/optim/optim.cu", "optim.ptx", &["--fmad=false"]);
        compile_ptx("src/ops/cuda/kernels.cu", "kernels.ptx", &[]);
    }
}

/// nvcc → `$OUT_DIR/{name}`, for the compute capability in CUDA_COMPUTE_CAP (as candle's own
/// kernels); 70 when unset, which the driver JIT-compiles for any newer GPU.
fn compile_ptx(source: &str, name: &str, flags: &[&str]) {
    println!("cargo:rerun-if-changed={source}");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo:rerun-if-env-changed=NVCC");
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "70".into());
    let cap: String = cap.chars().filter(char::is_ascii_digit).collect();
    let out =
        std::path::PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join(name);
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| "nvcc".into());
    let status = std::process::Command::new(&nvcc)
        .args(["--ptx", "-O3", "-std=c++17"])
        .args(flags)
        .arg(format!("-arch=compute_{cap}"))
        .arg(source)
        .arg("-o")
        .arg(&out)
        .status()
        .unwrap_or_else(|e| {
            panic!("cannot run {nvcc} for the cuda feature ({e}); see scripts/cuda_toolchain.sh")
        });
    assert!(status.success(), "{nvcc} failed on {source}");
}
