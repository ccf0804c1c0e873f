//! Contrastive training of dense retrievers, as Tevatron trains them.
//!
//! [`data`] samples Tevatron's training groups from memory-mapped rows, [`loss`] is the
//! contrastive loss, [`step`] computes a micro-batch's gradients (plain, GradCache or
//! gradient checkpointing), [`optim`] and [`schedule`] are Hugging Face's AdamW and learning
//! rate schedules, [`checkpoint`] writes HF-layout checkpoints and [`trainer`] is the loop with
//! accumulation, logging, saving and auto-resume.
//!
//! ```
//! use candle_core::{Device, Tensor};
//! let q = Tensor::new(&[[1f32, 0.], [0., 1.]], &Device::Cpu).unwrap();
//! let p = Tensor::new(&[[1f32, 0.], [0., 1.]], &Device::Cpu).unwrap();
//! let loss = tevatron_train::loss::contrastive(&q, &p, 1.0).unwrap();
//! assert!(loss.to_scalar::<f32>().unwrap() < 0.32);
//! ```
#![warn(missing_docs)]

pub mod checkpoint;
pub mod data;
pub mod dist;
pub mod error;
pub mod fused_adamw;
#[cfg(all(test, feature = "cuda"))]
mod gpu_tests;
pub mod grad_norm;
#[cfg(test)]
mod kernel_emulation;
#[cfg(all(test, not(kernel_emulation)))]
mod kernel_emulation_missing {
    /// Stands in for the kernel tests when `build.rs` could not compile the emulation.
    #[test]
    fn the_gpu_kernels_cpu_emulation_was_built() {
        panic!(
            "build.rs could not compile kernels/emulate.cpp (its warning says why): the GPU \
             kernels' tests need a C++20 compiler"
        );
    }
}
#[cfg(feature = "cuda")]
mod kernels;
pub mod loss;
pub mod optim;
pub mod profile;
pub mod schedule;
pub mod step;
pub mod trainer;
pub mod validation;
pub mod watchdog;

pub use error::{Error, Result};
