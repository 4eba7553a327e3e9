//! Device selection from the `device` config key.

use anyhow::{bail, Result};
use candle_core::Device;

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
