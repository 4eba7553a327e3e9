//! Device selection from the `device` config key.

use anyhow::{bail, Result};
use candle_core::{DType, Device};

/// Parses `cpu`, `cuda` or `cuda:N` into a candle device, with a clear error when CUDA
/// was not compiled in.
pub fn parse_device(spec: &str) -> Result<Device> {
    let ordinal = match spec {
        "cpu" => return Ok(Device::Cpu),
        "cuda" => 0,
        s => match s
            .strip_prefix("cuda:")
            .and_then(|n| n.parse::<usize>().ok())
        {
            Some(n) => n,
            None => bail!("device must be cpu, cuda or cuda:N, got '{spec}'"),
        },
    };
    if !candle_core::utils::cuda_is_available() {
        bail!("device '{spec}' needs a build with the cuda feature (cargo build --release --features cuda)");
    }
    Ok(Device::new_cuda(ordinal)?)
}

/// Checks the syntax of a device string without touching any device.
pub fn parse_device_spec(spec: &str) -> Result<()> {
    let ok = spec == "cpu"
        || spec == "cuda"
        || spec
            .strip_prefix("cuda:")
            .is_some_and(|n| n.parse::<usize>().is_ok());
    if !ok {
        bail!("device must be cpu, cuda or cuda:N, got '{spec}'");
    }
    Ok(())
}

/// The GPU's name (None on CPU).
pub fn device_name(device: &Device) -> Option<String> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(cuda) = device {
        return cuda.cuda_stream().context().name().ok();
    }
    let _ = device;
    None
}

/// Data-sheet dense tensor-core peaks in GFLOP/s (no sparsity): H100/H200 SXM 989.4 TFLOP/s bf16
/// and 494.7 tf32 (f32 matmuls run as tf32 only when enabled; candle's default is full f32, 67),
/// H100 PCIe 756.5 bf16, A100 312 bf16 and 19.5 f32.
pub fn nominal_peak_gflops(name: &str, dtype: DType) -> Option<f64> {
    let bf16 = dtype == DType::BF16;
    let tflops = if name.contains("H100") && name.contains("PCIe") {
        if bf16 {
            756.5
        } else {
            51.2
        }
    } else if name.contains("H100") || name.contains("H200") {
        if bf16 {
            989.4
        } else {
            66.9
        }
    } else if name.contains("A100") {
        if bf16 {
            312.0
        } else {
            19.5
        }
    } else {
        return None;
    };
    Some(tflops * 1e3)
}
