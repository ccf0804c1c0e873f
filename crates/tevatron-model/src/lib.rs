//! Hugging Face models for dense retrieval: loading (`config.json`, tokenizer, safetensors or
//! `pytorch_model.bin`, from a folder or the hub cache), BERT-family and Llama-family backbones
//! written for both inference and training, LoRA adapters in PEFT's format, Tevatron's
//! tokenization rules, pooling, and the [`Encoder`] that ties them together.
//!
//! ```no_run
//! use tevatron_model::{Encoder, EncoderOptions, TextOptions};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let model = tevatron_model::hub::resolve_model("sentence-transformers/all-MiniLM-L6-v2", None, true)?;
//! let encoder = Encoder::load(&model, None, &EncoderOptions::default())?;
//! let text = TextOptions { max_len: 32, ..TextOptions::default() };
//! let reps = encoder.embed(&["what is a dense retriever?".to_string()], &text, 64)?;
//! assert_eq!(reps.len(), encoder.output_width());
//! # Ok(()) }
//! ```
#![warn(missing_docs)]

/// `candle_core::bail!` without the backtrace it attaches (which `Display` prints when
/// `RUST_BACKTRACE` is set, turning a one-line error into a page).
macro_rules! fail {
    ($($t:tt)*) => {
        return Err(candle_core::Error::Msg(format!($($t)*)))
    };
}

pub mod backbone;
pub mod collate;
pub mod config;
pub mod cuda_kernels;
pub mod device;
pub mod device_search;
pub mod emulator;
pub mod encoder;
pub mod error;
#[cfg(all(test, feature = "cuda"))]
mod gpu_tests;
pub mod head;
pub mod hub;
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
pub mod lora;
pub mod mapped;
pub mod merge;
pub mod pooling;
pub mod rng;
mod st_modules;
pub mod testing;
pub mod text;
pub mod weights;

pub use backbone::{Mode, Training};
pub use collate::{Batch, PaddingSide};
pub use encoder::{CpuProducts, Encoder, EncoderOptions, ScoreHeadOptions};
pub use error::{Error, Result};
pub use pooling::Pooling;
pub use text::{TextOptions, TextTokenizer};
