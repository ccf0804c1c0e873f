//! `--device cpu|cuda|cuda:N`: where a command runs. Without the flag, a GPU is used when the
//! binary was built with CUDA (`--features cuda`) and one is visible (the CUDA runtime honours
//! `CUDA_VISIBLE_DEVICES`), else the CPU.

use candle_core::Device;

use crate::{Error, Result};

/// Parses a device name and opens it.
pub fn select(spec: Option<&str>) -> Result<Device> {
    let Some(spec) = spec else {
        if candle_core::utils::cuda_is_available() {
            if let Ok(dev) = Device::new_cuda(0) {
                return Ok(dev);
            }
        }
        return Ok(Device::Cpu);
    };
    let ordinal = match spec {
        "cpu" => return Ok(Device::Cpu),
        "cuda" | "gpu" => 0,
        s => match s.strip_prefix("cuda:").and_then(|n| n.parse::<usize>().ok()) {
            Some(n) => n,
            None => return Err(Error::Invalid(format!("--device {s:?}: use cpu, cuda or cuda:N"))),
        },
    };
    if !candle_core::utils::cuda_is_available() {
        return Err(Error::Invalid(format!(
            "--device {spec}: this binary was built without CUDA; build it with scripts/build-cuda.sh \
             (cargo build --release --features cuda) or use --device cpu"
        )));
    }
    Device::new_cuda(ordinal).map_err(|e| {
        Error::Invalid(format!("--device {spec}: no usable GPU {ordinal} ({e}); check CUDA_VISIBLE_DEVICES and the driver"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_and_cuda_is_refused_without_it() {
        assert!(matches!(select(Some("cpu")), Ok(Device::Cpu)));
        let e = select(Some("tpu")).unwrap_err().to_string();
        assert_eq!(e, "--device \"tpu\": use cpu, cuda or cuda:N");
        if !candle_core::utils::cuda_is_available() {
            let e = select(Some("cuda:1")).unwrap_err().to_string();
            assert!(e.contains("built without CUDA"), "{e}");
            assert!(matches!(select(None), Ok(Device::Cpu)));
        }
    }
}
