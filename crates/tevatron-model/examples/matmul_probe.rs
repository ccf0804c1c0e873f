//! Measures candle's f32 matmul rate for the shapes of a MiniLM layer (a quick probe, not a test).
use candle_core::{Device, Tensor};
fn main() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    for (m, k, n) in [(8192usize, 384usize, 1536usize), (8192, 1536, 384), (8192, 384, 384)] {
        let a = Tensor::randn(0f32, 1.0, (m, k), &dev)?;
        let w = Tensor::randn(0f32, 1.0, (n, k), &dev)?;
        let _ = a.matmul(&w.t()?)?;
        let t = std::time::Instant::now();
        for _ in 0..5 {
            let _ = a.matmul(&w.t()?)?;
        }
        let s = t.elapsed().as_secs_f64() / 5.0;
        println!("{m}x{k}x{n}: {:.1} GFLOP/s", 2.0 * (m * k * n) as f64 / s / 1e9);
    }
    Ok(())
}
